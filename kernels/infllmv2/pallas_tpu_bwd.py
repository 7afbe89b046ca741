"""Stage-2 backward of InfLLM v2 as Pallas TPU (Mosaic) kernels.

Both kernels recompute the probabilities P = exp(scale * q k^T - lse) of one (token, slot)
pair from the forward's float32 log-sum-exp, for the G query heads of a KV group at once, with
the forward's mask (`pallas_tpu.slot_mask`: the slot's key range, the token's position).

* dQ: the forward's grid (batch, KV head, token, slot); dQ [G, D] accumulates in VMEM over
  the token's slots, slot codes and positions from scalar memory.
* dK/dV: an inverse index built in XLA (`inverse_index`). Per (batch, KV head) the flat
  (token, slot) pairs are sorted by slot code, i.e. by aligned block first (unused slots
  last), and the grid walks the sorted pairs. The dK/dV output block follows the sorted block,
  so all pairs of one block are consecutive steps on a resident float32 output buffer (the
  "arbitrary" axis): it is loaded from the accumulator input it aliases when the block
  changes and written back once. Padding pairs map to the row's last real block and add
  nothing. Blocks no query selected are never visited and keep the accumulator's value, so
  query chunks (`pallas_op`) add into one dK/dV without a separate sum.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .documents import decode_slot
from .pallas_tpu import head_tiles, kv_spec, slot_mask


def block_probs(q, k, lse, code, q_pos, *, scale: float, block_size: int, n_keys: int):
    """P [G, bs] of a query against one slot, 0 at masked keys."""
    sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) * scale
    mask, rows = slot_mask(sc.shape, code, q_pos, block_size=block_size, n_keys=n_keys)
    return jnp.where(mask, jnp.exp(jnp.where(mask, sc, 0.0) - lse), 0.0), rows


def score_grad(p, do, v, delta):
    """dS = P * (dO V^T - delta), [G, bs] float32."""
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p * (dp - delta)


def _dq_kernel(code_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               acc_sc, *, scale: float, block_size: int, n_slots: int, n_keys: int,
               kv_heads: int) -> None:
    b, h, t, s = (pl.program_id(i) for i in range(4))
    n_t = pl.num_programs(2)

    @pl.when(s == 0)
    def _init() -> None:
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    code = code_ref[((b * kv_heads + h) * n_t + t) * n_slots + s]

    def step(k: jax.Array, v: jax.Array) -> None:
        p, rows = block_probs(q_ref[...], k, lse_ref[...], code, pos_ref[b * n_t + t],
                              scale=scale, block_size=block_size, n_keys=n_keys)
        if n_keys % block_size:  # the last block's tail is not part of K/V
            k, v = (jnp.where(rows, x, jnp.zeros_like(x)) for x in (k, v))
        ds = score_grad(p, do_ref[...], v, delta_ref[...])
        acc_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32) * scale

    pl.when(code >= 0)(lambda: head_tiles((k_ref, v_ref), h, kv_heads, step))

    @pl.when(s == n_slots - 1)
    def _finish() -> None:
        dq_ref[...] = acc_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(raw_ref, blk_ref, tok_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_in_ref, dv_in_ref, dk_ref, dv_ref, *, scale: float,
                block_size: int, n_keys: int, n_tokens: int, kv_heads: int) -> None:
    b, h, j = (pl.program_id(i) for i in range(3))
    base = (b * kv_heads + h) * pl.num_programs(2)
    blk = blk_ref[base + j]
    prev = blk_ref[base + jnp.maximum(j - 1, 0)]

    @pl.when((j == 0) | (blk != prev))
    def _init() -> None:  # continue the sum the accumulator holds
        dk_ref[...] = dk_in_ref[...]
        dv_ref[...] = dv_in_ref[...]

    code = raw_ref[base + j]

    def step(k: jax.Array, v: jax.Array) -> None:
        q, do = q_ref[...], do_ref[...]
        p, rows = block_probs(q, k, lse_ref[...], code,
                              pos_ref[b * n_tokens + tok_ref[base + j]], scale=scale,
                              block_size=block_size, n_keys=n_keys)
        if n_keys % block_size:  # the last block's tail is not part of K/V
            v = jnp.where(rows, v, jnp.zeros_like(v))
        ds = score_grad(p, do, v, delta_ref[...])
        tn = (((0,), (0,)), ((), ()))  # contract the G axis: [G, bs]^T [G, D]
        dv_ref[...] += jax.lax.dot_general(p.astype(do.dtype), do, tn,
                                           preferred_element_type=jnp.float32)
        dk_ref[...] += jax.lax.dot_general(ds.astype(q.dtype), q, tn,
                                           preferred_element_type=jnp.float32) * scale

    pl.when(code >= 0)(lambda: head_tiles((k_ref, v_ref), h, kv_heads, step))


def inverse_index(codes: jax.Array, block_size: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per (b, KV head), the (token, slot) pairs sorted by slot code (aligned block first),
    unused slots last.

    Returns flat int32 (sorted codes, their aligned blocks with unused pairs mapped to the
    row's last real block (0 if none), token ids), each of length B * KV * Tq * S.
    """
    b, kvh, tq, n_slots = codes.shape
    flat = codes.reshape(b, kvh, tq * n_slots)
    big = jnp.iinfo(jnp.int32).max
    key = jnp.where(flat < 0, big, flat)
    pair = jnp.broadcast_to(jnp.arange(tq * n_slots, dtype=jnp.int32), key.shape)
    key, order = jax.lax.sort((key, pair), dimension=2, num_keys=1, is_stable=True)
    raw = jnp.where(key == big, -1, key)
    blk = jnp.where(raw >= 0, raw // (block_size * block_size), -1)
    blk = jnp.where(raw >= 0, blk, jnp.maximum(blk.max(axis=-1, keepdims=True), 0))
    return raw.reshape(-1), blk.astype(jnp.int32).reshape(-1), (order // n_slots).reshape(-1)


def sparse_attention_bwd(qg: jax.Array, k: jax.Array, v: jax.Array, codes: jax.Array,
                         q_pos: jax.Array, lse: jax.Array, delta: jax.Array, dog: jax.Array,
                         dk_acc: jax.Array, dv_acc: jax.Array, *, block_size: int, scale: float,
                         interpret: Any = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq [B, KV, Tq, G, D], dK and dV accumulators + this call's gradients) of
    `pallas_tpu.sparse_attention_fwd`.

    lse [B, KV, Tq, G, 1] from its ``return_lse=True`` call, delta = rowsum(dO * O) float32
    of the same shape, dog = dO grouped like qg; dk_acc/dv_acc float32 [B, KV, nb, bs, D]
    (aligned blocks of keys; donated: the kernel adds into them in place).
    """
    b, kvh, tq, g, d = qg.shape
    tk, n_slots = k.shape[1], codes.shape[-1]
    kw = dict(scale=scale, block_size=block_size, n_keys=tk, kv_heads=kvh)
    pos = q_pos.astype(jnp.int32).reshape(-1)

    # dQ: the forward's grid.
    def slot_block(bi, hi, ti, si, code_ref, pos_ref):
        return decode_slot(code_ref[((bi * kvh + hi) * tq + ti) * n_slots + si], block_size)[0]

    tok_map = lambda bi, hi, ti, si, *_: (bi, hi, ti, 0, 0)  # noqa: E731
    row = pl.BlockSpec((None, None, None, g, d), tok_map)
    col = pl.BlockSpec((None, None, None, g, 1), tok_map)
    kv = kv_spec(block_size, kvh, d, slot_block)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, n_slots=n_slots, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, kvh, tq, n_slots),
            in_specs=[row, kv, kv, row, col, col], out_specs=row,
            scratch_shapes=[pltpu.VMEM((g, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qg.shape, qg.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="infllmv2_dq",
    )(codes.reshape(-1), pos, qg, k, v, dog, lse, delta)

    # dK/dV: grid over the sorted (token, slot) pairs of each (b, KV head).
    raw, blocks, tok = inverse_index(codes, block_size)
    n = tq * n_slots

    def pair_tok(bi, hi, ji, raw_ref, blk_ref, tok_ref, pos_ref):
        return bi, hi, tok_ref[(bi * kvh + hi) * n + ji], 0, 0

    def pair_blk(bi, hi, ji, raw_ref, blk_ref, tok_ref, pos_ref):
        return blk_ref[(bi * kvh + hi) * n + ji]

    prow = pl.BlockSpec((None, None, None, g, d), pair_tok)
    pcol = pl.BlockSpec((None, None, None, g, 1), pair_tok)
    pkv = kv_spec(block_size, kvh, d, pair_blk)
    acc = pl.BlockSpec((None, None, None, block_size, d),
                       lambda bi, hi, ji, *refs: (bi, hi, pair_blk(bi, hi, ji, *refs), 0, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, n_tokens=tq, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, kvh, n),
            in_specs=[prow, pkv, pkv, prow, pcol, pcol, acc, acc], out_specs=[acc, acc]),
        out_shape=[jax.ShapeDtypeStruct(dk_acc.shape, jnp.float32)] * 2,
        input_output_aliases={10: 0, 11: 1},  # operand indices count the 4 scalar arrays
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="infllmv2_dkv",
    )(raw, blocks, tok, pos, qg, k, v, dog, lse, delta, dk_acc, dv_acc)
    return dq, dk, dv
