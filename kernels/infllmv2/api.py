"""Public InfLLM v2 API: block selection (stage 1) and block-sparse attention (stage 2).

Standalone: depends only on jax. Algorithm: InfLLM-V2, arXiv 2509.24663 §3 (steps A-H as named
in README.md). MiniCPM4 callers pass `topk = sparse_config.topk + window_size // block_size`
(64 + 32 = 96) and `local_blocks = window_size // block_size` (32), as HF modeling_minicpm.py
does.

Implementations live in two registries (`kernels.registry.Registry`): `SELECTION` (stage 1)
and `ATTENTION` (stage 2). Every public function takes ``implementation`` by name; ``"auto"``
is the platform default, chosen when the program is lowered (`jax.lax.platform_dependent`), so
a program compiled ahead of time for a TPU topology on a CPU host gets the TPU kernel.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kernels.registry import Registry

from .attention_xla import sparse_attention_xla
from .documents import Documents, check_code_range, documents, kernel_slots
from .layout import heads_view, kv_heads
from .pallas_op import Kernels, attention as pallas_attention
from .reference import select_blocks_reference, sparse_attention_reference
from .selection import select_blocks_chunked, select_blocks_packed, select_from_kernels

# ---------------------------------------------------------------- registries

SELECTION = Registry("infllmv2.select_blocks", defaults={}, fallback="xla")
ATTENTION = Registry("infllmv2.sparse_attention", defaults={"tpu": "pallas_tpu"},
                     fallback="xla")


def _select_xla(q, k, docs, *, query_chunk, dense_len, slots, **kw):
    if docs is None:
        return select_blocks_chunked(q, k, query_chunk=query_chunk, **kw)
    return select_blocks_packed(q, k, docs, query_chunk=query_chunk, dense_len=dense_len,
                                slots=slots, **kw)


def _select_reference(q, k, docs, *, query_chunk, dense_len, slots, **kw):
    del query_chunk
    if docs is not None or dense_len > 0:
        raise ValueError("the stage-1 reference selects for one sequence per row: it takes "
                         "neither segment_ids nor dense_len (compare documents one at a time)")
    return select_blocks_reference(q, k, **kw)


SELECTION.register("xla", lambda: _select_xla)
SELECTION.register("reference", lambda: _select_reference)


def _attend_reference(q, k, v, block_idx, q_pos, key_offset, *, block_size, softmax_scale,
                      query_chunk, return_lse=False):
    del query_chunk
    d = q.shape[-1]
    return sparse_attention_reference(q, heads_view(k, d), heads_view(v, d), block_idx,
                                      block_size=block_size, softmax_scale=softmax_scale,
                                      q_pos=q_pos, key_offset=key_offset, return_lse=return_lse)


def _attend_xla(q, k, v, block_idx, q_pos, key_offset, *, block_size, softmax_scale,
                query_chunk, return_lse=False):
    del query_chunk
    d = q.shape[-1]
    return sparse_attention_xla(q, heads_view(k, d), heads_view(v, d), block_idx, q_pos,
                                key_offset, block_size=block_size, softmax_scale=softmax_scale,
                                return_lse=return_lse)


def _pallas_loader(kind: str, interpret: bool) -> Callable[[], Callable[..., jax.Array]]:
    """A stage-2 implementation from a Pallas backend, imported on first use (CPU-only use
    needs no GPU bits)."""
    def load() -> Callable[..., jax.Array]:
        if kind == "tpu":
            from .pallas_tpu import sparse_attention_fwd as fwd
            from .pallas_tpu_bwd import sparse_attention_bwd as bwd
        else:
            from .pallas_gpu import sparse_attention_fwd as fwd
            from .pallas_gpu_bwd import sparse_attention_bwd as bwd
        kern = Kernels(functools.partial(fwd, interpret=interpret),
                       functools.partial(bwd, interpret=interpret), chunked=kind == "tpu")

        def impl(q, k, v, block_idx, q_pos, key_offset, *, block_size, softmax_scale,
                 query_chunk, return_lse=False):
            check_code_range(k.shape[1], block_size)
            if kind != "tpu":  # only the TPU kernel reads lane-packed K/V as they are
                k, v = heads_view(k, q.shape[-1]), heads_view(v, q.shape[-1])
            q_pos = jnp.broadcast_to(q_pos, q.shape[:2]).astype(jnp.int32)
            codes = kernel_slots(block_idx, key_offset, q_pos, block_size)
            return pallas_attention(kern, q, k, v, codes, q_pos, block_size=block_size,
                                    scale=_scale(q, softmax_scale), query_chunk=query_chunk,
                                    return_lse=return_lse)

        return impl

    return load


ATTENTION.register("xla", lambda: _attend_xla)
ATTENTION.register("reference", lambda: _attend_reference)
ATTENTION.register("pallas_tpu", _pallas_loader("tpu", False))
ATTENTION.register("pallas_interpret", _pallas_loader("tpu", True))  # the TPU kernel on CPU
ATTENTION.register("pallas_gpu", _pallas_loader("gpu", False))
ATTENTION.register("pallas_gpu_interpret", _pallas_loader("gpu", True))


def default_implementation(platform: str | None = None) -> str:
    """Stage 2 on ``platform`` (default: this process's backend): the Pallas TPU kernel on
    TPU, the XLA gather path elsewhere (the GPU kernel is opt-in, see pallas_gpu)."""
    return ATTENTION.resolve("auto", platform or jax.default_backend())


def _dispatch(registry: Registry, name: str) -> Callable[..., Any]:
    """The implementation ``name``; for ``"auto"`` one that picks the TPU default or the
    fallback when lowered, so ahead-of-time compiles for another platform get its default."""
    if name != "auto":
        return registry.get(name)
    tpu, other = registry.resolve("auto", "tpu"), registry.resolve("auto", "cpu")
    if tpu == other:
        return registry.get(tpu)

    def pick(*args: Any, **kw: Any) -> Any:
        return jax.lax.platform_dependent(
            *args, tpu=functools.partial(registry.get(tpu), **kw),
            default=functools.partial(registry.get(other), **kw))

    return pick


def _scale(q: jax.Array, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


# ---------------------------------------------------------------- static layout

def dense_slots(topk: int, dense_len: int, block_size: int, n_blocks: int) -> int:
    """Slots per query when sequences shorter than ``dense_len`` keep all their blocks (HF's
    dense/sparse switch, `select_blocks`): enough for the longest such sequence."""
    if dense_len <= 0:
        return topk
    return max(topk, min(-(-(dense_len - 1) // block_size), n_blocks))


@functools.partial(jax.jit, static_argnames=(
    "kernel_size", "kernel_stride", "block_size", "topk", "init_blocks", "local_blocks",
    "lse_approx", "cache_len", "query_chunk", "dense_len", "implementation"))
def select_blocks(q: jax.Array, k: jax.Array, *, kernel_size: int, kernel_stride: int,
                  block_size: int, topk: int, init_blocks: int, local_blocks: int,
                  lse_approx: bool = True, cache_len: int = 0, query_chunk: int = 256,
                  segment_ids: jax.Array | None = None, dense_len: int = -1,
                  implementation: str = "xla") -> jax.Array:
    """Stage 1: per (batch, KV head, query) the ascending list of selected blocks, -1 padded.

    q [B, Tq, H, D] and k [B, Tk, KV, D] after RoPE, Tk = cache_len + Tq. Query t has absolute
    position cache_len + t. Decode (Tq == 1, cache_len > 0) sees every full kernel, as HF's
    non-causal decode stage 1.

    ``segment_ids [B, Tk]`` (packed rows): each run of equal ids is a document; a query selects
    among its document's blocks, counted from the document's first token, exactly what the
    document alone would select (pass the same ``segment_ids`` to `sparse_attention`).
    ``dense_len`` (> 0): a sequence (row, or document) shorter than it is in dense mode, as HF
    switches (§2.3): its queries keep every block up to their own, so stage 2 equals dense
    causal attention for it; rows then have `dense_slots` entries. Returns int32
    [B, KV, Tq, topk or dense_slots], no gradient.
    """
    _check_lengths(q, k, cache_len)
    n_blocks = -(-k.shape[1] // block_size)
    docs = None if segment_ids is None else documents(_check_segments(segment_ids, k))
    if docs is None and dense_len > 0 and k.shape[1] >= dense_len:
        dense_len = -1  # one sequence per row, as long as the keys: sparse
    if docs is None and dense_len > 0:  # the row is shorter than dense_len: all dense
        docs = documents(jnp.zeros(k.shape[:2], jnp.int32))
    kw = dict(kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size,
              topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
              lse_approx=lse_approx, cache_len=cache_len)
    return SELECTION.get(implementation)(
        q, k, docs, query_chunk=query_chunk, dense_len=dense_len,
        slots=dense_slots(topk, dense_len, block_size, n_blocks), **kw)


def _check_lengths(q: jax.Array, k: jax.Array, cache_len: int) -> None:
    if k.shape[1] != cache_len + q.shape[1]:
        raise ValueError(f"need Tk == cache_len + Tq, got Tk={k.shape[1]}, cache_len={cache_len}, "
                         f"Tq={q.shape[1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"H={q.shape[2]} is not a multiple of KV={k.shape[2]}")


def _check_segments(segment_ids: jax.Array, k: jax.Array) -> jax.Array:
    if segment_ids.shape != k.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integer [B, Tk] = {list(k.shape[:2])}, got "
                         f"{segment_ids.dtype}{list(segment_ids.shape)}")
    return segment_ids


def _query_documents(docs: Documents, cache_len: int, tq: int) -> jax.Array:
    """Row position where each query's document starts (the block origin of its ids)."""
    return docs.start[:, cache_len:cache_len + tq]


@functools.partial(jax.jit, static_argnames=(
    "block_size", "cache_len", "softmax_scale", "implementation", "query_chunk"))
def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array, *,
                     block_size: int, cache_len: int = 0, softmax_scale: float | None = None,
                     segment_ids: jax.Array | None = None, implementation: str = "auto",
                     query_chunk: int | None = None) -> jax.Array:
    """Stage 2: each query attends, causally at token level, only to its group's selected blocks.

    q [B, Tq, H, D], k/v [B, Tk, KV, D], block_idx from `select_blocks` (with the same
    ``segment_ids``: block ids then count from each query's document start). Differentiable in
    q, k, v. Rows with no visible key return zeros. ``implementation``: a name in `ATTENTION`
    (``"auto"``: Pallas on TPU, XLA gather elsewhere). ``query_chunk`` (Pallas only): queries
    per kernel call; default: the scalar-memory budget of the TPU kernel's slot codes.
    """
    _check_lengths(q, k, cache_len)
    offset = None if segment_ids is None else _query_documents(
        documents(_check_segments(segment_ids, k)), cache_len, q.shape[1])
    q_pos = (cache_len + jnp.arange(q.shape[1], dtype=jnp.int32))[None]
    return _dispatch(ATTENTION, implementation)(
        q, k, v, block_idx, q_pos, offset, block_size=block_size, softmax_scale=softmax_scale,
        query_chunk=query_chunk)


# ---------------------------------------------------------------- queries at dynamic positions

def _check_positioned(q: jax.Array, kv_heads: int, q_pos: jax.Array) -> None:
    if q.shape[2] % kv_heads:
        raise ValueError(f"H={q.shape[2]} is not a multiple of KV={kv_heads}")
    if q_pos.shape != q.shape[:2] or not jnp.issubdtype(q_pos.dtype, jnp.integer):
        raise ValueError(f"q_pos must be integer [B, Tq] = {q.shape[:2]}, got {q_pos.dtype}"
                         f"{list(q_pos.shape)}")


@functools.partial(jax.jit, static_argnames=(
    "kv_len", "kernel_size", "kernel_stride", "block_size", "topk", "init_blocks",
    "local_blocks", "query_chunk", "dense_len", "dense_per_query"))
def select_blocks_at(q: jax.Array, fine: jax.Array, coarse: jax.Array | None, q_pos: jax.Array,
                     *, kv_len: int, kernel_size: int, kernel_stride: int, block_size: int,
                     topk: int, init_blocks: int, local_blocks: int, query_chunk: int = 256,
                     dense_len: int = -1, dense_per_query: bool = False,
                     seen: jax.Array | None = None,
                     own: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Stage 1 for queries at per-row positions ``q_pos [B, Tq]`` from pooled keys kept in a
    cache of ``kv_len`` positions (decode, speculative verification, prefill chunks).

    ``fine [B, KV, N, D]``: kernel j is the mean of keys ``stride*j .. stride*j+size-1``;
    ``coarse`` the 4x kernels for the LSE approximation (None: use ``fine``). A kernel counts
    once the query has reached its last key, so stale kernels past a row's length are never
    seen. ``dense_len`` (> 0): a row whose length (its largest position + 1, HF's rule) is below
    it keeps every block up to each query's own (`dense_slots` entries); each row decides for
    itself, or with ``dense_per_query`` each query from its own position, as a one-token decode
    step there does. Speculation-tree nodes (``cpmjax.sparse.attend.sparse_tree_attend``),
    whose ancestors are not at their positions in the cache: ``seen [B, Tq]`` is the last cache
    position whose kernels count (default ``q_pos``), and ``own = (kernel [B, Tq, KV, D]
    float32, index [B, Tq])`` a coarse kernel of each query's own that stands in at ``index``
    (-1: none). Returns int32 ``[B, KV, Tq, topk or dense_slots]``; -1 everywhere for
    q_pos < 0.
    """
    _check_positioned(q, fine.shape[1], q_pos)
    n_blocks = -(-kv_len // block_size)
    dense = None
    if dense_len > 0:
        length = q_pos if dense_per_query else q_pos.max(axis=1, keepdims=True)
        dense = (length + 1 < dense_len) & (q_pos >= 0)
    return select_from_kernels(q, fine, coarse, q_pos, n_blocks=n_blocks,
                               kernel_size=kernel_size, kernel_stride=kernel_stride,
                               block_size=block_size, topk=topk, init_blocks=init_blocks,
                               local_blocks=local_blocks, query_chunk=query_chunk, dense=dense,
                               slots=dense_slots(topk, dense_len, block_size, n_blocks),
                               seen=seen, own=own)


@functools.partial(jax.jit, static_argnames=("block_size", "softmax_scale", "implementation",
                                             "query_chunk", "return_lse"))
def sparse_attention_at(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array,
                        q_pos: jax.Array, *, block_size: int, softmax_scale: float | None = None,
                        implementation: str = "auto", query_chunk: int | None = None,
                        return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Stage 2 for queries at per-row positions ``q_pos [B, Tq]`` in a position-addressed KV
    cache ``k/v [B, S, KV, D]`` or lane-packed ``[B, S, KV * D]`` (key s stored at position s;
    `layout`).

    Reads only the ``topk * block_size`` keys of each query's selected blocks: the XLA gather
    (its relayout of the cache fuses into the gather) or the Pallas kernels, which DMA the
    selected blocks of the cache in place through scalar-prefetched block ids; FLOPs and bytes
    read do not grow with S. Key s is visible iff its block is in ``block_idx [B, KV, Tq, S']``
    and ``s <= q_pos``; rows with no visible key (q_pos < 0: padding) return zeros.
    ``return_lse``: also each query head's log-sum-exp of its scaled scores ``[B, Tq, H]``
    float32 (0 for a query with no visible key), so a caller can merge this attention with
    attention over other keys (speculation-tree nodes, ``cpmjax.sparse.attend``); that form has
    no gradient through the Pallas kernels.
    """
    _check_positioned(q, kv_heads(k, q.shape[-1]), q_pos)
    want = (q.shape[0], kv_heads(k, q.shape[-1]), q.shape[1])
    if block_idx.shape[:3] != want:
        raise ValueError(f"block_idx must be [B, KV, Tq, topk] with [B, KV, Tq] = {list(want)}, "
                         f"got {list(block_idx.shape)}")
    return _dispatch(ATTENTION, implementation)(
        q, k, v, block_idx, q_pos, None, block_size=block_size, softmax_scale=softmax_scale,
        query_chunk=query_chunk, return_lse=return_lse)
