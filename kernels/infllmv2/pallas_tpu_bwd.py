"""Stage-2 backward of InfLLM v2 as Pallas TPU (Mosaic) kernels.

Both kernels recompute the probabilities P = exp(scale * q k^T - lse) of one (token, block)
pair from the forward's float32 log-sum-exp, for the G query heads of a KV group at once.

* dQ: the forward's grid (batch, KV head, token, slot); dQ [G, D] accumulates in VMEM over
  the token's selected blocks, block ids from scalar memory.
* dK/dV: an inverse index built in XLA. Per (batch, KV head) the flat (token, slot) pairs are
  sorted by block id (-1 last), and the grid walks the sorted pairs. The dK/dV output block
  follows the sorted block id, so all pairs of one block are consecutive steps on a resident
  output buffer (the "arbitrary" axis): it is zeroed when the block id changes and written
  back once. Padding pairs map to the last real block and add nothing. The outputs alias a
  zeros input, so blocks no query selected are never visited and stay exactly 0.
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


def block_probs(q, k, lse, blk, t, *, scale: float, block_size: int, cache_len: int):
    """P [G, bs] of query token t against block blk, 0 at causally masked keys."""
    sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) * scale
    key_pos = blk * block_size + jax.lax.broadcasted_iota(jnp.int32, sc.shape, 1)
    mask = key_pos <= cache_len + t
    return jnp.where(mask, jnp.exp(jnp.where(mask, sc, 0.0) - lse), 0.0)


def score_grad(p, do, v, delta):
    """dS = P * (dO V^T - delta), [G, bs] float32."""
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p * (dp - delta)


def _dq_kernel(idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_sc, *,
               scale: float, block_size: int, cache_len: int, topk: int) -> None:
    b, h, t, s = (pl.program_id(i) for i in range(4))

    @pl.when(s == 0)
    def _init() -> None:
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    blk = idx_ref[((b * pl.num_programs(1) + h) * pl.num_programs(2) + t) * topk + s]

    @pl.when(blk >= 0)
    def _step() -> None:
        k = k_ref[...]
        p = block_probs(q_ref[...], k, lse_ref[...], blk, t, scale=scale, block_size=block_size,
                   cache_len=cache_len)
        ds = score_grad(p, do_ref[...], v_ref[...], delta_ref[...])
        acc_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32) * scale

    @pl.when(s == topk - 1)
    def _finish() -> None:
        dq_ref[...] = acc_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(raw_ref, blk_ref, tok_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk0_ref, dv0_ref, dk_ref, dv_ref, *, scale: float, block_size: int,
                cache_len: int) -> None:
    del dk0_ref, dv0_ref  # aliased to dk/dv: only there so unvisited blocks stay 0
    b, h, j = (pl.program_id(i) for i in range(3))
    base = (b * pl.num_programs(1) + h) * pl.num_programs(2)
    blk = blk_ref[base + j]
    prev = blk_ref[base + jnp.maximum(j - 1, 0)]

    @pl.when((j == 0) | (blk != prev))
    def _init() -> None:
        dk_ref[...] = jnp.zeros(dk_ref.shape, dk_ref.dtype)
        dv_ref[...] = jnp.zeros(dv_ref.shape, dv_ref.dtype)

    @pl.when(raw_ref[base + j] >= 0)
    def _step() -> None:
        q, do = q_ref[...], do_ref[...]
        p = block_probs(q, k_ref[...], lse_ref[...], blk, tok_ref[base + j], scale=scale,
                   block_size=block_size, cache_len=cache_len)
        ds = score_grad(p, do, v_ref[...], delta_ref[...])
        tn = (((0,), (0,)), ((), ()))  # contract the G axis: [G, bs]^T [G, D]
        dv_ref[...] += jax.lax.dot_general(p.astype(do.dtype), do, tn,
                                           preferred_element_type=jnp.float32)
        dk_ref[...] += jax.lax.dot_general(ds.astype(q.dtype), q, tn,
                                           preferred_element_type=jnp.float32) * scale


def inverse_index(block_idx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per (b, KV head), the (token, slot) pairs sorted by block id with -1 last.

    Returns flat int32 (raw sorted block ids with -1, block ids with -1 replaced by the last
    real block of the row (0 if none), token ids), each of length B * KV * Tq * topk.
    """
    b, kvh, tq, topk = block_idx.shape
    flat = block_idx.astype(jnp.int32).reshape(b, kvh, tq * topk)
    key = jnp.where(flat < 0, jnp.iinfo(jnp.int32).max, flat)
    order = jnp.argsort(key, axis=-1, stable=True)
    raw = jnp.take_along_axis(flat, order, axis=-1)
    last = jnp.maximum(flat.max(axis=-1, keepdims=True), 0)
    mapped = jnp.where(raw < 0, last, raw)
    return raw.reshape(-1), mapped.reshape(-1), (order // topk).astype(jnp.int32).reshape(-1)


def grouped_operands(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, d_out: jax.Array,
                     block_size: int) -> tuple[jax.Array, ...]:
    """The backward kernels' operands: q, dO as [B, KV, Tq, G, D], delta = rowsum(dO * O) f32
    [B, KV, Tq, G, 1], and K, V in the [B, KV, n_blocks, block_size, D] block layout."""
    b, tq, h, d = q.shape
    kvh = k.shape[2]

    def grouped(x: jax.Array) -> jax.Array:
        return x.reshape(b, tq, kvh, h // kvh, d).transpose(0, 2, 1, 3, 4)

    qg, dog = grouped(q), grouped(d_out)
    delta = (dog.astype(jnp.float32) * grouped(out).astype(jnp.float32)).sum(-1, keepdims=True)
    return qg, dog, delta, kv_blocks(k, block_size), kv_blocks(v, block_size)


def sparse_attention_bwd(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array,
                         out: jax.Array, lse: jax.Array, d_out: jax.Array, *, block_size: int,
                         cache_len: int = 0, softmax_scale: float | None = None,
                         interpret: Any = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of `pallas_tpu.sparse_attention_fwd`; lse [B, KV, Tq, G, 1] from its
    `return_lse=True` call, out/d_out [B, Tq, H, D]."""
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g, topk = h // kvh, block_idx.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)

    qg, dog, delta, kb, vb = grouped_operands(q, k, v, out, d_out, block_size)
    kw = dict(scale=scale, block_size=block_size, cache_len=cache_len)

    # dQ: the forward's grid.
    def kv_map(bi, hi, ti, si, idx_ref):
        return bi, hi, jnp.maximum(idx_ref[((bi * kvh + hi) * tq + ti) * topk + si], 0), 0, 0

    tok_map = lambda bi, hi, ti, si, idx_ref: (bi, hi, ti, 0, 0)  # noqa: E731
    row = pl.BlockSpec((None, None, None, g, d), tok_map)
    col = pl.BlockSpec((None, None, None, g, 1), tok_map)
    kv = pl.BlockSpec((None, None, None, block_size, d), kv_map)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, topk=topk, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kvh, tq, topk),
            in_specs=[row, kv, kv, row, col, col], out_specs=row,
            scratch_shapes=[pltpu.VMEM((g, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
    )(block_idx.astype(jnp.int32).reshape(-1), qg, kb, vb, dog, lse, delta)

    # dK/dV: grid over the sorted (token, slot) pairs of each (b, KV head).
    raw, mapped, tok = inverse_index(block_idx)
    n = tq * topk

    def pair_tok(bi, hi, ji, raw_ref, blk_ref, tok_ref):
        return bi, hi, tok_ref[(bi * kvh + hi) * n + ji], 0, 0

    def pair_blk(bi, hi, ji, raw_ref, blk_ref, tok_ref):
        return bi, hi, blk_ref[(bi * kvh + hi) * n + ji], 0, 0

    prow = pl.BlockSpec((None, None, None, g, d), pair_tok)
    pcol = pl.BlockSpec((None, None, None, g, 1), pair_tok)
    pkv = pl.BlockSpec((None, None, None, block_size, d), pair_blk)
    zeros = jnp.zeros(kb.shape, jnp.float32)
    dkb, dvb = pl.pallas_call(
        functools.partial(_dkv_kernel, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, kvh, n),
            in_specs=[prow, pkv, pkv, prow, pcol, pcol, pkv, pkv], out_specs=[pkv, pkv]),
        out_shape=[jax.ShapeDtypeStruct(kb.shape, jnp.float32)] * 2,
        input_output_aliases={9: 0, 10: 1},  # operand indices count the 3 scalar arrays
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(raw, mapped, tok, qg, kb, vb, dog, lse, delta, zeros, zeros)

    def ungroup_kv(x: jax.Array, like: jax.Array) -> jax.Array:  # -> [B, Tk, KV, D]
        x = x.transpose(0, 2, 3, 1, 4).reshape(b, -1, kvh, d)[:, :tk]
        return x.astype(like.dtype)

    dq = dq.transpose(0, 2, 1, 3, 4).reshape(b, tq, h, d)
    return dq, ungroup_kv(dkb, k), ungroup_kv(dvb, v)
