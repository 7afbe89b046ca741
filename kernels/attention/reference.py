"""The jnp oracle of dense attention: the whole ``[B, Tq, Tk]`` mask and score matrix.

Exact and simple, for tests and short sequences only: its memory is O(Tq x Tk) per head, which
is what the other implementations exist to avoid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .masking import visible

_MASKED = -1e30  # finite: a row with no visible key gets zeros (see the where below), not NaN


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array,
                        kv_pos: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
                        scale: float, keys_are_queries: bool) -> jax.Array:
    """GQA softmax attention, float32 scores; q ``[B,Tq,H,D]``, k/v ``[B,Tk,KV,D]``."""
    mask = visible(q_pos, kv_pos, q_seg, kv_seg, keys_are_queries)
    return masked_attention(q, k, v, mask, scale)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float) -> jax.Array:
    """Softmax attention under an explicit boolean mask ``[B, Tq, Tk]`` (all heads) or
    ``[B, KV, Tq, Tk]`` (per KV-head group); rows with no visible key give zeros."""
    B, Tq, H, D = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, Tq, KV, H // KV, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = mask[:, None, None] if mask.ndim == 3 else mask[:, :, None]
    scores = jnp.where(mask, scores, _MASKED)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(B, Tq, H, D).astype(q.dtype)
