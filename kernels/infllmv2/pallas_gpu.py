"""Stage-2 forward of InfLLM v2 as a backend-neutral Pallas kernel for GPU.

One program per (batch, KV head, query token); it holds the token's G query heads [G, D] and
loops over its slots (`documents.kernel_slots` codes: an aligned block and the key range to
read in it) with an online softmax, slicing each block out of the KV head's K/V with `pl.ds`
(no scalar-prefetch grid: that is TPU-only). The causal mask uses the token's own position.

Why not Mosaic GPU: its matmuls work on warpgroup tiles (>= 64 rows) fed by TMA copies of
static tiles; the per-token gather of G (often < 64) query rows against data-dependent blocks
does not map onto it without a query-tiling redesign. This body therefore uses only generic
Pallas ops, which lower through the default Pallas GPU (Triton) path today; that backend is
deprecated from JAX 0.11, so this kernel is opt-in (`implementation="pallas_gpu"`) and the
dispatcher uses the XLA gather path on GPU. Tested here only in interpret mode on CPU; on a GPU
G and D must be powers of two and G >= 16 for Triton's dot. K/V are relaid out per head
(``[B, KV, Tk, D]``, one copy per call), which suits training, not decode from a cache.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .documents import decode_slot

_MASKED = -1e30


def head_major(x: jax.Array, block_size: int) -> jax.Array:
    """[B, Tk, KV, D] -> [B, KV, Tk_pad, D] zero-padded to whole blocks (the kernels' K/V)."""
    tk = x.shape[1]
    tk_pad = -(-tk // block_size) * block_size
    return jnp.pad(x, ((0, 0), (0, tk_pad - tk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


def slot_keys(k_ref, code, q_pos, *, block_size: int, n_keys: int, shape: tuple[int, int]):
    """(start of the slot's aligned block, mask [G, bs] of its keys visible to the query)."""
    blk, lo, hi = decode_slot(code, block_size)
    start = jnp.maximum(blk, 0) * block_size
    off = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    key_pos = start + off
    mask = (off >= lo) & (off < hi) & (key_pos <= q_pos) & (key_pos < n_keys)
    return start, mask


def _fwd_kernel(code_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *lse_ref, scale: float,
                block_size: int, n_slots: int, n_keys: int) -> None:
    q = q_ref[...]  # [G, D]
    g, d = q.shape
    q_pos = pos_ref[0]

    def body(s, carry):
        m, l, acc = carry
        start, mask = slot_keys(k_ref, code_ref[s], q_pos, block_size=block_size,
                                n_keys=n_keys, shape=(g, block_size))
        k = k_ref[pl.ds(start, block_size), :]
        v = v_ref[pl.ds(start, block_size), :]
        sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale
        sc = jnp.where(mask, sc, _MASKED)
        m_new = jnp.maximum(m, sc.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(sc - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(axis=1, keepdims=True), alpha * acc + pv

    init = (jnp.full((g, 1), _MASKED, jnp.float32), jnp.zeros((g, 1), jnp.float32),
            jnp.zeros((g, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_slots, body, init)
    o_ref[...] = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)
    for ref in lse_ref:  # only with return_lse; rows with no visible key get 0
        ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)


def sparse_attention_fwd(qg: jax.Array, k: jax.Array, v: jax.Array, codes: jax.Array,
                         q_pos: jax.Array, *, block_size: int, scale: float,
                         interpret: bool = False, return_lse: bool = False):
    """Forward; same contract as `pallas_tpu.sparse_attention_fwd` (LSE [B, KV, Tq, G, 1])."""
    b, kvh, tq, g, d = qg.shape
    tk, n_slots = k.shape[1], codes.shape[-1]
    kh, vh = head_major(k, block_size), head_major(v, block_size)
    tok = lambda bi, hi, ti: (bi, hi, ti, 0, 0)  # noqa: E731
    qo_spec = pl.BlockSpec((None, None, None, g, d), tok)
    kv_spec = pl.BlockSpec((None, None, kh.shape[2], d), lambda bi, hi, ti: (bi, hi, 0, 0))
    lse_spec = pl.BlockSpec((None, None, None, g, 1), tok)
    code_spec = pl.BlockSpec((None, None, None, n_slots), lambda bi, hi, ti: (bi, hi, ti, 0))
    pos_spec = pl.BlockSpec((None, None, 1), lambda bi, hi, ti: (bi, ti, 0))
    kernel = functools.partial(_fwd_kernel, scale=scale, block_size=block_size,
                               n_slots=n_slots, n_keys=tk)
    o_shape = jax.ShapeDtypeStruct(qg.shape, qg.dtype)
    lse_shape = jax.ShapeDtypeStruct((*qg.shape[:-1], 1), jnp.float32)
    return pl.pallas_call(
        kernel,
        grid=(b, kvh, tq),
        in_specs=[code_spec, pos_spec, qo_spec, kv_spec, kv_spec],
        out_specs=[qo_spec, lse_spec] if return_lse else qo_spec,
        out_shape=[o_shape, lse_shape] if return_lse else o_shape,
        interpret=interpret,
        name="infllmv2_fwd_lse" if return_lse else "infllmv2_fwd",
    )(codes, q_pos.astype(jnp.int32)[..., None], qg, kh, vh)
