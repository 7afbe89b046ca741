"""Experiment config for the `minicpm41_8b` model preset (see cpmjax/presets.py)."""

from cpmjax import presets
from cpmjax.train.experiment import experiment_config


def get_config():
    return experiment_config(presets.minicpm41_8b(), name="minicpm41_8b")
