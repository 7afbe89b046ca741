"""Experiment config for the `small` model preset (see cpmjax/presets.py)."""

from cpmjax import presets
from cpmjax.train.experiment import experiment_config


def get_config():
    return experiment_config(presets.small(), name="small")
