"""Production stage 1 of InfLLM v2 (spec MINICPM4.md §2.2 steps A-G) in plain XLA.

Queries are processed in chunks with `lax.map`, so the live score tensor is
[B, KV, G, chunk, n_kernels] instead of [Tq, Tk]: 128K tokens fit. No gradient flows
through selection (the caller gets stop_gradient'ed indices), as in HF (`torch.no_grad`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def pooled_kernels(k: jax.Array, size: int, stride: int) -> jax.Array:
    """Mean of every full window k[stride*j : stride*j+size] -> [B, KV, n, D] f32.

    Built from stride-sized sub-means (size must be a multiple of stride, true for 32/16 and
    128/64), which avoids a long cumsum and its f32 cancellation at 128K.
    """
    if size % stride:
        raise ValueError(f"kernel_size {size} must be a multiple of kernel_stride {stride}")
    b, tk, kvh, d = k.shape
    n = (tk - size) // stride + 1 if tk >= size else 0
    if n == 0:
        return jnp.zeros((b, kvh, 0, d), jnp.float32)
    r = size // stride
    m = n + r - 1  # number of stride chunks the kernels touch
    sub = k[:, : m * stride].astype(jnp.float32).reshape(b, m, stride, kvh, d).mean(axis=2)
    kern = sum(sub[:, i: i + n] for i in range(r)) / r
    return jnp.transpose(kern, (0, 2, 1, 3))


def _block_kernel_windows(n_blocks: int, n1: int, size: int, stride: int,
                          block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Static [n_blocks, w] kernel ids intersecting each block, and their validity mask.

    Generalises HF's max-pool (kernel 5, stride 4, pad 1 for 32/16/64): kernel j covers
    [stride*j, stride*j+size-1], block b covers [block_size*b, block_size*b+block_size-1].
    """
    blocks = np.arange(n_blocks)
    lo = np.maximum(-((size - 1 - block_size * blocks) // stride), 0)  # ceil((bs*b-size+1)/st)
    hi = np.minimum((block_size * blocks + block_size - 1) // stride, n1 - 1)
    w = max(int((hi - lo).max()) + 1, 1) if n_blocks else 1
    ids = lo[:, None] + np.arange(w)[None, :]
    valid = ids <= hi[:, None]
    return np.where(valid, ids, 0).astype(np.int32), valid


def select_blocks_chunked(q: jax.Array, k: jax.Array, *, kernel_size: int, kernel_stride: int,
                          block_size: int, topk: int, init_blocks: int, local_blocks: int,
                          lse_approx: bool = True, cache_len: int = 0,
                          query_chunk: int = 256) -> jax.Array:
    """Stage 1 over query chunks. Same contract as `api.select_blocks`."""
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    decode = tq == 1 and cache_len > 0
    scale = 1.0 / math.sqrt(d)
    kc1 = pooled_kernels(k, kernel_size, kernel_stride)
    end1 = kernel_stride * jnp.arange(kc1.shape[2]) + kernel_size - 1
    if lse_approx:
        kc2 = pooled_kernels(k, 4 * kernel_size, 4 * kernel_stride)
        end2 = 4 * kernel_stride * jnp.arange(kc2.shape[2]) + 4 * kernel_size - 1
    else:
        kc2, end2 = kc1, end1
    n1 = kc1.shape[2]
    n_blocks = -(-tk // block_size)
    ids, valid = _block_kernel_windows(n_blocks, n1, kernel_size, kernel_stride, block_size)
    kk = min(topk, n_blocks)

    chunk = min(query_chunk, tq)
    n_chunks = -(-tq // chunk)
    qp = jnp.pad(q, ((0, 0), (0, n_chunks * chunk - tq), (0, 0), (0, 0)))
    qc = qp.reshape(b, n_chunks, chunk, kvh, g, d).transpose(1, 0, 3, 4, 2, 5)  # [n, B, KV, G, c, D]
    pos = (cache_len + jnp.arange(n_chunks * chunk)).reshape(n_chunks, chunk)

    def one_chunk(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        qch, qpos = args
        qch = qch.astype(jnp.float32)

        def scores(kc: jax.Array, ends: jax.Array) -> tuple[jax.Array, jax.Array]:
            s = jnp.einsum("bkgcd,bknd->bkgcn", qch, kc) * scale
            vis = jnp.ones((chunk, kc.shape[2]), bool) if decode else ends[None, :] <= qpos[:, None]
            return s, vis

        s1, vis1 = scores(kc1, end1)
        s2, vis2 = (scores(kc2, end2) if lse_approx else (s1, vis1))
        lse = jax.nn.logsumexp(jnp.where(vis2, s2, -jnp.inf), axis=-1, keepdims=True)
        p = jnp.where(vis1, jnp.exp(s1 - lse), 0.0)
        shared = jnp.where(jnp.isfinite(p), p, 0.0).sum(axis=2)  # [B, KV, c, n1]
        if n1:
            score = jnp.where(valid, shared[..., ids], -jnp.inf).max(axis=-1)
        else:
            score = jnp.full(shared.shape[:-1] + (n_blocks,), -jnp.inf)
        blocks = jnp.arange(n_blocks)
        qblock = (qpos // block_size)[:, None]
        forced = (blocks < init_blocks) | ((blocks >= qblock - local_blocks) & (blocks <= qblock))
        score = jnp.where(forced, jnp.inf, score)
        _, idx = jax.lax.top_k(score, kk)
        # ascending order with dropped (future) blocks last, as -1
        idx = jnp.sort(jnp.where(idx > qblock, n_blocks, idx), axis=-1)
        return jnp.where(idx == n_blocks, -1, idx).astype(jnp.int32)

    out = jax.lax.map(one_chunk, (qc, pos))  # [n, B, KV, c, kk]
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, kvh, n_chunks * chunk, kk)[:, :, :tq]
    out = jnp.pad(out, ((0, 0), (0, 0), (0, 0), (0, topk - kk)), constant_values=-1)
    return jax.lax.stop_gradient(out)
