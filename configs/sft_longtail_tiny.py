"""SFT of the tiny main-job model on the instruction set plus its opt-in ``echo`` family, whose
response lengths are long-tailed (``cpmjax.posttrain.tasks``): the starting model of the
chunk-wise vs vanilla rollout benchmark (``python launch/bench.py rl``), after the main job::

    python launch/train.py --config=configs/sft_longtail_tiny.py   # writes runs/sft_longtail_tiny

Same recipe as ``configs/sft_tiny.py``, with more steps for the longer copies.
"""

from cpmjax import presets
from cpmjax.posttrain.tasks import FAMILIES
from cpmjax.train.experiment import experiment_config

LONGTAIL_FAMILIES = ",".join([*FAMILIES, "echo"])


def get_config():
    cfg = experiment_config(presets.tiny(), name="sft_longtail_tiny")
    t = cfg.train
    t.init_from = "runs/tiny"
    t.steps, t.warmup_steps, t.seq_len, t.global_batch_size = 600, 20, 256, 16
    t.lr = 1e-2  # the pretraining peak, as configs/sft_tiny.py
    t.log_every, t.eval_every, t.eval_batches = 10, 100, 8
    cfg.checkpoint.every = 100
    cfg.data.format = "chat"
    cfg.data.instruct_families = LONGTAIL_FAMILIES
    return cfg
