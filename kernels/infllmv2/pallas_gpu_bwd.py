"""Stage-2 backward of InfLLM v2 as backend-neutral Pallas kernels (the GPU-style path).

* dQ: one program per (batch, KV head, token), looping over the token's `topk` blocks like
  the forward, recomputing P from q, k and the forward's LSE.
* dK/dV: one program per (batch, KV head, block). The (token, slot) pairs of a (b, KV head)
  are sorted by block id (`pallas_tpu_bwd.inverse_index`); a searchsorted gives each block
  its range of the sorted list, and the program loops over that range, so each block's
  gradient is summed by one program with no atomics. Blocks no query selected get an empty
  range and write exactly 0.

Same caveats as `pallas_gpu`: tested in interpret mode on CPU only.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .pallas_tpu_bwd import block_probs, grouped_operands, inverse_index, score_grad


def _dq_kernel(idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale: float, block_size: int, cache_len: int, topk: int) -> None:
    t = pl.program_id(2)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(s, acc):
        blk = idx_ref[s]
        safe = jnp.maximum(blk, 0)
        k = k_ref[safe]
        p = block_probs(q, k, lse, safe, t, scale=scale, block_size=block_size,
                        cache_len=cache_len)
        ds = jnp.where(blk >= 0, score_grad(p, do, v_ref[safe], delta), 0.0)
        return acc + jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32) * scale

    acc = jax.lax.fori_loop(0, topk, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = acc.astype(dq_ref.dtype)


def _dkv_kernel(start_ref, tok_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, scale: float, block_size: int, cache_len: int) -> None:
    blk = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    tn = (((0,), (0,)), ((), ()))  # contract the G axis: [G, bs]^T [G, D]

    def body(j, carry):
        dk, dv = carry
        tok = tok_ref[j]
        q, do = q_ref[tok], do_ref[tok]
        p = block_probs(q, k, lse_ref[tok], blk, tok, scale=scale, block_size=block_size,
                        cache_len=cache_len)
        ds = score_grad(p, do, v, delta_ref[tok])
        dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, tn,
                                      preferred_element_type=jnp.float32)
        dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, tn,
                                      preferred_element_type=jnp.float32) * scale
        return dk, dv

    zero = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(start_ref[blk], start_ref[blk + 1], body, (zero, zero))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def sparse_attention_bwd(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array,
                         out: jax.Array, lse: jax.Array, d_out: jax.Array, *, block_size: int,
                         cache_len: int = 0, softmax_scale: float | None = None,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv); same contract as `pallas_tpu_bwd.sparse_attention_bwd`, LSE from
    `pallas_gpu.sparse_attention_fwd(..., return_lse=True)`."""
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g, topk = h // kvh, block_idx.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)

    qg, dog, delta, kb, vb = grouped_operands(q, k, v, out, d_out, block_size)
    nb = kb.shape[2]
    kw = dict(scale=scale, block_size=block_size, cache_len=cache_len)

    tok_map = lambda bi, hi, ti: (bi, hi, ti, 0, 0)  # noqa: E731
    head_map = lambda bi, hi, ti: (bi, hi, 0, 0, 0)  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, topk=topk, **kw),
        grid=(b, kvh, tq),
        in_specs=[pl.BlockSpec((None, None, None, topk), lambda bi, hi, ti: (bi, hi, ti, 0)),
                  pl.BlockSpec((None, None, None, g, d), tok_map),
                  pl.BlockSpec((None, None, nb, block_size, d), head_map),
                  pl.BlockSpec((None, None, nb, block_size, d), head_map),
                  pl.BlockSpec((None, None, None, g, d), tok_map),
                  pl.BlockSpec((None, None, None, g, 1), tok_map),
                  pl.BlockSpec((None, None, None, g, 1), tok_map)],
        out_specs=pl.BlockSpec((None, None, None, g, d), tok_map),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
    )(block_idx.astype(jnp.int32), qg, kb, vb, dog, lse, delta)

    raw, _, tok = inverse_index(block_idx)
    raw, tok = raw.reshape(b, kvh, -1), tok.reshape(b, kvh, -1)
    key = jnp.where(raw < 0, nb, raw)
    starts = jax.vmap(jax.vmap(lambda r: jnp.searchsorted(r, jnp.arange(nb + 1), side="left")))(
        key).astype(jnp.int32)  # [B, KV, nb + 1]: block j owns sorted pairs starts[j]..starts[j+1]

    n = tq * topk
    blk_map = lambda bi, hi, ji: (bi, hi, ji, 0, 0)  # noqa: E731
    whole = lambda bi, hi, ji: (bi, hi, 0, 0, 0)  # noqa: E731
    blk_spec = pl.BlockSpec((None, None, None, block_size, d), blk_map)
    dkb, dvb = pl.pallas_call(
        functools.partial(_dkv_kernel, **kw),
        grid=(b, kvh, nb),
        in_specs=[pl.BlockSpec((None, None, nb + 1), lambda bi, hi, ji: (bi, hi, 0)),
                  pl.BlockSpec((None, None, n), lambda bi, hi, ji: (bi, hi, 0)),
                  pl.BlockSpec((None, None, tq, g, d), whole), blk_spec, blk_spec,
                  pl.BlockSpec((None, None, tq, g, d), whole),
                  pl.BlockSpec((None, None, tq, g, 1), whole),
                  pl.BlockSpec((None, None, tq, g, 1), whole)],
        out_specs=[blk_spec, blk_spec],
        out_shape=[jax.ShapeDtypeStruct(kb.shape, k.dtype), jax.ShapeDtypeStruct(vb.shape, v.dtype)],
        interpret=interpret,
    )(starts, tok, qg, kb, vb, dog, lse, delta)

    def ungroup_kv(x: jax.Array) -> jax.Array:  # [B, KV, nb, bs, D] -> [B, Tk, KV, D]
        return x.transpose(0, 2, 3, 1, 4).reshape(b, -1, kvh, d)[:, :tk]

    return dq.transpose(0, 2, 1, 3, 4).reshape(b, tq, h, d), ungroup_kv(dkb), ungroup_kv(dvb)
