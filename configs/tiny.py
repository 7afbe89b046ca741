"""Experiment config for the `tiny` model preset (see cpmjax/presets.py): the README main job.

Step count and LR are chosen so the run takes ~3-6 minutes on 2 CPU cores and ends well below
the unigram baseline on the default corpus.
"""

from cpmjax import presets
from cpmjax.train.experiment import experiment_config


def get_config():
    cfg = experiment_config(presets.tiny(), name="tiny")
    t = cfg.train
    t.steps, t.warmup_steps, t.seq_len, t.global_batch_size = 160, 20, 256, 16
    t.log_every, t.eval_every = 10, 40
    cfg.checkpoint.every = 80
    return cfg
