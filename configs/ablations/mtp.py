"""Ablation: multi-token prediction on/off (MiniCPM4 report arXiv 2506.07900 §2.3.2), tiny preset.

    python launch/ablate.py --study=configs/ablations/mtp.py

The loss column is next-token loss in both variants (the MTP term is logged as mtp_loss).
"""

from pathlib import Path

from cpmjax.experiments.study import config_from_file, study_config


def get_config():
    base = config_from_file(Path(__file__).resolve().parents[1] / "tiny.py")  # the main job
    return study_config(base, "mtp", seeds=(0, 1), variants={
        "no_mtp": {"train": {"mtp_weight": 0.0}},
        "mtp_0_3": {"train": {"mtp_weight": 0.3}},
    })
