"""Experiment config for the `minicpm4_8b` model preset (see cpmjax/presets.py)."""

from cpmjax import presets
from cpmjax.train.experiment import experiment_config


def get_config():
    return experiment_config(presets.minicpm4_8b(), name="minicpm4_8b")
