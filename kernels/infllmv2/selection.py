"""Production stage 1 of InfLLM v2 (InfLLM-V2, arXiv 2509.24663 §3, steps A-G of README.md) in plain XLA.

One core, `select_from_pooled`, does steps C-G (scores against pooled keys, LSE approximation,
group sum, block max-pool, forced init/local blocks, top-k) for any kernel layout; callers
supply the visibility of each kernel and the block max-pool of their layout. `select_from_kernels`
is the layout of pooled keys at their fixed positions (the op, and decode from cached kernels);
`cpmjax.sparse.masked` is the document-relative layout of packed rows.

Queries are processed in chunks with `lax.map`, so the live score tensor is
[B, KV, G, chunk, n_kernels] instead of [Tq, Tk]: 128K tokens fit. No gradient flows
through selection (the caller gets stop_gradient'ed indices), as in HF (`torch.no_grad`).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .documents import DocumentKernels, Documents, document_kernels

Pooled = tuple[jax.Array, jax.Array]  # kernels [B, KV, N, D] f32, visible (broadcasts to [B, KV, G, Tq, N])
BlockMax = Callable[[jax.Array], jax.Array]  # [B, KV, Tq, N] kernel scores -> [B, KV, Tq, n_blocks]


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


def select_from_pooled(q: jax.Array, fine: Pooled, coarse: Pooled | None, q_pos: jax.Array,
                       block_max: BlockMax, *, n_blocks: int, block_size: int, topk: int,
                       init_blocks: int, local_blocks: int, dense: jax.Array | None = None,
                       slots: int | None = None,
                       own: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Steps C-G for queries ``q [B, KV, G, Tq, D]`` at positions ``q_pos [B or 1, Tq]``.

    ``fine`` gives the block scores; ``coarse`` (None: ``fine``) the log-sum-exp that
    normalises them (HF's LSE approximation). Kernels that are not visible score 0, blocks
    that ``block_max`` gives no kernel score -inf, as HF. ``dense [B or 1, Tq]`` (optional)
    marks queries of sequences in dense mode (HF's ``dense_len`` switch): they keep every block
    up to their own, which needs ``slots`` (>= topk) entries. ``own = (kernel [B, KV, Tq, D],
    index [B, Tq])`` (optional): a normalising kernel of each query's own, which stands in for
    (and makes visible) the one at ``index`` (-1: none); a speculation-tree node's kernel
    over its own ancestors. Returns int32 ``[B, KV, Tq, slots or topk]``: selected blocks
    ascending, -1 for unused slots and for blocks after the query's own.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    qf = q.astype(jnp.float32)
    slots = topk if slots is None else slots

    def scores(pooled: Pooled) -> tuple[jax.Array, jax.Array]:
        kc, vis = pooled
        return jnp.einsum("bkgtd,bknd->bkgtn", qf, kc) * scale, vis

    s1, vis1 = scores(fine)
    s2, vis2 = (s1, vis1) if coarse is None else scores(coarse)
    if own is not None:  # put it in its place: the same reduction as a cached kernel's
        hit = (jnp.arange(s2.shape[-1]) == own[1][:, None, None, :, None])
        s_own = jnp.einsum("bkgtd,bktd->bkgt", qf, own[0]) * scale
        s2, vis2 = jnp.where(hit, s_own[..., None], s2), vis2 | hit
    lse = jax.nn.logsumexp(jnp.where(vis2, s2, -jnp.inf), axis=-1, keepdims=True)
    p = jnp.where(vis1, jnp.exp(s1 - lse), 0.0)
    shared = jnp.where(jnp.isfinite(p), p, 0.0).sum(axis=2)  # step E: [B, KV, Tq, N]
    score = block_max(shared)  # step F
    blocks = jnp.arange(n_blocks)
    qblock = (q_pos // block_size)[:, None, :, None]
    forced = (blocks < init_blocks) | ((blocks >= qblock - local_blocks) & (blocks <= qblock))
    if dense is not None:
        forced |= dense[:, None, :, None] & (blocks <= qblock)
    score = jnp.where(forced, jnp.inf, score)
    kk = min(topk, n_blocks)
    wide = min(slots, n_blocks) if dense is not None else kk
    _, idx = jax.lax.top_k(score, wide)  # step G (descending, ties to the lower block)
    if wide > kk:  # a sparse-mode query keeps its top kk only
        keep = jnp.arange(wide) < jnp.where(dense[:, None, :, None], wide, kk)
        idx = jnp.where(keep, idx, n_blocks)
    # ascending order with dropped (future) blocks last, as -1
    idx = jnp.sort(jnp.where(idx > qblock, n_blocks, idx), axis=-1)
    idx = jnp.where(idx == n_blocks, -1, idx).astype(jnp.int32)
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, 0), (0, slots - wide)), constant_values=-1)
    return jax.lax.stop_gradient(idx)


def window_block_max(n_kernels: int, n_blocks: int, size: int, stride: int,
                     block_size: int) -> BlockMax:
    """Step F for kernels at fixed positions (kernel j spans ``stride*j .. stride*j+size-1``)."""
    ids, valid = _block_kernel_windows(n_blocks, n_kernels, size, stride, block_size)

    def block_max(shared: jax.Array) -> jax.Array:
        if n_kernels == 0:
            return jnp.full(shared.shape[:-1] + (n_blocks,), -jnp.inf)
        return jnp.where(valid, shared[..., ids], -jnp.inf).max(axis=-1)

    return block_max


def _over_query_chunks(q: jax.Array, kv_heads: int, per_query: tuple[jax.Array, ...],
                       query_chunk: int, select_chunk: Callable[..., jax.Array]) -> jax.Array:
    """Run ``select_chunk(q_chunk [B, KV, G, c, D], *per_query_chunks [B or 1, c, ...])`` over query
    chunks with ``lax.map`` (live scores ``[B, KV, G, c, n_kernels]``, never ``Tq x Tk``);
    padded queries get position -1. Returns the chunks' ``[B, KV, c, S]`` joined on Tq."""
    b, tq, h, d = q.shape
    chunk = min(query_chunk, tq)
    n_chunks = -(-tq // chunk)
    pad = n_chunks * chunk - tq

    def split(x: jax.Array, fill: int | bool) -> jax.Array:  # [B|1, Tq, ...] -> [n, B|1, c, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:]), 1, 0)

    kvh = kv_heads
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = qc.reshape(b, n_chunks, chunk, kvh, h // kvh, d).transpose(1, 0, 3, 4, 2, 5)
    chunks = tuple(split(x, False if x.dtype == bool else -1) for x in per_query)
    out = jax.lax.map(lambda a: select_chunk(*a), (qc, *chunks))  # [n, B, KV, c, S]
    return out.transpose(1, 2, 0, 3, 4).reshape(b, kvh, n_chunks * chunk, -1)[:, :, :tq]


def select_from_kernels(q: jax.Array, fine: jax.Array, coarse: jax.Array | None,
                        q_pos: jax.Array, *, n_blocks: int, kernel_size: int, kernel_stride: int,
                        block_size: int, topk: int, init_blocks: int, local_blocks: int,
                        query_chunk: int = 256, dense: jax.Array | None = None,
                        slots: int | None = None, seen: jax.Array | None = None,
                        own: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Stage 1 from pooled keys ``[B, KV, N, D]`` at their fixed positions, over query chunks.

    ``q [B, Tq, H, D]`` at positions ``q_pos [B or 1, Tq]`` (per row and dynamic in decode from
    a position-addressed cache); a kernel is visible once the query has reached its last key,
    or once ``seen [B, Tq]`` (default ``q_pos``) has. ``coarse`` (4x kernels) gives the LSE
    approximation, None uses ``fine``. ``dense`` and ``slots`` as `select_from_pooled`; ``own
    = (kernel [B, Tq, KV, D], coarse index [B, Tq])`` as its ``own``. Returns int32
    ``[B, KV, Tq, slots or topk]``.
    """
    end1 = kernel_stride * jnp.arange(fine.shape[2]) + kernel_size - 1
    end2 = 4 * kernel_stride * jnp.arange(coarse.shape[2]) + 4 * kernel_size - 1 if (
        coarse is not None) else None
    block_max = window_block_max(fine.shape[2], n_blocks, kernel_size, kernel_stride, block_size)
    kw = dict(n_blocks=n_blocks, block_size=block_size, topk=topk, init_blocks=init_blocks,
              local_blocks=local_blocks, slots=slots)
    seen = q_pos if seen is None else seen
    per_query = {"qpos": q_pos, "seen": jnp.broadcast_to(seen, q_pos.shape)}
    if dense is not None:
        per_query["dense"] = jnp.broadcast_to(dense, q_pos.shape)
    if own is not None:
        per_query["own_kernel"], per_query["own_index"] = own
    names = tuple(per_query)

    def one_chunk(qch: jax.Array, *chunks: jax.Array) -> jax.Array:
        a = dict(zip(names, chunks))

        def visible(ends: jax.Array) -> jax.Array:
            return ends <= a["seen"][:, None, None, :, None]

        mine = None if own is None else (jnp.swapaxes(a["own_kernel"], 1, 2), a["own_index"])
        return select_from_pooled(
            qch, (fine, visible(end1)), None if coarse is None else (coarse, visible(end2)),
            a["qpos"], block_max, dense=a.get("dense"), own=mine, **kw)

    return _over_query_chunks(q, fine.shape[1], tuple(per_query.values()), query_chunk,
                              one_chunk)


def select_blocks_chunked(q: jax.Array, k: jax.Array, *, kernel_size: int, kernel_stride: int,
                          block_size: int, topk: int, init_blocks: int, local_blocks: int,
                          lse_approx: bool = True, cache_len: int = 0,
                          query_chunk: int = 256) -> jax.Array:
    """Stage 1 over query chunks. Same contract as `api.select_blocks` without documents.

    Query t sits at ``cache_len + t``; in decode (Tq == 1) every full kernel ends at or before
    it, which is HF's non-causal decode stage 1.
    """
    fine = pooled_kernels(k, kernel_size, kernel_stride)
    coarse = pooled_kernels(k, 4 * kernel_size, 4 * kernel_stride) if lse_approx else None
    q_pos = (cache_len + jnp.arange(q.shape[1]))[None]
    return select_from_kernels(q, fine, coarse, q_pos, n_blocks=-(-k.shape[1] // block_size),
                               kernel_size=kernel_size, kernel_stride=kernel_stride,
                               block_size=block_size, topk=topk, init_blocks=init_blocks,
                               local_blocks=local_blocks, query_chunk=query_chunk)


def select_blocks_packed(q: jax.Array, k: jax.Array, docs: Documents, *, kernel_size: int,
                         kernel_stride: int, block_size: int, topk: int, init_blocks: int,
                         local_blocks: int, lse_approx: bool = True, cache_len: int = 0,
                         query_chunk: int = 256, dense_len: int = -1,
                         slots: int | None = None) -> jax.Array:
    """Stage 1 for packed rows: each query selects among the blocks of its own document, in
    the document's coordinates, exactly what the document alone selects.

    ``docs`` describes the key rows ``k [B, Tk, KV, D]``; query t is row position
    ``cache_len + t``. Kernels are pooled per document (`documents.document_kernels`); a query
    sees kernels of its document that end at or before it; block b of a document covers its
    positions ``block_size * b ..``, and a block's score pools the document's kernels there
    (the row-wide kernel list is shifted to the query's document before the max-pool).
    Documents shorter than ``dense_len`` (> 0) keep all their blocks (``slots`` entries).
    Returns int32 ``[B, KV, Tq, slots or topk]`` of document-relative block ids.
    """
    tq = q.shape[1]
    tk = k.shape[1]
    at = slice(cache_len, cache_len + tq)
    fine = document_kernels(k, docs, kernel_size, kernel_stride)
    coarse = document_kernels(k, docs, 4 * kernel_size, 4 * kernel_stride) if lse_approx else None
    n_blocks = -(-tk // block_size)
    n_rel = max((tk - kernel_size) // kernel_stride + 1, 0)  # kernels of a row-long document
    block_max = window_block_max(n_rel, n_blocks, kernel_size, kernel_stride, block_size)
    kw = dict(n_blocks=n_blocks, block_size=block_size, topk=topk, init_blocks=init_blocks,
              local_blocks=local_blocks, slots=slots)
    dense = docs.length[:, at] < dense_len if dense_len > 0 else None

    def one_chunk(qch: jax.Array, qpos: jax.Array, qdoc: jax.Array, qfirst: jax.Array,
                  *rest: jax.Array) -> jax.Array:
        def pooled(kern: DocumentKernels) -> Pooled:
            vis = (kern.doc[:, None, :] == qdoc[:, :, None]) & (kern.end[:, None, :] <= qpos[
                :, :, None]) & (kern.end[:, None, :] >= 0)
            return kern.keys, vis[:, None, None]

        def doc_block_max(shared: jax.Array) -> jax.Array:
            # the query's document's kernels, counted from its first; other documents' kernels
            # do not exist for it (-inf, like kernels past a document's end)
            if n_rel == 0:
                return block_max(shared[..., :0])
            rel = qfirst[:, :, None] + jnp.arange(n_rel)  # [B, c, n_rel]
            safe = jnp.clip(rel, 0, fine.doc.shape[1] - 1)
            mine = (rel < fine.doc.shape[1]) & (
                jax.vmap(lambda d, i: d[i])(fine.doc, safe) == qdoc[:, :, None])
            got = jnp.take_along_axis(
                shared, jnp.broadcast_to(safe[:, None], shared.shape[:3] + (n_rel,)), axis=-1)
            return block_max(jnp.where(mine[:, None], got, -jnp.inf))

        return select_from_pooled(qch, pooled(fine), None if coarse is None else pooled(coarse),
                                  qpos, doc_block_max, dense=rest[0] if rest else None, **kw)

    per_query = (docs.pos[:, at], docs.start[:, at], fine.first[:, at])
    if dense is not None:
        per_query += (dense,)
    return _over_query_chunks(q, k.shape[2], per_query, query_chunk, one_chunk)
