"""Token sampling vectorised over decode slots, each slot with its own parameters.

Order and semantics follow Hugging Face transformers' logits processors/warpers (read for ideas:
``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``) and, for the OpenAI fields, vLLM's sampler: first the logit bias and the
allowed-token mask of constrained decoding (a packed bitmask, bit ``t % 32`` of word ``t // 32``
for token t, the layout xgrammar and outlines-core write), then the repetition penalty (positive
logits of tokens seen in prompt or output divided by the penalty, negative ones multiplied), the
frequency and presence penalties (OpenAI: ``logit - count * frequency - (count > 0) * presence``
over generated tokens), then temperature, top-k, top-p. Temperature 0 means greedy (argmax of the
processed logits). A request's randomness is ``fold_in(PRNGKey(seed), step)``, so it
depends only on the request's own seed and how many tokens it has produced, never on which other
requests share the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


# Bounds of the per-request settings. Every entry point (HTTP, launchers, Python) goes through
# SamplingParams, so a value the engine cannot hold (np.int32(2**31) raised OverflowError inside the
# engine thread) or that makes the logits non-finite is refused before a request is queued.
MAX_TEMPERATURE = 100.0  # logits / t stays finite; past ~100 every realistic row is near-uniform
# The repetition penalty divides positive and multiplies negative logits of seen tokens. 1e-300
# rounds to 0.0 in float32 (logits / 0 = inf: every seen token wins, the output is one token
# repeated), so the range is bounded: within [1/100, 100] a penalised logit moves by at most 100x,
# which is already far past any useful setting (HF and vLLM docs use 1.0-1.5) and stays finite.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_SEED = 2**31  # the sampling key is PRNGKey(int32 seed)
MAX_TOP_K = 2**31 - 1  # int32; values >= the vocabulary mean "off" (the engine clamps)
MAX_PENALTY = 2.0  # presence/frequency penalty range [-2, 2], as OpenAI
MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit), a static shape of the decode state
MAX_BIAS_VALUE = 100.0  # |bias|, as OpenAI: +-100 bans or forces a token
# Below this temperature a request decodes greedily (vLLM's _SAMPLING_EPS): logits / 1e-40 would
# overflow float32 and the softmax would be NaN.
GREEDY_BELOW = 1e-5


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """``value`` as an int in ``[lo, hi]``; bools and floats are refused (``True`` is not 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def check_float(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); no bools."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or not (lo < v if lo_open else lo <= v) or v > hi:
        raise ValueError(f"{name} must be a finite number in {'(' if lo_open else '['}{lo}, {hi}], "
                         f"got {value}")
    return v


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (validated here so every entry point gets the same errors)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); ids checked by the engine

    def __post_init__(self) -> None:
        check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        check_int("top_k", self.top_k, 0, MAX_TOP_K)
        check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_float("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY,
                    MAX_REPETITION_PENALTY)
        check_int("seed", self.seed, 0, MAX_SEED - 1)
        check_float("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        check_float("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got "
                             f"{len(self.logit_bias)}")
        for tok, bias in self.logit_bias:
            check_int("logit_bias token id", tok, 0, MAX_TOP_K)
            check_float(f"logit_bias[{tok}]", bias, -MAX_BIAS_VALUE, MAX_BIAS_VALUE)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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


def unpack_mask(mask: jax.Array, vocab: int) -> jax.Array:
    """bool ``[B, vocab]`` from a packed uint32 bitmask ``[B, ceil(vocab / 32)]``."""
    ids = jnp.arange(vocab, dtype=jnp.uint32)
    words = jnp.take(mask.astype(jnp.uint32), (ids >> 5).astype(jnp.int32), axis=1)
    return ((words >> (ids & 31)) & 1).astype(bool)


def process_logits(logits: jax.Array, seen: jax.Array, *, repetition_penalty: jax.Array,
                   counts: jax.Array | None = None, presence_penalty: jax.Array | None = None,
                   frequency_penalty: jax.Array | None = None, bias_ids: jax.Array | None = None,
                   bias_values: jax.Array | None = None, mask: jax.Array | None = None
                   ) -> jax.Array:
    """Logits after bias, mask and penalties (the distribution greedy decoding takes the argmax
    of). ``counts [B, V]``: generated tokens; ``bias_ids``/``bias_values [B, N]`` (id V = none);
    ``mask [B, ceil(V/32)]`` uint32, a 0 bit forbids the token."""
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    if bias_ids is not None:
        logits = logits.at[jnp.arange(B)[:, None], bias_ids].add(bias_values, mode="drop")
    if mask is not None:
        logits = jnp.where(unpack_mask(mask, V), logits, NEG_INF)
    logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if counts is not None:
        c = counts.astype(jnp.float32)
        logits = (logits - frequency_penalty[:, None] * c
                  - presence_penalty[:, None] * (c > 0).astype(jnp.float32))
    return logits


def warp(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
         ) -> jax.Array:
    """Temperature, then top-k and top-p masks: what sampled rows draw from."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    return top_p_mask(top_k_mask(scaled, top_k), top_p)


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """One PRNG key per row ``[B]``: ``fold_in(PRNGKey(seed), step)``, a request's randomness at
    its token number ``step`` (module docstring)."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seed, step)


def step_noise(seed: jax.Array, step: jax.Array, vocab: int) -> jax.Array:
    """Gumbel noise ``[B, vocab]`` of each row's token number ``step``, from its own seed: a
    sampled token is the argmax of its warped logits plus this noise (the Gumbel-max form of
    ``jax.random.categorical``). Written out so that speculative decoding draws every token
    with the very noise plain decoding would (``cpmjax.serve.tree``): a seeded request then gets
    the same tokens whatever the engine, the draft or the batch."""
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(row_keys(seed, step))


def sample(logits: jax.Array, seen: jax.Array, step: jax.Array, *, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array, repetition_penalty: jax.Array,
           seed: jax.Array, **processing: jax.Array | None) -> jax.Array:
    """Next token per row of float32 ``logits [B, V]``; all other arguments are ``[B]`` (``seen`` is
    a ``[B, V]`` bool mask of tokens already in the row's prompt or output). ``processing``: the
    optional arguments of :func:`process_logits` (bias, mask, presence/frequency penalties)."""
    logits = process_logits(logits, seen, repetition_penalty=repetition_penalty, **processing)
    greedy = argmax_last(logits)

    def draw(_: None) -> jax.Array:
        warped = warp(logits, temperature, top_k, top_p)
        drawn = argmax_last(warped + step_noise(seed, step, logits.shape[-1]))
        return jnp.where(temperature > 0, drawn, greedy)

    # The vocabulary sorts of top-k/top-p cost more than a small model's decode step: skip them
    # when every row is greedy.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)


def token_logprobs(logits: jax.Array, tokens: jax.Array, k: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log-probability of ``tokens [B]``, top-k ids ``[B, k]``, their log-probabilities) under
    log_softmax of ``logits [B, V]``; ``k`` is capped at ``V`` (a vocabulary smaller than ``k``
    has only ``V`` alternatives)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top_vals, top_ids = jax.lax.top_k(lp, min(k, lp.shape[-1]))
    return chosen, top_ids.astype(jnp.int32), top_vals
