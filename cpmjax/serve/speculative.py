"""Speculative decoding with the MTP/EAGLE draft head (spec §3.2): chain drafting, one-shot
verification by the target, lossless acceptance.

Each round, per row (committed tokens x_0..x_{m-1}; the target cache holds positions 0..m-2):

1. the draft proposes d_0..d_{k-1} (its first hidden state comes from the previous catch-up, the
   next ones feed its own output feature back, EAGLE-style; FR-Spec restricts its head to a vocab
   subset);
2. ONE target forward over [x_{m-1}, d_0..d_{k-1}] at positions m-1..m-1+k gives the target
   distributions p_0..p_k and hidden states;
3. acceptance: greedy = longest prefix with d_i == argmax p_i, plus the bonus argmax p_n;
   sampling = accept d_i with probability min(1, p_i(d_i)/q_i(d_i)), on the first rejection
   resample from norm(max(0, p_n - q_n)), after k acceptances sample the bonus from p_k
   (Leviathan et al. 2023, arXiv:2211.17192, Thm. 1; q is zero outside an FR-Spec subset, so
   every token outside it keeps its full p mass in the residual);
4. catch-up: the draft layer re-reads the accepted tokens with the target's true hidden states,
   which also yields its first proposal for the next round.

Both caches are position-addressed, so rejected entries are simply overwritten later; padding and
finished rows use position -1, which is never written. Rows are independent, so a batch of
prompts of different lengths runs together.

"Mean accept length" is as CPM.cu prints it: accepted draft tokens + 1 per verify step, averaged.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model import forward, init_cache, lm_head
from cpmjax.model.mtp import mtp_block
from cpmjax.model.params import Params


def accept_chain(p: jax.Array, q: jax.Array, draft: jax.Array, key: jax.Array,
                 greedy: bool) -> tuple[jax.Array, jax.Array]:
    """(number of accepted drafts n [B], next token [B]) from target probs ``p [B,k+1,V]``, draft
    probs ``q [B,k,V]`` (full vocab, zero off the draft's support) and drafts ``draft [B,k]``."""
    B, k = draft.shape
    p_at = jnp.take_along_axis(p[:, :k], draft[..., None], axis=-1)[..., 0]
    if greedy:
        ok = draft == jnp.argmax(p[:, :k], axis=-1)
    else:
        k_u, key = jax.random.split(key)
        q_at = jnp.take_along_axis(q, draft[..., None], axis=-1)[..., 0]
        ok = jax.random.uniform(k_u, (B, k)) * q_at < p_at
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1)
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    if greedy:
        return n, jnp.argmax(p_n, axis=-1).astype(jnp.int32)
    q_ext = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # after k accepts: residual = p_k
    resid = jnp.maximum(p_n - jnp.take_along_axis(q_ext, n[:, None, None], axis=1)[:, 0], 0.0)
    mass = jnp.sum(resid, axis=-1, keepdims=True)
    resid = jnp.where(mass > 0, resid, p_n)  # p == q exactly: no rejection was possible anyway
    nxt = jax.random.categorical(key, jnp.log(resid), axis=-1)
    return n, nxt.astype(jnp.int32)


def _draft_dist(params: Params, cfg: ModelConfig, h: jax.Array, key: jax.Array, temperature: Any,
                greedy: bool, vocab_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(draft token [B], its distribution q over the FULL vocab [B,V]) from a draft hidden [B,d]."""
    logits = lm_head(params, cfg, h[:, None], vocab_ids)[:, 0]
    if greedy:
        idx = jnp.argmax(logits, axis=-1)
        probs = jax.nn.one_hot(idx, logits.shape[-1])
    else:
        idx = jax.random.categorical(key, logits / temperature, axis=-1)
        probs = jax.nn.softmax(logits / temperature, axis=-1)
    if vocab_ids is None:
        return idx.astype(jnp.int32), probs
    full = jnp.zeros((h.shape[0], cfg.vocab_size), probs.dtype).at[:, vocab_ids].set(probs)
    return vocab_ids[idx].astype(jnp.int32), full


def _target_probs(logits: jax.Array, temperature: Any, greedy: bool) -> jax.Array:
    return logits if greedy else jax.nn.softmax(logits / temperature, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"))
def _prefill(params: Params, draft_params: Params, cfg: ModelConfig, tokens: jax.Array,
             lengths: jax.Array, cache_t: Any, cache_d: Any, key: jax.Array, temperature: Any,
             greedy: bool) -> tuple[Any, ...]:
    B, T = tokens.shape
    ar = jnp.arange(T)[None]
    pos = jnp.where(ar < lengths[:, None], ar, -1)
    out = forward(params, cfg, tokens, positions=pos, cache=cache_t)
    last = lengths - 1
    logits = out.logits[jnp.arange(B), last]
    if greedy:
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        first = jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1).at[jnp.arange(B), last].set(first)
    hd, kv = mtp_block(draft_params, params, cfg, out.hidden, nxt, pos,
                       cache_kv=(cache_d["k"], cache_d["v"]))
    return out.cache, {"k": kv[0], "v": kv[1]}, first, hd[jnp.arange(B), last]


@functools.partial(jax.jit, static_argnames=("cfg", "k", "greedy"))
def _round(params: Params, draft_params: Params, cfg: ModelConfig, k: int, greedy: bool,
           state: dict[str, Any], key: jax.Array, temperature: Any, max_new: int,
           vocab_ids: jax.Array | None) -> dict[str, Any]:
    """One draft-verify-accept-catch-up round for every row (see the module docstring)."""
    m, last, dh = state["m"], state["last"], state["dh"]
    active = state["n_gen"] < max_new
    B = m.shape[0]
    keys = jax.random.split(key, k + 1)
    cache_d = (state["cache_d"]["k"], state["cache_d"]["v"])
    drafts, qs = [], []
    h = dh
    for j in range(k):
        if j > 0:
            pos = jnp.where(active, m - 2 + j, -1)[:, None]
            h, cache_d = mtp_block(draft_params, params, cfg, h[:, None], drafts[-1][:, None], pos,
                                   cache_kv=cache_d)
            h = h[:, 0]
        d, q = _draft_dist(params, cfg, h, keys[j], temperature, greedy, vocab_ids)
        drafts.append(d)
        qs.append(q)
    draft, q = jnp.stack(drafts, 1), jnp.stack(qs, 1)
    ar = jnp.arange(k + 1)[None]
    vpos = jnp.where(active[:, None], m[:, None] - 1 + ar, -1)
    out = forward(params, cfg, jnp.concatenate([last[:, None], draft], 1), positions=vpos,
                  cache=state["cache_t"])
    n, nxt = accept_chain(_target_probs(out.logits, temperature, greedy), q, draft, keys[k], greedy)
    new = jnp.concatenate([draft, draft[:, :1]], 1).at[jnp.arange(B), n].set(nxt)
    cpos = jnp.where(active[:, None] & (ar <= n[:, None]), m[:, None] - 1 + ar, -1)
    hc, cache_d = mtp_block(draft_params, params, cfg, out.hidden, new, cpos, cache_kv=cache_d)
    opos = jnp.where(cpos >= 0, state["n_gen"][:, None] + ar, state["out"].shape[1])
    grow = jnp.where(active, n + 1, 0)
    return {"cache_t": out.cache, "cache_d": {"k": cache_d[0], "v": cache_d[1]},
            "m": m + grow, "last": jnp.where(active, nxt, last),
            "dh": jnp.where(active[:, None], hc[jnp.arange(B), n], dh),
            "n_gen": state["n_gen"] + grow,
            "out": state["out"].at[jnp.arange(B)[:, None], opos].set(new, mode="drop"),
            "accepted": state["accepted"] + jnp.where(active, n, 0),
            "steps": state["steps"] + active.astype(jnp.int32)}


def _check(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, k: int,
           temperature: float, frspec_ids: Any) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    flat = np.concatenate([np.asarray(p) for p in prompts])
    if flat.min() < 0 or flat.max() >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}), got "
                         f"[{flat.min()}, {flat.max()}]")
    if max_new_tokens < 1 or k < 1:
        raise ValueError(f"max_new_tokens and k must be >= 1, got {max_new_tokens}, {k}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if frspec_ids is not None:
        ids = np.asarray(frspec_ids)
        if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= cfg.vocab_size \
                or np.unique(ids).size != ids.size:
            raise ValueError(f"frspec_ids must be distinct token ids in [0, {cfg.vocab_size})")


def speculative_generate(cfg: ModelConfig, params: Params, draft_params: Params,
                         prompts: Sequence[Sequence[int]], max_new_tokens: int, k: int = 3,
                         temperature: float = 0.0, seed: int = 0,
                         frspec_ids: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Generate ``max_new_tokens`` per prompt with draft length ``k``; returns
    (tokens ``[len(prompts), max_new_tokens]`` int32, stats). Temperature 0 is greedy and
    token-identical to plain greedy decoding; > 0 samples exactly from the target's tempered
    distribution. No stop at EOS: callers truncate (the serving engine does).

    stats: ``mean_accept_length`` (CPM.cu's "Mean accept length"), ``verify_steps``,
    ``accepted_draft_tokens``.
    """
    _check(cfg, prompts, max_new_tokens, k, temperature, frspec_ids)
    greedy = temperature == 0
    B = len(prompts)
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    T = int(lengths.max())
    toks = np.zeros((B, T), np.int32)
    for i, p in enumerate(prompts):
        toks[i, :len(p)] = p
    S = T + max_new_tokens + k + 1
    key = jax.random.key(seed)
    temp = jnp.float32(max(temperature, 1e-6))
    vocab_ids = None if frspec_ids is None else jnp.asarray(frspec_ids, jnp.int32)
    cache_t, cache_d, first, dh = _prefill(
        params, draft_params, cfg, jnp.asarray(toks), jnp.asarray(lengths),
        init_cache(cfg, B, S), _draft_cache(cfg, B, S), jax.random.fold_in(key, 0), temp, greedy)
    out = jnp.zeros((B, max_new_tokens + k + 1), jnp.int32).at[:, 0].set(first)
    state = {"cache_t": cache_t, "cache_d": cache_d, "m": jnp.asarray(lengths) + 1, "last": first,
             "dh": dh, "n_gen": jnp.ones((B,), jnp.int32), "out": out,
             "accepted": jnp.zeros((B,), jnp.int32), "steps": jnp.zeros((B,), jnp.int32)}
    r = 0
    while bool(jnp.any(state["n_gen"] < max_new_tokens)):
        r += 1
        state = _round(params, draft_params, cfg, k, greedy, state, jax.random.fold_in(key, r),
                       temp, max_new_tokens, vocab_ids)
    steps, acc = int(state["steps"].sum()), int(state["accepted"].sum())
    stats = {"verify_steps": steps, "accepted_draft_tokens": acc,
             "mean_accept_length": (acc + steps) / max(steps, 1)}
    return np.asarray(state["out"][:, :max_new_tokens]), stats


def _draft_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
    """The draft's own one-layer KV cache, ``[B, S, KV, hd]`` for keys and values."""
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}
