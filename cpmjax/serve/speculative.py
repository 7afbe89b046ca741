"""Speculative decoding with the MTP/EAGLE draft head (EAGLE, arXiv 2401.15077; CPM.cu): chain drafting, one-shot
verification by the target, lossless acceptance. Pure functions over decode-slot rows; the serving
engine (``cpmjax.serve.engine.SpeculativeEngine``) runs them as its decode step.

A row holds committed tokens x_0..x_m; the target cache holds positions 0..m-1 and ``last`` = x_m
goes at position m (the engine's ``lengths``). The draft cache holds positions 0..m-1: the draft
layer has read every pair (target hidden at i, x_{i+1}) up to i = m-1, and ``h`` is its output
there, the feature of its first proposal. One round, per row:

1. draft: d_0 comes from ``h``; then the draft layer reads (its own output feature, d_{j-1}) at
   position m-1+j and proposes d_j, EAGLE-style, for 0 < j < k. FR-Spec restricts its head to a
   vocabulary subset;
2. ONE target forward over [x_m, d_0..d_{k-1}] at positions m..m+k gives the target distributions
   p_0..p_k and hidden states;
3. acceptance (Leviathan et al. 2023, arXiv:2211.17192, Thm. 1): accept d_i with probability
   min(1, p_i(d_i)/q_i(d_i)); on the first rejection resample from norm(max(0, p_n - q_n)); after
   k acceptances the bonus token is drawn from p_k. q is zero outside an FR-Spec subset, so every
   token outside it keeps its full p mass in the residual. A greedy row uses one-hot p (at the
   target's argmax) and one-hot q (at the draft's argmax): the same rule then accepts exactly the
   drafts equal to the target's argmax and emits the argmax at the first mismatch, which is plain
   greedy decoding token for token;
4. catch-up: the draft layer re-reads the accepted pairs (target hidden at m+j, token m+j+1) for
   j <= n at positions m..m+n, overwriting what its own proposals wrote; its output at m+n is the
   next round's ``h``. So a round costs k draft-layer passes (k-1 proposals + 1 catch-up) and one
   target pass; the engine's insert does the prompt's last pair once.

Both caches are position-addressed, so rejected entries are simply overwritten later; idle rows
use position -1, which is never written. Rows are independent: each has its own sampling
parameters and a key derived from its own seed and token count.

"Mean accept length" is as CPM.cu prints it: (accepted draft tokens + 1) per verify step, averaged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cpmjax.config import ModelConfig
from cpmjax.model import forward
from cpmjax.model.cache import CACHE_FIELDS, KVCache, kv_shape
from cpmjax.model.mtp import draft_feature, draft_logits, mtp_block
from cpmjax.model.params import Params
from cpmjax.quant.qforward import dense_draft, layer_transform_for
from cpmjax.serve.sampling import argmax_last, top_k_mask, top_p_mask
from cpmjax.sparse.cache import init_compressed

# "k", "v": [B, S, KV, hd]; sparse models also "kc1", "kc2" (compressed keys, [B, N, KV, hd]);
# "h": [B, d] draft feature of d_0
DraftCache = dict[str, jax.Array]


def accept_chain(p: jax.Array, q: jax.Array, draft: jax.Array, keys: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """(number of accepted drafts n [B], next token [B]) from target probs ``p [B,k+1,V]``, draft
    probs ``q [B,k,V]`` (full vocab, zero off the draft's support), drafts ``draft [B,k]`` and one
    PRNG key per row ``keys [B]``."""
    return jax.vmap(_accept_row)(p, q, draft, keys)


def _accept_row(p: jax.Array, q: jax.Array, draft: jax.Array, key: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    k = draft.shape[0]
    k_u, k_r = jax.random.split(key)
    p_at, q_at = p[jnp.arange(k), draft], q[jnp.arange(k), draft]
    ok = jax.random.uniform(k_u, (k,)) * q_at < p_at
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    q_n = jnp.concatenate([q, jnp.zeros_like(q[:1])])[n]  # after k accepts: residual = p_k
    resid = jnp.maximum(p[n] - q_n, 0.0)
    resid = jnp.where(resid.sum() > 0, resid, p[n])  # p == q exactly: no rejection was possible
    return n, jax.random.categorical(k_r, jnp.log(resid)).astype(jnp.int32)


class RowSampling(NamedTuple):
    """Per-row sampling settings of the rows in a round (``[B]`` each; temperature 0 = greedy)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def target_probs(logits: jax.Array, s: RowSampling) -> jax.Array:
    """Target distributions ``[B, T, V]`` that the engine's plain sampler draws from: one-hot at the
    argmax for greedy rows, else softmax of the temperature-scaled, top-k/top-p-masked logits."""
    B, T, V = logits.shape
    greedy = jax.nn.one_hot(argmax_last(logits), V, dtype=jnp.float32)

    def warped(_: None) -> jax.Array:
        flat = logits.reshape(B * T, V) / jnp.where(s.temperature > 0, s.temperature, 1.0
                                                    ).repeat(T)[:, None]
        flat = top_p_mask(top_k_mask(flat, s.top_k.repeat(T)), s.top_p.repeat(T))
        probs = jax.nn.softmax(flat, axis=-1).reshape(B, T, V)
        return jnp.where((s.temperature > 0)[:, None, None], probs, greedy)

    # the vocabulary sorts of top-k/top-p cost more than a small model's step: skip when all greedy
    return jax.lax.cond(jnp.any(s.temperature > 0), warped, lambda _: greedy, None)


def draft_sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array,
                 vocab_ids: jax.Array | None, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """(draft token [B], its distribution q over the FULL vocabulary [B, V]) from draft-head
    ``logits [B, N]`` (N = len(vocab_ids) with FR-Spec): the argmax for greedy rows, a sample of
    softmax(logits / T) otherwise."""
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    drawn = jax.vmap(jax.random.categorical)(keys, logits / t)
    idx = jnp.where(temperature > 0, drawn, argmax_last(logits))
    probs = jnp.where((temperature > 0)[:, None], jax.nn.softmax(logits / t, axis=-1),
                      jax.nn.one_hot(idx, logits.shape[-1], dtype=jnp.float32))
    if vocab_ids is None:
        return idx.astype(jnp.int32), probs
    full = jnp.zeros((logits.shape[0], vocab_size), probs.dtype).at[:, vocab_ids].set(probs)
    return vocab_ids[idx].astype(jnp.int32), full


def accept_greedy(logits: jax.Array, draft: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`accept_chain` for rows that are all greedy, without building distributions: the
    drafts equal to the target's argmax up to the first mismatch, then the argmax there."""
    best = argmax_last(logits)  # [B, k+1]
    n = jnp.sum(jnp.cumprod((draft == best[:, :-1]).astype(jnp.int32), axis=-1), axis=-1)
    return n, best[jnp.arange(best.shape[0]), n]


class RoundOut(NamedTuple):
    """What one round leaves: caches, and per row the tokens to emit and the next round's inputs."""

    cache: KVCache
    draft: DraftCache
    tokens: jax.Array  # int32 [B, k+1]: tokens[:, :count] are new, in order
    count: jax.Array  # int32 [B]: accepted drafts + 1 (0 for idle rows)
    last: jax.Array  # int32 [B]: the newest token, not yet in the target cache
    # int32 [B]: what a chain round would have emitted per row, read off a tree round
    # (``cpmjax.serve.tree.chain_tokens``; None for other rounds)
    chain: jax.Array | None = None


def speculative_round(params: Params, draft_params: Params, cfg: ModelConfig, k: int,
                      cache: KVCache, draft: DraftCache, last: jax.Array, lengths: jax.Array,
                      keys: jax.Array, sampling: RowSampling, vocab_ids: jax.Array | None,
                      dtype: Any = jnp.float32, all_greedy: bool = False,
                      kv_len: int | None = None, kernels: dict[str, str] | None = None,
                      form: str = "mtp", head: jax.Array | None = None) -> RoundOut:
    """Draft k tokens, verify them in one target step and accept (see the module docstring).

    ``lengths [B]`` is where ``last`` goes in the target cache (-1: idle row); ``keys [B]`` one
    PRNG key per row, fresh every round. ``all_greedy`` (static) promises every row is greedy:
    drafts and acceptance then use argmaxes only (same tokens, no vocabulary-sized sampling work,
    which dominates a small model's round). ``kv_len`` (static) bounds the cache positions both
    models' attention reads; it must exceed every position the round writes (lengths + k).
    ``kernels`` (static): ``attn_impl``/``sparse_impl`` for the verification forward pass.
    ``form`` (static): the draft head's form (``cpmjax.model.mtp.DRAFT_FORMS``). ``head``:
    the FR-Spec head's weight, gathered already (``cpmjax.serve.frspec.frspec_head``).
    """
    B = last.shape[0]
    active = lengths >= 0
    draft_params = dense_draft(draft_params, cfg, dtype)
    step_keys = jax.vmap(lambda key: jax.random.split(key, k + 1))(keys)  # [B, k+1]
    h, kv = draft["h"], draft_kv(draft)
    drafts, qs = [], []
    for j in range(k):
        if j > 0:  # the draft reads its own previous proposal
            pos = jnp.where(active, lengths - 1 + j, -1)[:, None]
            h, kv = mtp_block(draft_params, params, cfg, h[:, None].astype(dtype),
                              tok[:, None], pos, cache_kv=kv, kv_len=kv_len)
            h = h[:, 0]
        logits = draft_logits(params, cfg, h[:, None], form, vocab_ids, head)[:, 0]
        if all_greedy:
            tok = argmax_last(logits)
            tok = tok if vocab_ids is None else vocab_ids[tok]
        else:
            tok, q = draft_sample(logits, step_keys[:, j], sampling.temperature, vocab_ids,
                                  cfg.vocab_size)
            qs.append(q)
        drafts.append(tok)
    drafted = jnp.stack(drafts, 1)
    ar = jnp.arange(k + 1)[None]
    out = forward(params, cfg, jnp.concatenate([last[:, None], drafted], 1),
                  positions=jnp.where(active[:, None], lengths[:, None] + ar, -1), cache=cache,
                  dtype=dtype, layer_transform=layer_transform_for(params, cfg, dtype),
                  kv_len=kv_len, stepwise=True, **(kernels or {}))
    if all_greedy:
        n, nxt = accept_greedy(out.logits, drafted)
    else:
        n, nxt = accept_chain(target_probs(out.logits, sampling), jnp.stack(qs, 1), drafted,
                              step_keys[:, k])
    new = jnp.concatenate([drafted, drafted[:, :1]], 1).at[jnp.arange(B), n].set(nxt)
    catch_up = jnp.where(active[:, None] & (ar <= n[:, None]), lengths[:, None] + ar, -1)
    hc, kv = mtp_block(draft_params, params, cfg, draft_feature(params, cfg, out.hidden, form),
                       new, catch_up, cache_kv=kv, kv_len=kv_len)
    h_next = jnp.where(active[:, None], hc[jnp.arange(B), n], draft["h"])
    return RoundOut(out.cache, with_kv(draft, kv, h_next.astype(draft["h"].dtype)),
                    new, jnp.where(active, n + 1, 0), jnp.where(active, nxt, last))


def init_draft_cache(cfg: ModelConfig, batch: int, max_len: int,
                     dtype: Any = jnp.float32) -> DraftCache:
    """The draft layer's own KV cache (`cpmjax.model.cache.kv_shape`, with the compressed keys
    of a sparse model, so its multi-token writes update them in O(new tokens)) and its per-row
    output feature ``[B, d]`` (during prefill: the draft's feature of the target's hidden state at
    the prompt's last token)."""
    shape = kv_shape(cfg, batch, max_len)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
             "h": jnp.zeros((batch, cfg.hidden_size), jnp.float32)}
    if cfg.sparse_config is not None:
        cache["kc1"], cache["kc2"] = init_compressed(cfg.sparse_config, batch, max_len,
                                                     cfg.num_key_value_heads, cfg.head_dim)
    return cache


def draft_kv(draft: DraftCache) -> tuple[jax.Array, ...]:
    """The draft layer's cache tuple as `mtp_block` takes it (the model's cache field order)."""
    return tuple(draft[n] for n in CACHE_FIELDS if n in draft)


def with_kv(draft: DraftCache, kv: tuple[jax.Array, ...], h: jax.Array) -> DraftCache:
    """``draft`` with the cache tuple ``kv`` (from `mtp_block`) and the feature ``h`` (other
    entries, such as a tree engine's pending pairs, kept)."""
    return {**draft, **dict(zip([n for n in CACHE_FIELDS if n in draft], kv)), "h": h}
