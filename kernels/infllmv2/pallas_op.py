"""The Pallas stage-2 kernels (TPU or GPU style) as one differentiable op.

``attention(q, k, v, codes, q_pos)`` runs a backend's forward kernel and, under a `custom_vjp`,
its dQ and dK/dV kernels; `documents.kernel_slots` makes ``codes`` from block ids. The TPU
kernels keep each call's prefetched slot codes and positions in scalar memory (1 MiB on v5e), so
they run over query chunks: `lax.map` / `lax.scan` over the chunks with one compiled kernel
(positions come in as data, not as static offsets), the dK/dV kernel adding each chunk's
gradient into the accumulator it aliases. Compile time and kernel count are therefore the same
at 4K and at 128K.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from .layout import heads_view, kv_heads

# Scalar memory holds a TPU call's prefetched slot codes (B*KV*Tq*S int32; the dK/dV kernel
# prefetches three such arrays, plus B*Tq positions) and is 1 MiB on v5e. Calls run over query
# chunks whose arrays take at most 3/4 of that; a 4K-token 8B-shaped call (KV 2, 96 slots)
# needed 3 MiB in one piece and did not compile.
SMEM_INDEX_ENTRIES = (3 * 2**20 // 4) // (3 * 4)


def query_chunk_for(batch: int, kv_heads: int, slots: int, tq: int) -> int:
    """Largest query chunk (a power of two, or all of ``tq``) whose codes fit the budget."""
    rows = max(1, SMEM_INDEX_ENTRIES // (batch * kv_heads * slots + batch))
    if rows >= tq:
        return tq
    return 1 << (rows.bit_length() - 1)


class Kernels(NamedTuple):
    """A backend's forward and backward (see `pallas_tpu`, `pallas_tpu_bwd`) with its
    interpret flag bound, and whether scalar memory bounds a call (TPU)."""

    fwd: Callable[..., Any]
    bwd: Callable[..., Any]
    chunked: bool


def group_queries(x: jax.Array, kv_heads: int) -> jax.Array:
    """[B, Tq, H, D] -> [B, KV, Tq, G, D]: the G query heads of a KV head, per token."""
    b, tq, h, d = x.shape
    return x.reshape(b, tq, kv_heads, h // kv_heads, d).transpose(0, 2, 1, 3, 4)


def ungroup_queries(x: jax.Array) -> jax.Array:
    b, kvh, tq, g, d = x.shape
    return x.transpose(0, 2, 1, 3, 4).reshape(b, tq, kvh * g, d)


def _chunked(xs: tuple[jax.Array, ...], axes: tuple[int, ...], fills: tuple[Any, ...],
             chunk: int) -> tuple[jax.Array, ...]:
    """Each x split along its token axis into ``[n_chunks, ...]`` leading chunks, padded."""
    out = []
    for x, axis, fill in zip(xs, axes, fills):
        tq = x.shape[axis]
        n = -(-tq // chunk)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, n * chunk - tq)
        x = jnp.pad(x, pad, constant_values=fill)
        x = x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1:])
        out.append(jnp.moveaxis(x, axis, 0))
    return tuple(out)


def _unchunked(x: jax.Array, axis: int, tq: int) -> jax.Array:
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, tq, axis=axis)


def _chunk_for(kern: Kernels, qg: jax.Array, codes: jax.Array, query_chunk: int | None) -> int:
    b, kvh, tq = qg.shape[:3]
    if query_chunk:
        return min(query_chunk, tq)
    return query_chunk_for(b, kvh, codes.shape[-1], tq) if kern.chunked else tq


def _forward(kern: Kernels, block_size: int, scale: float, query_chunk: int | None,
             qg: jax.Array, k: jax.Array, v: jax.Array, codes: jax.Array, q_pos: jax.Array,
             with_lse: bool):
    fwd = functools.partial(kern.fwd, block_size=block_size, scale=scale, return_lse=with_lse)
    tq = qg.shape[2]
    chunk = _chunk_for(kern, qg, codes, query_chunk)
    if chunk >= tq:
        return fwd(qg, k, v, codes, q_pos)
    qc, cc, pc = _chunked((qg, codes, q_pos), (2, 2, 1), (0, -1, -1), chunk)
    res = jax.lax.map(lambda a: fwd(a[0], k, v, a[1], a[2]), (qc, cc, pc))
    if not with_lse:
        return _unchunked(res, 2, tq)
    return _unchunked(res[0], 2, tq), _unchunked(res[1], 2, tq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _attention(kern, block_size, scale, query_chunk, qg, k, v, codes, q_pos):
    return _forward(kern, block_size, scale, query_chunk, qg, k, v, codes, q_pos, False)


def _attention_fwd(kern, block_size, scale, query_chunk, qg, k, v, codes, q_pos):
    out, lse = _forward(kern, block_size, scale, query_chunk, qg, k, v, codes, q_pos, True)
    return out, (qg, k, v, codes, q_pos, out, lse)


def _attention_bwd(kern, block_size, scale, query_chunk, res, dog):
    qg, k_in, v_in, codes, q_pos, out, lse = res
    b, kvh, tq, _, d = qg.shape
    tk = k_in.shape[1]
    nb = -(-tk // block_size)
    delta = (dog.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True)
    acc = tuple(jnp.zeros((b, kvh, nb, block_size, d), jnp.float32) for _ in range(2))
    bwd = functools.partial(kern.bwd, block_size=block_size, scale=scale)
    k, v = heads_view(k_in, d), heads_view(v_in, d)  # the backward kernels read the heads layout
    chunk = _chunk_for(kern, qg, codes, query_chunk)
    if chunk >= tq:
        dq, dk, dv = bwd(qg, k, v, codes, q_pos, lse, delta, dog, *acc)
    else:
        xs = _chunked((qg, codes, q_pos, lse, delta, dog), (2, 2, 1, 2, 2, 2),
                      (0, -1, -1, 0, 0, 0), chunk)

        def step(carry, a):
            dq_c, dk_c, dv_c = bwd(a[0], k, v, a[1], a[2], a[3], a[4], a[5], *carry)
            return (dk_c, dv_c), dq_c

        (dk, dv), dqs = jax.lax.scan(step, acc, xs)
        dq = _unchunked(dqs, 2, tq)

    def rows(x: jax.Array, like: jax.Array) -> jax.Array:  # [B, KV, nb, bs, D] -> like's layout
        return x.transpose(0, 2, 3, 1, 4).reshape(b, nb * block_size, kvh, d)[:, :tk].reshape(
            like.shape).astype(like.dtype)

    return dq, rows(dk, k_in), rows(dv, v_in), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(kern: Kernels, q: jax.Array, k: jax.Array, v: jax.Array, codes: jax.Array,
              q_pos: jax.Array, *, block_size: int, scale: float,
              query_chunk: int | None = None, return_lse: bool = False
              ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """q [B, Tq, H, D], k/v [B, Tk, KV, D] (or lane-packed [B, Tk, KV * D]: `layout`; only the
    TPU forward reads them so), codes [B, KV, Tq, S], q_pos [B, Tq] -> [B, Tq, H, D];
    differentiable in q, k, v. ``query_chunk``: queries per kernel call (default: all, or the
    scalar-memory budget for TPU kernels). ``return_lse``: the forward kernel's log-sum-exp
    ``[B, Tq, H]`` too, without a gradient (the merge of tree attention, inference only)."""
    kvh = kv_heads(k, q.shape[-1])
    q_pos = jnp.broadcast_to(q_pos, q.shape[:2]).astype(jnp.int32)
    qg = group_queries(q, kvh)
    if return_lse:
        out, lse = _forward(kern, block_size, scale, query_chunk, qg, k, v, codes, q_pos, True)
        return ungroup_queries(out), ungroup_queries(lse)[..., 0]
    return ungroup_queries(_attention(kern, block_size, scale, query_chunk, qg, k, v, codes,
                                      q_pos))
