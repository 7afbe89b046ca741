"""RL of the tiny SFT model on the instruction set, on a CPU (``cpmjax.rl``), after the main job
and SFT::

    python launch/train.py --config=configs/tiny.py          # runs/tiny
    python launch/train.py --config=configs/sft_tiny.py      # runs/sft_tiny
    python launch/rl.py --config=configs/rl_tiny.py --results=bench/results/rl_tiny

GRPO with DAPO's clip-higher, token-level loss, dynamic sampling and overlong filtering,
dual-clip, a KL term to a reference refreshed every 50 steps, 100 steps, chunk-wise rollout with 16-token
chunks of a 64-token response budget. The held-out reward is greedy decoding's on held-out
problems the training never sees.
"""

from cpmjax import presets
from cpmjax.rl.config import rl_experiment_config


def get_config():
    cfg = rl_experiment_config(presets.tiny(), name="rl_tiny")
    t = cfg.train
    t.init_from = "runs/sft_tiny"
    t.steps, t.lr = 100, 3e-4  # 1e-3: held-out reward fell 0.664 -> 0.609 in 30 steps
    t.log_every, t.eval_every = 1, 10
    cfg.checkpoint.every = 20
    r = cfg.rl
    r.group_size, r.groups_per_step, r.minibatches = 8, 8, 2
    r.rollout_batch, r.chunk_tokens, r.max_response = 64, 16, 64
    return cfg
