"""RL of the tiny long-tail SFT model (``configs/sft_longtail_tiny.py``: the instruction set plus
its long-tailed ``echo`` family) on the same mix, on a CPU::

    python launch/train.py --config=configs/tiny.py                 # runs/tiny
    python launch/train.py --config=configs/sft_longtail_tiny.py    # runs/sft_longtail_tiny
    python launch/rl.py --config=configs/rl_longtail_tiny.py \\
        --results=bench/results/rl_longtail_tiny

The recipe of ``configs/rl_tiny.py`` (GRPO with DAPO's techniques, 16-token chunks) with a
128-token response budget, which the longest echo answers (96 letters) need, and 512 held-out
problems for the greedy held-out reward.
"""

from cpmjax import presets
from cpmjax.posttrain.tasks import FAMILIES
from cpmjax.rl.config import rl_experiment_config


def get_config():
    cfg = rl_experiment_config(presets.tiny(), name="rl_longtail_tiny")
    t = cfg.train
    t.init_from = "runs/sft_longtail_tiny"
    t.steps, t.lr = 100, 3e-4
    t.log_every, t.eval_every = 1, 10
    cfg.checkpoint.every = 20
    r = cfg.rl
    r.families = ",".join([*FAMILIES, "echo"])
    r.group_size, r.groups_per_step, r.minibatches = 8, 8, 2
    r.rollout_batch, r.chunk_tokens, r.max_response = 64, 16, 128
    r.max_staleness, r.heldout_prompts = 8, 512
    return cfg
