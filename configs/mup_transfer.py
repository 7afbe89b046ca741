"""Base experiment of the muP LR-transfer sweep (launch/sweep.py; README "ModelTunnel v2").

The tiny preset cut to 2 layers, head_dim 16 (launch/sweep.py sets width, heads, MLP and
dim_model_base per point), 64-token rows, batch 16, 100 steps of WSD with warmup 10. No gradient
clipping and no weight decay, so the muP LR rule is the only width-dependent optimizer setting
(as launch/mup_check.py). One final held-out evaluation over 4 batches.
"""

from cpmjax import presets
from cpmjax.train.experiment import experiment_config


def get_config():
    model = {**presets.tiny(), "num_hidden_layers": 2}
    cfg = experiment_config(model, name="mup_transfer")
    t = cfg.train
    t.steps, t.warmup_steps, t.seq_len, t.global_batch_size = 100, 10, 64, 16
    t.clip_norm, t.weight_decay = 0.0, 0.0
    t.log_every, t.eval_every, t.eval_batches = 10, 100, 4
    cfg.checkpoint.every = 100
    return cfg
