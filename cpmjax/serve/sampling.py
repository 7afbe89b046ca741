"""Token sampling vectorised over decode slots, each slot with its own parameters.

Order and semantics follow Hugging Face transformers' logits processors/warpers (read for ideas:
``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``): repetition penalty first (positive logits of seen tokens divided by the
penalty, negative ones multiplied), then temperature, top-k, top-p. Temperature 0 means greedy
(argmax of the penalised logits). A request's randomness is ``fold_in(PRNGKey(seed), step)``, so it
depends only on the request's own seed and how many tokens it has produced, never on which other
requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (validated here so every entry point gets the same errors)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not (0 <= self.seed < 2**31):
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")


def argmax_last(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` (the first index of the maximum) as int32, computed as a max and a
    min: XLA on CPU lowers argmax to a variadic (value, index) reduce that ran 4.6x slower than
    these two plain reductions on [32, 4096] logits (0.60 vs 0.13 ms, an ad-hoc timing on the
    2-core CPU; the decode rows of ``launch/bench.py decode`` include its effect); decoding takes
    one per token. Rows containing NaN give the last index instead of the NaN's."""
    m = jnp.max(x, axis=-1, keepdims=True)
    V = x.shape[-1]
    first = jnp.min(jnp.where(x == m, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(first, V - 1)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF semantics over tokens seen (prompt and output): ``l/p`` if ``l > 0`` else ``l*p``."""
    p = penalty[:, None]
    penalised = jnp.where(logits > 0, logits / p, logits * p)
    return jnp.where(seen, penalised, logits)


def top_k_mask(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keep the ``k`` largest logits per row (ties at the k-th value kept, as HF); ``k=0`` keeps all."""
    V = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(sorted_desc, jnp.clip(k - 1, 0, V - 1)[:, None], axis=-1)
    keep = (logits >= kth) | (k[:, None] <= 0)
    return jnp.where(keep, logits, NEG_INF)


def top_p_mask(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (top token always)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < p[:, None]) | (jnp.arange(logits.shape[-1]) == 0)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    return jnp.where(keep, logits, NEG_INF)


def sample(logits: jax.Array, seen: jax.Array, step: jax.Array, *, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array, repetition_penalty: jax.Array,
           seed: jax.Array) -> jax.Array:
    """Next token per row of float32 ``logits [B, V]``; all other arguments are ``[B]`` (``seen`` is
    a ``[B, V]`` bool mask of tokens already in the row's prompt or output)."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, repetition_penalty)
    greedy = argmax_last(logits)

    def draw(_: None) -> jax.Array:
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        warped = top_p_mask(top_k_mask(scaled, top_k), top_p)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seed, step)
        drawn = jax.vmap(jax.random.categorical)(keys, warped).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # The vocabulary sorts of top-k/top-p cost more than a small model's decode step: skip them
    # when every row is greedy.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
