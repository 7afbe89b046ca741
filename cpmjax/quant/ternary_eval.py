"""Measurements of ternary QAT: the train-step time overhead of the quantizer next to the
full-precision step, and model bytes full precision vs packed.

The overhead is timed side by side in one process on the same state and batch, the two steps
alternating round by round (ratios survive a shared machine better than absolute times); BitCPM
on Ascend reports 4.5% (BitCPM-CANN), the goal here is at most 5%.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model.params import Params
from cpmjax.quant import ternary
from cpmjax.train.optimizer import make_optimizer
from cpmjax.train.step import init_state, make_train_step


def random_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict[str, jax.Array]:
    """One full packed-row batch of random tokens (every target counts)."""
    toks = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq + 1))
    return {"inputs": jnp.asarray(toks[:, :-1], jnp.int32),
            "targets": jnp.asarray(toks[:, 1:], jnp.int32),
            "positions": jnp.tile(jnp.arange(seq, dtype=jnp.int32), (batch, 1)),
            "segment_ids": jnp.ones((batch, seq), jnp.int32),
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}


def step_time_overhead(cfg: ModelConfig, train: Any, tc: ternary.TernaryConfig, *,
                       batch: int, seq: int, rounds: int = 5, steps: int = 8) -> dict[str, Any]:
    """Seconds per train step without and with the ternary transforms (median over rounds of
    ``steps`` steps each, fp and QAT alternating) and their ratio minus one."""
    tx = make_optimizer(train, cfg)
    data = random_batch(cfg, batch, seq)
    fns = {"fp": jax.jit(make_train_step(cfg, tx, dtype=jnp.dtype(train.compute_dtype))),
           "qat": jax.jit(make_train_step(cfg, tx, dtype=jnp.dtype(train.compute_dtype),
                                          transforms=ternary.qat_transforms(tc)))}
    states = {k: init_state(cfg, tx, jax.random.key(0), train.parametrization) for k in fns}
    for k, fn in fns.items():  # compile and warm up
        states[k], m = fn(states[k], data)
        jax.block_until_ready(m["loss"])
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                states[k], m = fn(states[k], data)
            jax.block_until_ready(m["loss"])
            times[k].append((time.perf_counter() - t0) / steps)
    fp, qat = float(np.median(times["fp"])), float(np.median(times["qat"]))
    return {"fp_step_s": fp, "qat_step_s": qat, "overhead": qat / fp - 1.0,
            "rounds": rounds, "steps_per_round": steps, "batch": batch, "seq_len": seq,
            "per_round_ratio": [q / f for f, q in zip(times["fp"], times["qat"])]}


def model_bytes(params: Params, packed: Params) -> dict[str, int]:
    """Bytes of the model in float32, in bfloat16 (norms kept float32) and packed ternary (the
    rest as stored), and of the decoder linears alone in each."""
    def nbytes(tree: Any, itemsize: int | None = None) -> int:
        return sum(int(np.prod(np.shape(x))) * (itemsize or np.dtype(x.dtype).itemsize)
                   for x in jax.tree.leaves(tree))

    linears = {k: params["layers"][k] for k in ternary.LINEARS}
    packed_linears = {k: packed["layers"][k] for k in ternary.LINEARS
                      if isinstance(packed["layers"][k], dict)}
    norms = nbytes({k: v for k, v in params["layers"].items() if k.endswith("norm")}) + \
        nbytes(params["final_norm"])
    return {"fp32": nbytes(params), "bf16": (nbytes(params) - norms) // 2 + norms,
            "packed": nbytes(packed), "linears_fp32": nbytes(linears),
            "linears_bf16": nbytes(linears, 2), "linears_packed": nbytes(packed_linears)}
