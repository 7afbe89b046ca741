"""Stage-2 backward of InfLLM v2 as backend-neutral Pallas kernels (the GPU-style path).

* dQ: one program per (batch, KV head, token), looping over the token's slots like the
  forward, recomputing P from q, k and the forward's LSE.
* dK/dV: one program per (batch, KV head, aligned block). The (token, slot) pairs of a
  (b, KV head) are sorted by slot code (`pallas_tpu_bwd.inverse_index`, aligned block first);
  a searchsorted gives each block its range of the sorted list, and the program loops over
  that range, so each block's gradient is summed by one program with no atomics. Blocks no
  query selected get an empty range and add nothing.

Same caveats as `pallas_gpu`: tested in interpret mode on CPU only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .pallas_gpu import head_major, slot_keys
from .pallas_tpu_bwd import inverse_index


def _probs(q, k, lse, mask, scale: float):
    sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) * scale
    return jnp.where(mask, jnp.exp(jnp.where(mask, sc, 0.0) - lse), 0.0)


def _score_grad(p, do, v, delta):
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p * (dp - delta)


def _dq_kernel(code_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale: float, block_size: int, n_slots: int, n_keys: int) -> None:
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    g = q.shape[0]

    def body(s, acc):
        start, mask = slot_keys(k_ref, code_ref[s], pos_ref[0], block_size=block_size,
                                n_keys=n_keys, shape=(g, block_size))
        k = k_ref[pl.ds(start, block_size), :]
        ds = _score_grad(_probs(q, k, lse, mask, scale), do,
                         v_ref[pl.ds(start, block_size), :], delta)
        return acc + jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32) * scale

    acc = jax.lax.fori_loop(0, n_slots, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = acc.astype(dq_ref.dtype)


def _dkv_kernel(start_ref, raw_ref, tok_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, scale: float, block_size: int,
                n_keys: int) -> None:
    blk = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    g = q_ref.shape[1]
    tn = (((0,), (0,)), ((), ()))  # contract the G axis: [G, bs]^T [G, D]

    def body(j, carry):
        dk, dv = carry
        tok = tok_ref[j]
        q, do = q_ref[tok], do_ref[tok]
        _, mask = slot_keys(k_ref, raw_ref[j], pos_ref[tok], block_size=block_size,
                            n_keys=n_keys, shape=(g, block_size))
        p = _probs(q, k, lse_ref[tok], mask, scale)
        ds = _score_grad(p, do, v, delta_ref[tok])
        dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, tn,
                                      preferred_element_type=jnp.float32)
        dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, tn,
                                      preferred_element_type=jnp.float32) * scale
        return dk, dv

    zero = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(start_ref[blk], start_ref[blk + 1], body, (zero, zero))
    dk_ref[...] = dk
    dv_ref[...] = dv


def sparse_attention_bwd(qg: jax.Array, k: jax.Array, v: jax.Array, codes: jax.Array,
                         q_pos: jax.Array, lse: jax.Array, delta: jax.Array, dog: jax.Array,
                         dk_acc: jax.Array, dv_acc: jax.Array, *, block_size: int, scale: float,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Same contract as `pallas_tpu_bwd.sparse_attention_bwd`."""
    b, kvh, tq, g, d = qg.shape
    tk, n_slots = k.shape[1], codes.shape[-1]
    kh, vh = head_major(k, block_size), head_major(v, block_size)
    nb = kh.shape[2] // block_size
    kb, vb = (x.reshape(b, kvh, nb, block_size, d) for x in (kh, vh))
    kw = dict(scale=scale, block_size=block_size, n_keys=tk)
    pos = q_pos.astype(jnp.int32)

    tok_map = lambda bi, hi, ti: (bi, hi, ti, 0, 0)  # noqa: E731
    head_map = lambda bi, hi, ti: (bi, hi, 0, 0)  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, n_slots=n_slots, **kw),
        grid=(b, kvh, tq),
        in_specs=[pl.BlockSpec((None, None, None, n_slots), lambda bi, hi, ti: (bi, hi, ti, 0)),
                  pl.BlockSpec((None, None, 1), lambda bi, hi, ti: (bi, ti, 0)),
                  pl.BlockSpec((None, None, None, g, d), tok_map),
                  pl.BlockSpec((None, None, kh.shape[2], d), head_map),
                  pl.BlockSpec((None, None, kh.shape[2], d), head_map),
                  pl.BlockSpec((None, None, None, g, d), tok_map),
                  pl.BlockSpec((None, None, None, g, 1), tok_map),
                  pl.BlockSpec((None, None, None, g, 1), tok_map)],
        out_specs=pl.BlockSpec((None, None, None, g, d), tok_map),
        out_shape=jax.ShapeDtypeStruct(qg.shape, qg.dtype),
        interpret=interpret,
        name="infllmv2_dq",
    )(codes, pos[..., None], qg, kh, vh, dog, lse, delta)

    raw, _, tok = inverse_index(codes, block_size)
    raw, tok = raw.reshape(b, kvh, -1), tok.reshape(b, kvh, -1)
    key = jnp.where(raw < 0, nb, raw // (block_size * block_size))
    starts = jax.vmap(jax.vmap(lambda r: jnp.searchsorted(r, jnp.arange(nb + 1), side="left")))(
        key).astype(jnp.int32)  # [B, KV, nb + 1]: block j owns sorted pairs starts[j]..starts[j+1]

    n = tq * n_slots
    blk_map = lambda bi, hi, ji: (bi, hi, ji, 0, 0)  # noqa: E731
    whole = lambda bi, hi, ji: (bi, hi, 0, 0, 0)  # noqa: E731
    blk_spec = pl.BlockSpec((None, None, None, block_size, d), blk_map)
    per_head = lambda size: pl.BlockSpec((None, None, size),  # noqa: E731
                                         lambda bi, hi, ji: (bi, hi, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **kw),
        grid=(b, kvh, nb),
        in_specs=[per_head(nb + 1), per_head(n), per_head(n),
                  pl.BlockSpec((None, tq), lambda bi, hi, ji: (bi, 0)),
                  pl.BlockSpec((None, None, tq, g, d), whole), blk_spec, blk_spec,
                  pl.BlockSpec((None, None, tq, g, d), whole),
                  pl.BlockSpec((None, None, tq, g, 1), whole),
                  pl.BlockSpec((None, None, tq, g, 1), whole)],
        out_specs=[blk_spec, blk_spec],
        out_shape=[jax.ShapeDtypeStruct(kb.shape, jnp.float32)] * 2,
        interpret=interpret,
        name="infllmv2_dkv",
    )(starts, raw, tok, pos, qg, kb, vb, dog, lse, delta)
    return dq, dk_acc + dk, dv_acc + dv
