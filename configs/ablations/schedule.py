"""Ablation: WSD vs cosine learning-rate schedule on the tiny preset, 2 seeds.

    python launch/ablate.py --study=configs/ablations/schedule.py

WSD (MiniCPM, Hu et al. 2024, arXiv 2404.06395) holds the peak LR and decays over the last 20%;
cosine decays from the end of warmup. Same steps, peak LR, warmup and final LR ratio.
"""

from pathlib import Path

from cpmjax.experiments.study import config_from_file, study_config


def get_config():
    base = config_from_file(Path(__file__).resolve().parents[1] / "tiny.py")  # the main job
    return study_config(base, "schedule", seeds=(0, 1), variants={
        "wsd": {"train": {"schedule": "wsd"}},
        "cosine": {"train": {"schedule": "cosine"}},
    })
