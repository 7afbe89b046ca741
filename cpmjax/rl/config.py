"""The RL experiment config: the training system's experiment config (model, optimizer, mesh,
checkpoints) plus an ``rl`` section, validated before anything is compiled.

Defaults follow the papers where they give a value: DAPO (arXiv 2503.14476) for clip-higher
(eps_low 0.2, eps_high 0.28), token-level loss averaging, dynamic sampling and overlong
handling; Ye et al. 2020 (arXiv 1912.09729) for dual-clip c = 3; MiniCPM4 (arXiv 2506.07900
§3.2) for the KL coefficient 0.001 with a periodically refreshed reference, temperature 1.0
with top-p 1.0 (no truncation of the sampler) and chunk-wise rollout. Sizes (group size, batch,
response budget) are for the tiny model on a CPU; MiniCPM4 uses 16 samples per prompt, batch 256
and mini-batch 128.

The train section keeps its meaning for the update (``lr``, ``schedule``, Adam, ``clip_norm``,
``grad_accum``, ``compute_dtype``, ``remat``, ``seed``, ``steps`` = RL steps, ``log_every``,
``eval_every``); its ``seq_len`` and ``global_batch_size`` are unused: rows are
``rl.groups_per_step x rl.group_size`` trajectories, padded to a power-of-two length.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from cpmjax.config import ConfigError
from cpmjax.rl.buffer import STALE_POLICIES
from cpmjax.rl.loss import AGGREGATIONS
from cpmjax.rl.rollout import OVERLONG
from cpmjax.train.experiment import experiment_config


def rl_experiment_config(model: Mapping[str, Any], name: str) -> ml_collections.ConfigDict:
    cfg = experiment_config(model, name)
    t = cfg.train
    t.schedule, t.warmup_steps, t.weight_decay = "constant", 0, 0.0  # MiniCPM4: constant LR
    t.steps, t.log_every, t.eval_every = 100, 1, 20
    t.init_from = ""  # the policy's starting weights (the SFT run); empty: random init
    cfg.checkpoint.every = 10

    cfg.rl = r = ml_collections.ConfigDict()
    r.prompts = "cpmjax.rl.prompts:instruct_prompts"  # module:factory(cfg)
    r.train_prompts, r.heldout_prompts = 20000, 256
    r.families = ""  # comma-separated instruction-set families; empty: all
    r.format_credit = 0.0  # reward of a well-formed wrong answer (MiniCPM4: 0)
    # GRPO
    r.group_size = 8
    r.groups_per_step = 8  # N: groups in one update's batch
    r.adv_std_normalize = True  # GRPO's (r - mean) / std; False: r - mean (Dr. GRPO)
    r.minibatches = 1  # optimizer updates per step over slices of the batch
    r.epochs = 1  # mu: passes over the batch per step
    # objective
    r.eps_low, r.eps_high = 0.2, 0.28  # DAPO clip-higher
    r.dual_clip = 3.0  # c of dual-clip for negative advantages; 0: off
    r.kl_coef = 0.001  # 0: no KL term and no reference model
    r.ref_refresh_every = 50  # steps between copies of the policy into the reference; 0: never
    r.loss_agg = "token"  # token (DAPO) | sequence (GRPO)
    # rollout
    r.rollout_batch = 64  # trajectories per round = engine slots; 0: groups_per_step x group_size
    r.chunk_tokens = 16  # per trajectory per round; 0: vanilla (wait for every response)
    r.max_response = 64
    r.temperature = 1.0  # no top-k / top-p: the loss's softmax(logits / T) is the sampler's
    r.dynamic_sampling = True
    r.max_rounds = 32  # rounds per step before training on fewer than groups_per_step groups
    r.overlong = "filter"  # filter | penalty | none
    r.overlong_buffer = 16  # the soft penalty's ramp (DAPO's L_cache)
    r.max_staleness = 4  # policy versions a buffered token may lag behind
    r.stale_policy = "restart"  # restart | drop
    r.stop_tokens = "<|im_end|>"  # comma-separated, besides the model's eos ids
    r.prefill_chunk = 128
    r.eval_temperature = 0.0  # held-out evaluation: greedy
    return cfg


def check_rl_config(cfg: ml_collections.ConfigDict) -> None:
    """Fail before any compile with a message naming the bad field and the rule."""
    r = cfg.rl

    def need(ok: bool, field: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"config field 'rl.{field}': {r[field]!r} {rule}")

    for field in ("group_size",):
        need(r[field] >= 2, field, "must be >= 2 (advantages compare samples of a prompt)")
    for field in ("groups_per_step", "minibatches", "epochs", "max_response", "max_rounds",
                  "train_prompts", "heldout_prompts", "prefill_chunk"):
        need(r[field] >= 1, field, "must be >= 1")
    for field in ("rollout_batch", "chunk_tokens", "ref_refresh_every", "max_staleness"):
        need(r[field] >= 0, field, "must be >= 0")
    need(0 < r.eps_low < 1, "eps_low", "must be in (0, 1)")
    need(r.eps_high > 0, "eps_high", "must be > 0")
    need(r.dual_clip == 0 or r.dual_clip > 1, "dual_clip", "must be 0 (off) or > 1")
    need(r.kl_coef >= 0, "kl_coef", "must be >= 0")
    need(r.temperature > 0, "temperature", "must be > 0 (RL samples)")
    need(r.eval_temperature >= 0, "eval_temperature", "must be >= 0")
    need(r.loss_agg in AGGREGATIONS, "loss_agg", f"is not one of {AGGREGATIONS}")
    need(r.overlong in OVERLONG, "overlong", f"is not one of {OVERLONG}")
    need(r.stale_policy in STALE_POLICIES, "stale_policy", f"is not one of {STALE_POLICIES}")
    need(0 < r.overlong_buffer <= r.max_response, "overlong_buffer",
         f"must be in [1, rl.max_response={r.max_response}]")
    need(r.chunk_tokens <= r.max_response, "chunk_tokens",
         f"must be <= rl.max_response={r.max_response} (0: vanilla)")
    need(":" in r.prompts, "prompts", "must be module:factory")
    rows = r.groups_per_step * r.group_size
    need(rows % r.minibatches == 0, "minibatches",
         f"must divide groups_per_step x group_size = {rows}")
    if (rows // r.minibatches) % cfg.train.grad_accum:
        raise ConfigError(f"config field 'train.grad_accum': {cfg.train.grad_accum} must divide "
                          f"the rows of one update ({rows // r.minibatches})")
    need(r.rollout_batch == 0 or r.rollout_batch >= r.group_size, "rollout_batch",
         f"must be 0 or >= rl.group_size={r.group_size}")
    rounds = -(-r.max_response // chunk_tokens(r))
    need(r.stale_policy != "restart" or r.max_staleness >= rounds - 1, "max_staleness",
         f"must be >= {rounds - 1} with rl.stale_policy='restart': a response of "
         f"rl.max_response tokens takes {rounds} rounds of rl.chunk_tokens and would be "
         "restarted forever")


def rollout_batch(r: ml_collections.ConfigDict) -> int:
    return r.rollout_batch or r.groups_per_step * r.group_size


def chunk_tokens(r: ml_collections.ConfigDict) -> int:
    return r.chunk_tokens or r.max_response
