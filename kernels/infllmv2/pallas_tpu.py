"""Stage-2 forward of InfLLM v2 as a Pallas TPU (Mosaic) kernel.

Layout: one grid step = (batch, KV head, query token, slot). The query tile is the G query
heads of one token and one KV group, [G, D], so every KV block read from HBM serves all G heads
(the same grouping the CUDA kernel uses for its MMA, infllmv2_cuda_impl). Each token's slots
(`documents.kernel_slots` codes: an aligned block and the key range to read in it) and each
token's position arrive through `PrefetchScalarGridSpec` (scalar memory); the K/V index maps
read them, so only selected blocks are DMA'd, and the causal mask uses the token's own position
(static prefill, per-row positions in a KV cache, padding at position -1). Online softmax
across the slot axis; unused slots are skipped with `pl.when` and name the block the slot
before them read, so the pipeline fetches nothing for them.

K and V are passed in their own shape, so a decode step DMAs the selected blocks of the KV
cache in place. Mosaic needs the last two block dims to be (8, 128)-divisible or whole:
- ``[B, Tk, KV, D]``: a block is ``[block_size, KV, D]`` (every KV head of those keys, one
  contiguous DMA) and the step reads its head's ``[block_size, D]`` slice (`head_tiles`). An
  earlier version reshaped such K/V to ``[B, Tk, KV * D]`` for per-head lane blocks; libtpu
  implements that reshape of a cache in its tiled layout as a copy of the whole cache each step
  (seen in the compiled HLO of a decode step, ``cpmjax.sparse.scale_check``).
- lane-packed ``[B, Tk, KV * D]`` (a cache stored so, `layout`; for D below 128 lanes): a block
  is ``[block_size, KV * D]``, all lanes. The query tile is spread to ``[G, KV * D]`` with zeros
  outside its head's lanes, so ``q . k`` over all lanes is the head's score and ``p @ v`` holds
  the head's output in its lanes, which the wrapper takes out (exact: the other terms are
  products with zero). For D = 64, KV = 2 that doubles the tile's MXU work and VMEM, not HBM
  traffic per selected block beyond the other head's half.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .documents import decode_slot

_MASKED = -1e30  # finite "minus infinity" keeps the online softmax NaN-free


def kv_spec(block_size: int, kv_heads: int, head_dim: int,
            block_of: Callable[..., jax.Array]) -> pl.BlockSpec:
    """BlockSpec of K/V ``[B, Tk, KV, D]``: aligned block ``block_of(*grid, *refs)``, all heads
    (the grid's head axis picks one in the kernel, `head_tiles`)."""
    return pl.BlockSpec((None, block_size, kv_heads, head_dim),
                        lambda bi, hi, *rest: (bi, block_of(bi, hi, *rest), 0, 0))


def lane_kv_spec(block_size: int, lanes: int,
                 block_of: Callable[..., jax.Array]) -> pl.BlockSpec:
    """BlockSpec of lane-packed K/V ``[B, Tk, KV * D]``: aligned block, all lanes."""
    return pl.BlockSpec((None, block_size, lanes),
                        lambda bi, hi, *rest: (bi, block_of(bi, hi, *rest), 0))


def spread_heads(qg: jax.Array) -> jax.Array:
    """``[B, KV, Tq, G, D]`` -> ``[B, KV, Tq, G, KV * D]``: head h's queries in lanes
    ``h*D .. h*D+D-1``, zeros elsewhere (the lane-packed query tile)."""
    kvh, d = qg.shape[1], qg.shape[-1]
    lane_head = jnp.arange(kvh * d) // d
    head = jnp.arange(kvh)[None, :, None, None, None]
    return jnp.where(lane_head == head, jnp.tile(qg, (1, 1, 1, 1, kvh)), jnp.zeros((), qg.dtype))


def own_lanes(x: jax.Array, head_dim: int) -> jax.Array:
    """Inverse of `spread_heads` on an output: each head's own ``D`` lanes."""
    return jnp.stack([x[:, i, ..., i * head_dim:(i + 1) * head_dim]
                      for i in range(x.shape[1])], axis=1)


def head_tiles(refs: tuple[Any, ...], head: jax.Array, kv_heads: int,
               fn: Callable[..., None]) -> None:
    """Call ``fn`` with head ``head``'s ``[block_size, D]`` tiles of ``[block_size, KV, D]``
    K/V-like refs (static sublane slices; the grid's head picks one)."""
    for i in range(kv_heads):
        pl.when(head == i)(lambda i=i: fn(*(r[:, i, :] for r in refs)))


def slot_mask(shape: tuple[int, int], code: jax.Array, q_pos: jax.Array, *, block_size: int,
              n_keys: int) -> tuple[jax.Array, jax.Array]:
    """(mask [G, bs] of keys visible to the query in this slot, key validity [bs, 1]).

    A key is visible iff it is in the slot's range, at or before the query, and exists."""
    blk, lo, hi = decode_slot(code, block_size)
    off = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    key_pos = blk * block_size + off
    mask = (off >= lo) & (off < hi) & (key_pos <= q_pos) & (key_pos < n_keys)
    rows = blk * block_size + jax.lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
    return mask, rows < n_keys


def _fwd_kernel(code_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *rest, scale: float,
                block_size: int, n_slots: int, n_keys: int, kv_heads: int,
                with_lse: bool, lane_packed: bool) -> None:
    lse_ref = rest[0] if with_lse else None
    m_sc, l_sc, acc_sc = rest[-3:]
    b, h, t, s = (pl.program_id(i) for i in range(4))
    n_t = pl.num_programs(2)

    @pl.when(s == 0)
    def _init() -> None:
        m_sc[...] = jnp.full(m_sc.shape, _MASKED, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    code = code_ref[((b * kv_heads + h) * n_t + t) * n_slots + s]

    def step(k: jax.Array, v: jax.Array) -> None:
        q = q_ref[...]
        sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # [G, bs]
        mask, rows = slot_mask(sc.shape, code, pos_ref[b * n_t + t], block_size=block_size,
                               n_keys=n_keys)
        if n_keys % block_size:  # the last block's tail is not part of K/V
            v = jnp.where(rows, v, jnp.zeros_like(v))
        sc = jnp.where(mask, sc, _MASKED)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, sc.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(sc - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = m_new

    if lane_packed:
        pl.when(code >= 0)(lambda: step(k_ref[...], v_ref[...]))
    else:
        pl.when(code >= 0)(lambda: head_tiles((k_ref, v_ref), h, kv_heads, step))

    @pl.when(s == n_slots - 1)
    def _finish() -> None:
        l = l_sc[...]
        o_ref[...] = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)
        if with_lse:  # rows with no visible key get 0; their probabilities are masked anyway
            lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)


def sparse_attention_fwd(qg: jax.Array, k: jax.Array, v: jax.Array, codes: jax.Array,
                         q_pos: jax.Array, *, block_size: int, scale: float,
                         interpret: Any = False, return_lse: bool = False):
    """Forward; qg [B, KV, Tq, G, D] (queries grouped by KV head), k/v [B, Tk, KV, D] or
    lane-packed [B, Tk, KV * D], codes [B, KV, Tq, S] from `documents.kernel_slots`, q_pos
    [B, Tq] -> out [B, KV, Tq, G, D].

    `interpret`: False on TPU, True or `pltpu.InterpretParams()` on CPU. With `return_lse`
    also returns the float32 log-sum-exp [B, KV, Tq, G, 1] of the scaled scores (the backward's
    residual); without it the kernel writes no extra output.
    """
    b, kvh, tq, g, d = qg.shape
    tk, n_slots = k.shape[1], codes.shape[-1]

    def block_of(bi, hi, ti, si, code_ref, pos_ref):
        return decode_slot(code_ref[((bi * kvh + hi) * tq + ti) * n_slots + si], block_size)[0]

    lane_packed = k.ndim == 3
    if lane_packed:
        qg = spread_heads(qg)
        kv = lane_kv_spec(block_size, k.shape[-1], block_of)
    else:
        kv = kv_spec(block_size, kvh, d, block_of)
    dq = qg.shape[-1]  # lanes of the query/output tile
    token_map = lambda bi, hi, ti, si, *_: (bi, hi, ti, 0, 0)  # noqa: E731
    qo_spec = pl.BlockSpec((None, None, None, g, dq), token_map)
    lse_spec = pl.BlockSpec((None, None, None, g, 1), token_map)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, kvh, tq, n_slots),
        in_specs=[qo_spec, kv, kv],
        out_specs=[qo_spec, lse_spec] if return_lse else qo_spec,
        scratch_shapes=[pltpu.VMEM((g, 1), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                        pltpu.VMEM((g, dq), jnp.float32)],
    )
    kernel = functools.partial(_fwd_kernel, scale=scale, block_size=block_size,
                               n_slots=n_slots, n_keys=tk, kv_heads=kvh,
                               with_lse=return_lse, lane_packed=lane_packed)
    o_shape = jax.ShapeDtypeStruct(qg.shape, qg.dtype)
    lse_shape = jax.ShapeDtypeStruct((*qg.shape[:-1], 1), jnp.float32)
    res = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[o_shape, lse_shape] if return_lse else o_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="infllmv2_fwd_lse" if return_lse else "infllmv2_fwd",
    )(codes.reshape(-1), q_pos.astype(jnp.int32).reshape(-1), qg, k, v)
    if not lane_packed:
        return res
    return (own_lanes(res[0], d), res[1]) if return_lse else own_lanes(res, d)
