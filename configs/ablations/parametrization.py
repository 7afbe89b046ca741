"""Ablation: muP vs the standard parametrization at the tiny preset's width (128, m = 2).

    python launch/ablate.py --study=configs/ablations/parametrization.py

Standard, as launch/mup_check.py defines it: standard init, one LR for every group, scale_emb 1
and dim_model_base = hidden_size (no 1/m logit multiplier). Same base LR for both; the LR at
which each is best is what launch/sweep.py searches.
"""

from cpmjax import presets
from cpmjax.experiments.study import study_config
from cpmjax.train.experiment import experiment_config


def get_config():
    base = experiment_config(presets.tiny(), name="tiny")
    t = base.train
    t.steps, t.warmup_steps, t.seq_len, t.global_batch_size = 160, 20, 256, 16
    t.log_every, t.eval_every = 10, 40
    base.checkpoint.every = 80
    width = base.model.hidden_size
    return study_config(base, "parametrization", seeds=(0, 1), variants={
        "mup": {"train": {"parametrization": "mup"}},
        "standard": {"train": {"parametrization": "standard"},
                     "model": {"scale_emb": 1, "dim_model_base": width}},
    })
