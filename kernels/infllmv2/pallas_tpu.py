"""Stage-2 forward of InfLLM v2 as a Pallas TPU (Mosaic) kernel.

Layout: one grid step = (batch, KV head, query token, selected-block slot). The query tile is
the G query heads of one token and one KV group, [G, D], so every KV block read from HBM serves
all G heads (the same grouping the CUDA kernel uses for its MMA, infllmv2_cuda_impl). Per-token
block lists arrive through `PrefetchScalarGridSpec` (scalar memory), and the K/V index maps
read them, so only selected blocks are DMA'd. Online softmax across the `topk` axis; unused
(-1) slots are skipped with `pl.when` and map to block 0 (no extra DMA after the first).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .attention_xla import kv_blocks

_MASKED = -1e30  # finite "minus infinity" keeps the online softmax NaN-free


def _fwd_kernel(idx_ref, q_ref, k_ref, v_ref, o_ref, *rest, scale: float, block_size: int,
                cache_len: int, topk: int, with_lse: bool) -> None:
    lse_ref = rest[0] if with_lse else None
    m_sc, l_sc, acc_sc = rest[-3:]
    b, h, t, s = (pl.program_id(i) for i in range(4))

    @pl.when(s == 0)
    def _init() -> None:
        m_sc[...] = jnp.full(m_sc.shape, _MASKED, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    n_h, n_t = pl.num_programs(1), pl.num_programs(2)
    blk = idx_ref[((b * n_h + h) * n_t + t) * topk + s]

    @pl.when(blk >= 0)
    def _step() -> None:
        q = q_ref[...]
        k = k_ref[...]
        sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # [G, bs]
        key_pos = blk * block_size + jax.lax.broadcasted_iota(jnp.int32, sc.shape, 1)
        mask = key_pos <= cache_len + t
        sc = jnp.where(mask, sc, _MASKED)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, sc.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(sc - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = m_new

    @pl.when(s == topk - 1)
    def _finish() -> None:
        l = l_sc[...]
        o_ref[...] = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)
        if with_lse:  # rows with no visible key get 0; their probabilities are masked anyway
            lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)


def sparse_attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array, *,
                         block_size: int, cache_len: int = 0, softmax_scale: float | None = None,
                         interpret: Any = False, return_lse: bool = False):
    """Forward; q [B, Tq, H, D], k/v [B, Tk, KV, D], block_idx [B, KV, Tq, topk].

    `interpret`: False on TPU, True or `pltpu.InterpretParams()` on CPU. With `return_lse`
    also returns the float32 log-sum-exp [B, KV, Tq, G, 1] of the scaled scores (the backward's
    residual); without it the kernel writes no extra output.
    """
    b, tq, h, d = q.shape
    kvh = k.shape[2]
    g, topk = h // kvh, block_idx.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qg = q.reshape(b, tq, kvh, g, d).transpose(0, 2, 1, 3, 4)  # [B, KV, Tq, G, D]
    flat_idx = block_idx.astype(jnp.int32).reshape(-1)

    def kv_map(bi, hi, ti, si, idx_ref):
        blk = idx_ref[((bi * kvh + hi) * tq + ti) * topk + si]
        return bi, hi, jnp.maximum(blk, 0), 0, 0

    kv_spec = pl.BlockSpec((None, None, None, block_size, d), kv_map)
    token_map = lambda bi, hi, ti, si, idx_ref: (bi, hi, ti, 0, 0)  # noqa: E731
    qo_spec = pl.BlockSpec((None, None, None, g, d), token_map)
    lse_spec = pl.BlockSpec((None, None, None, g, 1), token_map)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kvh, tq, topk),
        in_specs=[qo_spec, kv_spec, kv_spec],
        out_specs=[qo_spec, lse_spec] if return_lse else qo_spec,
        scratch_shapes=[pltpu.VMEM((g, 1), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                        pltpu.VMEM((g, d), jnp.float32)],
    )
    kernel = functools.partial(_fwd_kernel, scale=scale, block_size=block_size,
                               cache_len=cache_len, topk=topk, with_lse=return_lse)
    o_shape = jax.ShapeDtypeStruct(qg.shape, q.dtype)
    lse_shape = jax.ShapeDtypeStruct((*qg.shape[:-1], 1), jnp.float32)
    res = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[o_shape, lse_shape] if return_lse else o_shape,
        interpret=interpret,
    )(flat_idx, qg, kv_blocks(k, block_size), kv_blocks(v, block_size))
    out = (res[0] if return_lse else res).transpose(0, 2, 1, 3, 4).reshape(b, tq, h, d)
    return (out, res[1]) if return_lse else out
