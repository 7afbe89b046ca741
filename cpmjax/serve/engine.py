"""Decode engine with the JetStream contract: ``prefill`` / ``insert`` / ``generate``.

The contract follows JetStream's ``engine_api.Engine`` (archived Feb 2026; ideas only): a prompt is prefilled into its own
prefix cache, ``insert`` copies that prefix into one slot of a preallocated decode cache, and one
jitted ``generate`` step advances every slot at once. Shapes never depend on a request:

* prefill runs fixed-length chunks (``chunk`` tokens; the tail chunk is padded with position -1,
  which the model's cache does not write), so one compilation serves every prompt length;
* the decode cache is ``[L, max_slots, max_len, KV, hd]``; an idle slot has length -1, so its
  token writes nothing and its output is ignored. Stale keys left by a previous request in a slot
  need no clearing: the model masks cache entries at positions after the query
  (``cpmjax.model.attention.attention_mask``) and a new prompt overwrites the positions before it.

Attention goes through ``cpmjax.model.forward``, so whatever attention the model uses (dense,
cuDNN, InfLLM v2 sparse) the engine inherits; params quantized by ``cpmjax.quant`` (int8/int4,
RTN/GPTQ/P-GPTQ) run with each layer dequantized on the fly inside the layer scan. Every jitted
function counts its traces in ``compilations`` so tests and ``/metrics`` can show the number of
compilations stays fixed.

Per-slot request settings live in the decode state (sampling, OpenAI presence/frequency
penalties over the slot's generated-token counts, a logit bias of up to ``MAX_LOGIT_BIAS``
entries), and every step takes a per-slot allowed-token bitmask (constrained decoding; all ones
when unconstrained), applied to the logits inside the jitted step. Log-probabilities are computed
on device in the same step, for the slots that ask (``want_logprobs``): by default the model's raw
log-softmax before any processing (vLLM's default ``logprobs_mode="raw_logprobs"``, what
loglikelihood evaluation needs), or with ``logprobs_mode="processed"`` the distribution actually
sampled from (after bias, mask, penalties, temperature, top-k, top-p). Prompt log-probabilities
(``prefill_chunks(..., prompt_logprobs=True)``) come from the prefill chunks' own logits.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model import forward, init_cache, lm_head
from cpmjax.model.attention import check_kernel_names
from cpmjax.model.cache import KVCache
from cpmjax.model.params import Params
from cpmjax.quant.qforward import layer_transform_for
from cpmjax.serve.sampling import (MAX_LOGIT_BIAS, SamplingParams, process_logits, sample,
                                   token_logprobs, warp)

TOP_LOGPROBS = 20  # alternatives computed per token (static); requests take the first N
LOGPROBS_MODES = ("raw", "processed")


class Prefix(NamedTuple):
    """A prefilled prompt, ready for ``insert``."""

    cache: KVCache  # [L, 1, max_len, KV, hd]
    logits: jax.Array  # float32 [V], at the prompt's last token
    seen: jax.Array  # bool [V], tokens of the prompt (for the repetition penalty)
    length: int
    draft: Any = None  # speculative engines: the draft's prefix cache (``init_draft_cache``, B=1)
    # with prefill_chunks(prompt_logprobs=True): numpy (logprob [n-1], top ids [n-1, K], top
    # logprobs [n-1, K]) of prompt tokens 1..n-1, each under the model given the tokens before it
    prompt_logprobs: Any = None


class StepLogprobs(NamedTuple):
    """Log-probabilities of each slot's newest token: ``token [B]``, ``top_ids``/``top [B, K]``."""

    token: jax.Array
    top_ids: jax.Array
    top: jax.Array


class DecodeState(NamedTuple):
    """Everything the decode step reads, one row per slot."""

    cache: KVCache  # [L, B, max_len, KV, hd]
    tokens: jax.Array  # int32 [B], the last sampled token (not yet in the cache)
    lengths: jax.Array  # int32 [B], where ``tokens`` goes in the cache; -1 = idle slot
    steps: jax.Array  # int32 [B], tokens generated so far (the sampling key's counter)
    seen: jax.Array  # bool [B, V]
    temperature: jax.Array  # float32 [B]
    top_k: jax.Array  # int32 [B]
    top_p: jax.Array  # float32 [B]
    repetition_penalty: jax.Array  # float32 [B]
    seed: jax.Array  # int32 [B]
    counts: Any = None  # int32 [B, V]: generated tokens (presence/frequency penalties)
    presence_penalty: Any = None  # float32 [B]
    frequency_penalty: Any = None  # float32 [B]
    bias_ids: Any = None  # int32 [B, MAX_LOGIT_BIAS], V = unused entry
    bias_values: Any = None  # float32 [B, MAX_LOGIT_BIAS]
    want_logprobs: Any = None  # bool [B]
    logprobs: Any = None  # StepLogprobs of each slot's newest token (where want_logprobs)
    draft: Any = None  # speculative engines: the draft's cache and features, one row per slot


def pow2_bucket(n: int, lo: int) -> int:
    """Smallest ``lo * 2**i`` that is >= n: few distinct shapes, so few compilations."""
    b = lo
    while b < n:
        b *= 2
    return b


_SETTINGS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "presence_penalty",
             "frequency_penalty", "bias_ids", "bias_values", "want_logprobs")


def sampling_kwargs(state: Any, mask: jax.Array) -> dict[str, jax.Array]:
    """The arguments of ``sample`` from the per-slot settings of ``state`` (a DecodeState or a
    dict of the same fields)."""
    get = state.get if isinstance(state, dict) else lambda k: getattr(state, k)
    kw = {k: get(k) for k in _SETTINGS if k != "want_logprobs"}
    return {**kw, "counts": get("counts"), "mask": mask}


class DecodeEngine:
    """Jitted prefill/insert/generate for one model config and one static batch shape."""

    def __init__(self, cfg: ModelConfig, *, max_slots: int = 8, max_len: int | None = None,
                 chunk: int = 64, dtype: Any = jnp.float32, kv_bucket: int | None = 128,
                 logprobs_mode: str = "raw", attn_impl: str = "auto",
                 sparse_impl: str = "auto") -> None:
        check_kernel_names(attn_impl, sparse_impl)
        max_len = cfg.max_position_embeddings if max_len is None else max_len
        if max_slots < 1 or chunk < 1:
            raise ValueError(f"max_slots and chunk must be >= 1, got {max_slots}, {chunk}")
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got "
                             f"{logprobs_mode!r}")
        if kv_bucket is not None and kv_bucket < 1:
            raise ValueError(f"kv_bucket must be >= 1 or None, got {kv_bucket}")
        if not 1 < max_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_len must be in (1, max_position_embeddings="
                             f"{cfg.max_position_embeddings}], got {max_len}")
        self.cfg, self.max_slots, self.max_len, self.chunk = cfg, max_slots, max_len, chunk
        self.dtype, self.kv_bucket, self.logprobs_mode = dtype, kv_bucket, logprobs_mode
        # attention kernels by name for the plain forward passes (cpmjax.model.attention)
        self.kernels = {"attn_impl": attn_impl, "sparse_impl": sparse_impl}
        self.mask_words = -(-cfg.vocab_size // 32)
        self._no_mask: jax.Array | None = None  # all-ones mask, made once on first use
        self.compilations: collections.Counter[str] = collections.Counter()
        # what a speculative engine's jitted steps take besides the target params (a jit argument,
        # so swapping drafts of one shape recompiles nothing); None for plain decoding
        self.draft_args: Any = None
        self.speculative_k: int | None = None
        self._prefill_chunk = self._jit("prefill", self._prefill_chunk_impl, donate=(2, 3, 4),
                                        static=(9, 10))
        self._insert = self._jit("insert", self._insert_impl, donate=(2,))
        self._generate = self._jit("generate", self._generate_impl, donate=(2,), static=(3,))
        self._release = self._jit("release", self._release_impl, donate=(0,))

    def _jit(self, name: str, fn: Callable[..., Any], donate: tuple[int, ...],
             static: tuple[int, ...] = ()) -> Callable[..., Any]:
        """``jax.jit`` that counts its traces (one per compilation) under ``name``."""

        @functools.wraps(fn)
        def counted(*args: Any) -> Any:
            self.compilations[name] += 1
            return fn(*args)

        return jax.jit(counted, donate_argnums=donate, static_argnums=static)

    @property
    def total_compilations(self) -> int:
        return sum(self.compilations.values())

    # ---- prefill -------------------------------------------------------------------------
    def _prefill_chunk_impl(self, params: Params, draft_args: Any, cache: KVCache,
                            seen: jax.Array, draft: Any, tokens: jax.Array, positions: jax.Array,
                            last: jax.Array, next_tokens: jax.Array, kv_len: int,
                            prompt_logprobs: bool
                            ) -> tuple[KVCache, jax.Array, jax.Array, Any, Any]:
        out = forward(params, self.cfg, tokens, positions=positions, cache=cache, dtype=self.dtype,
                      return_logits=False, kv_len=kv_len, **self.kernels,
                      layer_transform=layer_transform_for(params, self.cfg, self.dtype))
        logits = lm_head(params, self.cfg, out.hidden[:, last][:, None])[0, 0]
        V = seen.shape[0]
        seen = seen.at[jnp.where(positions[0] >= 0, tokens[0], V)].set(True, mode="drop")
        draft = self._draft_prefill(params, draft_args, draft, out.hidden, next_tokens,
                                    positions, last, kv_len)
        plp = None
        if prompt_logprobs:  # every chunk position's next prompt token under the model
            all_logits = lm_head(params, self.cfg, out.hidden)[0]
            plp = token_logprobs(all_logits, jnp.maximum(next_tokens[0], 0), TOP_LOGPROBS)
        return out.cache, logits, seen, draft, plp

    def _draft_prefill(self, params: Params, draft_args: Any, draft: Any,
                       hidden: jax.Array, next_tokens: jax.Array, positions: jax.Array,
                       last: jax.Array, kv_len: int) -> Any:
        """Hook for engines that keep a draft model in step with the prompt; nothing here."""
        return draft

    def _init_prefix_draft(self) -> Any:
        return None

    def prefill(self, params: Params, tokens: list[int]) -> Prefix:
        """Run the prompt through the model in fixed-size chunks; returns its prefix cache."""
        *_, prefix = self.prefill_chunks(params, tokens)
        return prefix

    def prefill_chunks(self, params: Params, tokens: list[int], prompt_logprobs: bool = False
                       ) -> Iterator[Prefix | None]:
        """``prefill`` one chunk per ``next``: ``None`` after every chunk but the last, then the
        ``Prefix``. Lets a scheduler run decode steps between the chunks of a long prompt.
        ``prompt_logprobs``: also the log-probabilities of the prompt's tokens (``Prefix``)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("prompt must contain at least one token")
        if n >= self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit the context of {self.max_len} "
                             f"(at least one position must remain for generation)")
        return self._prefill_chunks(params, tokens, prompt_logprobs)

    def _prefill_chunks(self, params: Params, tokens: list[int], prompt_logprobs: bool
                        ) -> Iterator[Prefix | None]:
        n = len(tokens)
        cache = init_cache(self.cfg, 1, self.max_len, self.dtype)
        seen = jnp.zeros((self.cfg.vocab_size,), bool)
        draft = self._init_prefix_draft()
        parts = []
        for start in range(0, n, self.chunk):
            piece = tokens[start:start + self.chunk]
            m = len(piece)
            tok = np.zeros((1, self.chunk), np.int32)
            tok[0, :m] = piece
            nxt = np.full((1, self.chunk), -1, np.int32)  # token after each one; -1: not known yet
            nxt[0, :m] = list(tokens[start + 1:start + m + 1]) + [-1] * (start + m == n)
            pos = np.full((1, self.chunk), -1, np.int32)
            pos[0, :m] = np.arange(start, start + m)
            cache, logits, seen, draft, plp = self._prefill_chunk(
                params, self.draft_args, cache, seen, draft, tok, pos, np.int32(m - 1), nxt,
                self._span(start + m), prompt_logprobs)
            if plp is not None:
                parts.append([np.asarray(x)[:m] for x in plp])
            if start + m < n:
                yield None
        plps = None
        if parts:  # position i holds token i+1's logprob; the last position has no next token
            plps = tuple(np.concatenate([p[j] for p in parts])[:n - 1] for j in range(3))
        yield Prefix(cache, logits, seen, n, draft, plps)

    # ---- decode state --------------------------------------------------------------------
    def init_decode_state(self) -> DecodeState:
        B, V = self.max_slots, self.cfg.vocab_size
        # Distinct buffers for every field: the jitted steps donate the whole state.
        def zi() -> jax.Array:
            return jnp.zeros((B,), jnp.int32)

        def zf() -> jax.Array:
            return jnp.zeros((B,), jnp.float32)

        K = min(TOP_LOGPROBS, V)  # token_logprobs returns at most V alternatives
        return DecodeState(cache=init_cache(self.cfg, B, self.max_len, self.dtype), tokens=zi(),
                           lengths=jnp.full((B,), -1, jnp.int32), steps=zi(),
                           seen=jnp.zeros((B, V), bool), temperature=zf(),
                           top_k=zi(), top_p=jnp.ones((B,), jnp.float32),
                           repetition_penalty=jnp.ones((B,), jnp.float32), seed=zi(),
                           counts=jnp.zeros((B, V), jnp.int32), presence_penalty=zf(),
                           frequency_penalty=zf(),
                           bias_ids=jnp.full((B, MAX_LOGIT_BIAS), V, jnp.int32),
                           bias_values=jnp.zeros((B, MAX_LOGIT_BIAS), jnp.float32),
                           want_logprobs=jnp.zeros((B,), bool),
                           logprobs=StepLogprobs(zf(), jnp.zeros((B, K), jnp.int32),
                                                 jnp.zeros((B, K), jnp.float32)))

    def _logprobs(self, raw: jax.Array, processed: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array, tokens: jax.Array, want: jax.Array,
                  previous: StepLogprobs) -> StepLogprobs:
        """Log-probabilities of ``tokens`` (rows that ``want`` them; others keep ``previous``),
        computed only when some row wants them."""
        def compute(_: None) -> StepLogprobs:
            if self.logprobs_mode == "raw":
                dist = raw
            else:  # what was sampled from: greedy rows the processed logits, others warped
                dist = jnp.where((temperature > 0)[:, None],
                                 warp(processed, temperature, top_k, top_p), processed)
            new = StepLogprobs(*token_logprobs(dist, tokens, TOP_LOGPROBS))
            return jax.tree.map(lambda n, p: jnp.where(
                want.reshape((-1,) + (1,) * (n.ndim - 1)), n, p), new, previous)

        return jax.lax.cond(jnp.any(want), compute, lambda _: previous, None)

    def _insert_impl(self, params: Params, draft_args: Any, state: DecodeState,
                     prefix_cache: KVCache, prefix_draft: Any, logits: jax.Array, seen: jax.Array,
                     length: jax.Array, slot: jax.Array, settings: dict[str, jax.Array],
                     mask: jax.Array) -> tuple[DecodeState, jax.Array]:
        V = self.cfg.vocab_size
        row = {k: v[None] for k, v in settings.items()}
        counts = jnp.zeros((1, V), jnp.int32)
        kw = sampling_kwargs({**row, "counts": counts}, mask[None])
        raw = logits[None].astype(jnp.float32)
        first = sample(raw, seen[None], jnp.zeros((1,), jnp.int32), **kw)[0]
        processed = process_logits(raw, seen[None], **{
            k: kw[k] for k in ("repetition_penalty", "counts", "presence_penalty",
                               "frequency_penalty", "bias_ids", "bias_values", "mask")})
        lp = self._logprobs(raw, processed, row["temperature"], row["top_k"], row["top_p"],
                            first[None], row["want_logprobs"],
                            jax.tree.map(lambda x: x[slot][None], state.logprobs))
        cache = {k: jax.lax.dynamic_update_slice_in_dim(state.cache[k], prefix_cache[k], slot,
                                                        axis=1) for k in state.cache}
        prefix_draft = self._draft_insert(params, draft_args, prefix_draft, first, length)
        draft = jax.tree.map(lambda s, p: jax.lax.dynamic_update_slice_in_dim(s, p, slot, axis=0),
                             state.draft, prefix_draft)
        new = state._replace(
            cache=cache, draft=draft, tokens=state.tokens.at[slot].set(first),
            lengths=state.lengths.at[slot].set(length), steps=state.steps.at[slot].set(1),
            seen=state.seen.at[slot].set(seen.at[first].set(True)),
            counts=state.counts.at[slot].set(counts[0].at[first].set(1)),
            logprobs=jax.tree.map(lambda s, n: s.at[slot].set(n[0]), state.logprobs, lp),
            **{k: getattr(state, k).at[slot].set(v) for k, v in settings.items()})
        return new, first

    def _draft_insert(self, params: Params, draft_args: Any, prefix_draft: Any, first: jax.Array,
                      length: jax.Array) -> Any:
        """Hook for engines with a draft model: let it read the first sampled token (none here)."""
        return prefix_draft

    def insert(self, params: Params, prefix: Prefix, state: DecodeState, slot: int,
               sampling: SamplingParams = SamplingParams(), *, mask: Any = None,
               want_logprobs: bool = False) -> tuple[DecodeState, jax.Array]:
        """Put a prefilled prompt into ``slot``; returns the new state and the first token.
        ``mask``: allowed first tokens (packed uint32 ``[ceil(V/32)]``); ``want_logprobs``: keep
        this slot's token log-probabilities in ``state.logprobs`` every step."""
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot must be in [0, {self.max_slots}), got {slot}")
        V = self.cfg.vocab_size
        bad = [t for t, _ in sampling.logit_bias if t >= V]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {V})")
        bias_ids = np.full((MAX_LOGIT_BIAS,), V, np.int32)
        bias_values = np.zeros((MAX_LOGIT_BIAS,), np.float32)
        for i, (t, b) in enumerate(sampling.logit_bias):
            bias_ids[i], bias_values[i] = t, b
        settings = {
            "temperature": np.float32(0.0 if sampling.greedy else sampling.temperature),
            "top_k": np.int32(min(sampling.top_k, V)), "top_p": np.float32(sampling.top_p),
            "repetition_penalty": np.float32(sampling.repetition_penalty),
            "seed": np.int32(sampling.seed),
            "presence_penalty": np.float32(sampling.presence_penalty),
            "frequency_penalty": np.float32(sampling.frequency_penalty),
            "bias_ids": bias_ids, "bias_values": bias_values,
            "want_logprobs": np.bool_(want_logprobs)}
        mask = self.full_mask()[0] if mask is None else np.asarray(mask, np.uint32)
        return self._insert(params, self.draft_args, state, prefix.cache, prefix.draft,
                            prefix.logits, prefix.seen, np.int32(prefix.length), np.int32(slot),
                            settings, mask)

    def full_mask(self) -> jax.Array:
        """The all-allowed token bitmask ``[max_slots, ceil(V/32)]`` (made once, kept on device)."""
        if self._no_mask is None:
            self._no_mask = jnp.full((self.max_slots, self.mask_words), 0xFFFFFFFF, jnp.uint32)
        return self._no_mask

    # ---- generate ------------------------------------------------------------------------
    def speculation(self) -> dict[str, Any] | None:
        """What this engine speculates with, for ``/metrics`` (None: it does not)."""
        return None

    def kv_span(self, context: int | None) -> int:
        """Cache positions a decode step reads (static, one compilation each): the smallest of
        ``kv_bucket * 2**i`` (capped at ``max_len``) holding every position the step writes when
        the longest busy slot holds ``context`` tokens (its newest not yet cached). Reading the
        whole ``max_len`` cache made a 100-token request in a 1024-token engine pay for 1024.
        ``None`` (or ``kv_bucket=None``): the whole cache."""
        return self.max_len if context is None else self._span(context + (self.speculative_k or 0))

    def _span(self, need: int) -> int:
        """The smallest span of the ``kv_bucket * 2**i`` series (capped at ``max_len``) >= need."""
        if self.kv_bucket is None:
            return self.max_len
        return min(pow2_bucket(need, self.kv_bucket), self.max_len)

    def _generate_impl(self, params: Params, draft_args: Any, state: DecodeState, kv_len: int,
                       mask: jax.Array) -> tuple[DecodeState, jax.Array, jax.Array]:
        del draft_args
        active = state.lengths >= 0
        out = forward(params, self.cfg, state.tokens[:, None], positions=state.lengths[:, None],
                      cache=state.cache, dtype=self.dtype, kv_len=kv_len, **self.kernels,
                      layer_transform=layer_transform_for(params, self.cfg, self.dtype))
        raw = out.logits[:, 0].astype(jnp.float32)
        kw = sampling_kwargs(state, mask)
        nxt = sample(raw, state.seen, state.steps, **kw)
        processed = process_logits(raw, state.seen, **{
            k: kw[k] for k in ("repetition_penalty", "counts", "presence_penalty",
                               "frequency_penalty", "bias_ids", "bias_values", "mask")}) \
            if self.logprobs_mode == "processed" else raw
        lp = self._logprobs(raw, processed, state.temperature, state.top_k, state.top_p, nxt,
                            state.want_logprobs & active, state.logprobs)
        V = self.cfg.vocab_size
        rows, cols = jnp.arange(self.max_slots), jnp.where(active, nxt, V)
        new = state._replace(cache=out.cache, tokens=nxt, logprobs=lp,
                             seen=state.seen.at[rows, cols].set(True, mode="drop"),
                             counts=state.counts.at[rows, cols].add(1, mode="drop"),
                             lengths=jnp.where(active, state.lengths + 1, -1),
                             steps=state.steps + active.astype(jnp.int32))
        return new, nxt[:, None], active.astype(jnp.int32)

    def generate(self, params: Params, state: DecodeState, all_greedy: bool = False,
                 context: int | None = None, mask: Any = None
                 ) -> tuple[DecodeState, jax.Array, jax.Array]:
        """One decode step for every slot: (new state, tokens ``[B, W]``, counts ``[B]``); slot b
        produced ``tokens[b, :counts[b]]`` in order (W = 1 here; speculative engines emit up to
        k+1 per step). Idle slots have count 0. ``all_greedy`` is a hint that every busy slot
        samples at temperature 0 (the plain step needs none: its sampler branches on device).
        ``context``: the most tokens any busy slot holds (prompt + generated), which lets the
        step read only the cache positions in use (`kv_span`); None reads the whole cache.
        ``mask``: allowed tokens per slot, packed uint32 ``[B, ceil(V/32)]`` (None: all)."""
        mask = self.full_mask() if mask is None else mask
        return self._generate(params, self.draft_args, state, self.kv_span(context), mask)

    def check_sampling(self, sampling: SamplingParams) -> None:
        """Raise ``ValueError`` for sampling settings this engine cannot honour (none here)."""

    def _release_impl(self, state: DecodeState, slot: jax.Array) -> DecodeState:
        return state._replace(lengths=state.lengths.at[slot].set(-1))

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        """Mark ``slot`` idle so the decode step stops writing to it."""
        return self._release(state, np.int32(slot))
