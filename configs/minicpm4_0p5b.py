"""Experiment config for the `minicpm4_0p5b` model preset (see cpmjax/presets.py)."""

from cpmjax import presets
from cpmjax.train.experiment import experiment_config


def get_config():
    return experiment_config(presets.minicpm4_0p5b(), name="minicpm4_0p5b")
