"""Ablation: dense vs InfLLM v2 sparse attention at long context (1024-token rows), tiny preset.

    python launch/ablate.py --study=configs/ablations/sparse_long.py

Sparse: block 64, kernels 32/16, a 128-token window and 4 selected blocks (384 of 1024 keys per
query), on from the first step (dense_len -1). MiniCPM4 switches sparse attention on only in its
long-context stage (arXiv 2506.07900 §5); this measures what training sparse from scratch costs
in loss and buys in tokens/s on the same data.
"""

from cpmjax import presets
from cpmjax.experiments.study import study_config
from cpmjax.train.experiment import experiment_config


def get_config():
    base = experiment_config(presets.tiny(), name="tiny")
    t = base.train
    t.steps, t.warmup_steps, t.seq_len, t.global_batch_size = 100, 10, 1024, 4
    t.log_every, t.eval_every, t.eval_batches = 10, 50, 4
    base.checkpoint.every = 50
    sparse = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
              "window_size": 128, "topk": 4, "use_nope": False, "dense_len": -1}
    return study_config(base, "sparse_long", seeds=(0,), variants={
        "dense": {},
        "sparse": {"model": {"sparse_config": sparse}},
    })
