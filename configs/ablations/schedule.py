"""Ablation: WSD vs cosine learning-rate schedule on the tiny preset, 2 seeds.

    python launch/ablate.py --study=configs/ablations/schedule.py

WSD (MiniCPM, Hu et al. 2024, arXiv 2404.06395) holds the peak LR and decays over the last 20%;
cosine decays from the end of warmup. Same steps, peak LR, warmup and final LR ratio.
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
    return study_config(base, "schedule", seeds=(0, 1), variants={
        "wsd": {"train": {"schedule": "wsd"}},
        "cosine": {"train": {"schedule": "cosine"}},
    })
