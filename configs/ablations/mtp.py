"""Ablation: multi-token prediction on/off (MiniCPM4 report arXiv 2506.07900 §2.3.2), tiny preset.

    python launch/ablate.py --study=configs/ablations/mtp.py

The loss column is next-token loss in both variants (the MTP term is logged as mtp_loss).
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
    return study_config(base, "mtp", seeds=(0, 1), variants={
        "no_mtp": {"train": {"mtp_weight": 0.0}},
        "mtp_0_3": {"train": {"mtp_weight": 0.3}},
    })
