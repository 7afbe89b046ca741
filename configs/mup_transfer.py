"""Base experiment of the muP LR-transfer sweep (launch/sweep.py; README "ModelTunnel v2").

The tiny preset with a 512-token vocabulary (the project's byte-level BPE retrained at that size,
built once under data.cache_dir) and 4 layers, so the matrices whose learning rate muP scales
(attention and MLP) hold 62% / 87% / 93% of the parameters at widths 16 / 64 / 128 (with the
4096-token vocabulary the tied embedding, whose LR neither parametrization scales, held 83% /
55% / 38%); head_dim 16 (launch/sweep.py sets width, heads, MLP and dim_model_base per point),
64-token rows, batch 16, 200 steps of WSD (warmup 20, the last 20% decaying to 0.1x). No gradient
clipping and no weight decay, so the muP LR rule is the only width-dependent optimizer setting
(as launch/mup_check.py). One final held-out evaluation over 8 batches.
"""

from cpmjax import presets
from cpmjax.train.experiment import experiment_config


def get_config():
    model = {**presets.tiny(), "vocab_size": 512, "num_hidden_layers": 4}
    cfg = experiment_config(model, name="mup_transfer")
    t = cfg.train
    t.steps, t.warmup_steps, t.seq_len, t.global_batch_size = 200, 20, 64, 16
    t.clip_norm, t.weight_decay = 0.0, 0.0
    t.log_every, t.eval_every, t.eval_batches = 20, 200, 8
    cfg.checkpoint.every = 200
    return cfg
