"""Public InfLLM v2 API: block selection (stage 1) and block-sparse attention (stage 2).

Standalone: depends only on jax. Algorithm: InfLLM-V2, arXiv 2509.24663 §3 (steps A-H as named in README.md).
MiniCPM4 callers pass `topk = sparse_config.topk + window_size // block_size` (64 + 32 = 96)
and `local_blocks = window_size // block_size` (32), as HF modeling_minicpm.py does.
"""
from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from .attention_xla import sparse_attention_xla
from .reference import select_blocks_reference, sparse_attention_reference
from .selection import select_blocks_chunked, select_from_kernels

Implementation = Literal["auto", "xla", "reference", "pallas_tpu", "pallas_gpu", "pallas_interpret",
                         "pallas_gpu_interpret"]


@functools.partial(jax.jit, static_argnames=(
    "kernel_size", "kernel_stride", "block_size", "topk", "init_blocks", "local_blocks",
    "lse_approx", "cache_len", "query_chunk", "implementation"))
def select_blocks(q: jax.Array, k: jax.Array, *, kernel_size: int, kernel_stride: int,
                  block_size: int, topk: int, init_blocks: int, local_blocks: int,
                  lse_approx: bool = True, cache_len: int = 0, query_chunk: int = 256,
                  implementation: Literal["xla", "reference"] = "xla") -> jax.Array:
    """Stage 1: per (batch, KV head, query) the ascending list of selected blocks, -1 padded.

    q [B, Tq, H, D] and k [B, Tk, KV, D] after RoPE, Tk = cache_len + Tq. Query t has absolute
    position cache_len + t. Decode (Tq == 1, cache_len > 0) sees every full kernel, as HF's
    non-causal decode stage 1. Returns int32 [B, KV, Tq, topk], no gradient.
    """
    _check_lengths(q, k, cache_len)
    kw = dict(kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size,
              topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
              lse_approx=lse_approx, cache_len=cache_len)
    if implementation == "reference":
        return select_blocks_reference(q, k, **kw)
    return select_blocks_chunked(q, k, query_chunk=query_chunk, **kw)


def _check_lengths(q: jax.Array, k: jax.Array, cache_len: int) -> None:
    if k.shape[1] != cache_len + q.shape[1]:
        raise ValueError(f"need Tk == cache_len + Tq, got Tk={k.shape[1]}, cache_len={cache_len}, "
                         f"Tq={q.shape[1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"H={q.shape[2]} is not a multiple of KV={k.shape[2]}")


def _pallas_pair(kind: str):
    """(forward, backward) of a Pallas variant with its interpret flag bound; imported lazily
    so CPU-only use needs no GPU bits."""
    if kind in ("pallas_tpu", "pallas_interpret"):
        from .pallas_tpu import sparse_attention_fwd as fwd
        from .pallas_tpu_bwd import sparse_attention_bwd as bwd
        interpret = kind == "pallas_interpret"
    else:
        from .pallas_gpu import sparse_attention_fwd as fwd
        from .pallas_gpu_bwd import sparse_attention_bwd as bwd
        interpret = kind == "pallas_gpu_interpret"
    return (functools.partial(fwd, interpret=interpret), functools.partial(bwd, interpret=interpret))


# Scalar memory holds each Pallas call's prefetched block ids (B*KV*Tq*topk int32; the TPU dK/dV
# kernel prefetches three such arrays) and is 1 MiB on v5e. Calls therefore run over query chunks
# whose three index arrays take at most 3/4 of that; a 4K-token 8B-shaped call (KV 2, topk 96)
# needed 3 MiB in one piece and did not compile.
SMEM_INDEX_ENTRIES = (3 * 2**20 // 4) // (3 * 4)


def query_chunk_for(batch: int, kv_heads: int, topk: int, tq: int) -> int:
    """Largest query chunk (a power of two, or all of ``tq``) whose block ids fit the budget."""
    rows = max(1, SMEM_INDEX_ENTRIES // (batch * kv_heads * topk))
    if rows >= tq:
        return tq
    return 1 << (rows.bit_length() - 1)


def _chunks(tq: int, chunk: int) -> list[tuple[int, int]]:
    return [(c, min(c + chunk, tq)) for c in range(0, tq, chunk)]


def _forward_chunks(q, k, v, block_idx, kind, block_size, cache_len, scale, chunk, with_lse):
    # one kernel call per query chunk: chunk [a, b) holds the queries at cache_len + a ... and
    # attends to the full k/v (later keys are masked by position, later blocks never selected)
    fwd = _pallas_pair(kind)[0]
    res = [fwd(q[:, a:b], k, v, block_idx[:, :, a:b], block_size=block_size,
               cache_len=cache_len + a, softmax_scale=scale, return_lse=with_lse)
           for a, b in _chunks(q.shape[1], chunk)]
    if not with_lse:
        return jnp.concatenate(res, axis=1)
    return (jnp.concatenate([o for o, _ in res], axis=1),
            jnp.concatenate([lse for _, lse in res], axis=2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _kernel_attention(q, k, v, block_idx, kind, block_size, cache_len, scale, chunk):
    return _forward_chunks(q, k, v, block_idx, kind, block_size, cache_len, scale, chunk, False)


def _kernel_attention_fwd(q, k, v, block_idx, kind, block_size, cache_len, scale, chunk):
    out, lse = _forward_chunks(q, k, v, block_idx, kind, block_size, cache_len, scale, chunk,
                               True)
    return out, (q, k, v, block_idx, out, lse)


def _kernel_attention_bwd(kind, block_size, cache_len, scale, chunk, res, g):
    # Pallas dQ and dK/dV kernels per query chunk, recomputing P from the forward's log-sum-exp;
    # every chunk contributes to the full dK/dV.
    q, k, v, block_idx, out, lse = res
    bwd = _pallas_pair(kind)[1]
    dqs, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for a, b in _chunks(q.shape[1], chunk):
        dq_c, dk_c, dv_c = bwd(q[:, a:b], k, v, block_idx[:, :, a:b], out[:, a:b],
                               lse[:, :, a:b], g[:, a:b], block_size=block_size,
                               cache_len=cache_len + a, softmax_scale=scale)
        dqs.append(dq_c)
        dk, dv = dk + dk_c.astype(jnp.float32), dv + dv_c.astype(jnp.float32)
    return jnp.concatenate(dqs, axis=1), dk.astype(k.dtype), dv.astype(v.dtype), None


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def default_implementation() -> str:
    """Pallas on TPU; the XLA gather path elsewhere (the GPU kernel is opt-in, see pallas_gpu)."""
    return "pallas_tpu" if jax.default_backend() == "tpu" else "xla"


@functools.partial(jax.jit, static_argnames=(
    "block_size", "cache_len", "softmax_scale", "implementation", "query_chunk"))
def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array, *,
                     block_size: int, cache_len: int = 0, softmax_scale: float | None = None,
                     implementation: Implementation = "auto",
                     query_chunk: int | None = None) -> jax.Array:
    """Stage 2: each query attends, causally at token level, only to its group's selected blocks.

    q [B, Tq, H, D], k/v [B, Tk, KV, D], block_idx from `select_blocks`. Differentiable in
    q, k, v. Rows with no visible key return zeros. ``query_chunk`` (Pallas only): queries per
    kernel call; default `query_chunk_for` (the scalar-memory budget of the block ids).
    """
    _check_lengths(q, k, cache_len)
    impl = default_implementation() if implementation == "auto" else implementation
    kw = dict(block_size=block_size, cache_len=cache_len, softmax_scale=softmax_scale)
    if impl == "reference":
        return sparse_attention_reference(q, k, v, block_idx, **kw)
    if impl == "xla":
        return sparse_attention_xla(q, k, v, block_idx, (cache_len + jnp.arange(q.shape[1]))[None],
                                    block_size=block_size, softmax_scale=softmax_scale)
    b, kvh, tq, topk = block_idx.shape
    chunk = query_chunk or query_chunk_for(b, kvh, topk, tq)
    return _kernel_attention(q, k, v, block_idx, impl, block_size, cache_len, softmax_scale,
                             chunk)


# ---------------------------------------------------------------- queries at dynamic positions

def _check_positioned(q: jax.Array, kv_heads: int, q_pos: jax.Array) -> None:
    if q.shape[2] % kv_heads:
        raise ValueError(f"H={q.shape[2]} is not a multiple of KV={kv_heads}")
    if q_pos.shape != q.shape[:2] or not jnp.issubdtype(q_pos.dtype, jnp.integer):
        raise ValueError(f"q_pos must be integer [B, Tq] = {q.shape[:2]}, got {q_pos.dtype}"
                         f"{list(q_pos.shape)}")


@functools.partial(jax.jit, static_argnames=(
    "kv_len", "kernel_size", "kernel_stride", "block_size", "topk", "init_blocks",
    "local_blocks", "query_chunk"))
def select_blocks_at(q: jax.Array, fine: jax.Array, coarse: jax.Array | None, q_pos: jax.Array,
                     *, kv_len: int, kernel_size: int, kernel_stride: int, block_size: int,
                     topk: int, init_blocks: int, local_blocks: int,
                     query_chunk: int = 256) -> jax.Array:
    """Stage 1 for queries at per-row positions ``q_pos [B, Tq]`` from pooled keys kept in a
    cache of ``kv_len`` positions (decode, speculative verification, prefill chunks).

    ``fine [B, KV, N, D]``: kernel j is the mean of keys ``stride*j .. stride*j+size-1``;
    ``coarse`` the 4x kernels for the LSE approximation (None: use ``fine``). A kernel counts
    once the query has reached its last key, so stale kernels past a row's length are never
    seen. Returns int32 ``[B, KV, Tq, topk]`` as `select_blocks`; -1 everywhere for q_pos < 0.
    """
    _check_positioned(q, fine.shape[1], q_pos)
    return select_from_kernels(q, fine, coarse, q_pos, n_blocks=-(-kv_len // block_size),
                               kernel_size=kernel_size, kernel_stride=kernel_stride,
                               block_size=block_size, topk=topk, init_blocks=init_blocks,
                               local_blocks=local_blocks, query_chunk=query_chunk)


@functools.partial(jax.jit, static_argnames=("block_size", "softmax_scale"))
def sparse_attention_at(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array,
                        q_pos: jax.Array, *, block_size: int,
                        softmax_scale: float | None = None) -> jax.Array:
    """Stage 2 for queries at per-row positions ``q_pos [B, Tq]`` in a position-addressed KV
    cache ``k/v [B, S, KV, D]`` (key s stored at position s).

    Gathers only the ``topk * block_size`` keys of each query's selected blocks (XLA gather
    path on every backend), so FLOPs and bytes read do not grow with S. Key s is visible iff
    its block is in ``block_idx [B, KV, Tq, topk]`` and ``s <= q_pos``; rows with no visible
    key (q_pos < 0: padding) return zeros.
    """
    _check_positioned(q, k.shape[2], q_pos)
    want = (q.shape[0], k.shape[2], q.shape[1])
    if block_idx.shape[:3] != want:
        raise ValueError(f"block_idx must be [B, KV, Tq, topk] with [B, KV, Tq] = {list(want)}, "
                         f"got {list(block_idx.shape)}")
    return sparse_attention_xla(q, k, v, block_idx, q_pos, block_size=block_size,
                                softmax_scale=softmax_scale)
