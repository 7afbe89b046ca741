"""Ablation: muP vs the standard parametrization on the tiny preset (the README main job).

    python launch/ablate.py --study=configs/ablations/parametrization.py

Standard as launch/sweep.py defines it: m = 1 (dim_model_base = hidden_size: no muP LR, init or
logit multipliers), standard init, one LR for every group; at the preset's width (128, m = 2
under muP) the two differ by those multipliers only. Same base LR for both; the LR at which each
is best is what launch/sweep.py searches.
"""

from pathlib import Path

from cpmjax.experiments.study import config_from_file, study_config


def get_config():
    base = config_from_file(Path(__file__).resolve().parents[1] / "tiny.py")  # the main job
    width = base.model.hidden_size
    return study_config(base, "parametrization", seeds=(0, 1), variants={
        "mup": {"train": {"parametrization": "mup"}},
        "standard": {"train": {"parametrization": "standard"},
                     "model": {"dim_model_base": width}},
    })
