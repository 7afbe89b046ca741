"""Compressed-key caches for sparse decode (HF modeling_minicpm.py ``InfLLMv2Cache``).

HF keeps the fine (kernel_size/stride) and coarse (4x) mean-pooled keys plus a buffer of the
keys not yet compressed. Our KV cache is preallocated and holds every key at its absolute
position, so the "not yet compressed" tail is simply the cache itself: kernel j (keys
``stride*j .. stride*j + size - 1``) is written at index j when the key at its last position is
written. A write of T tokens (a decode step, a prefill chunk, a verification or draft step)
recomputes only the kernels ending inside the written positions, at most ``ceil(T / stride)``
per row: O(new tokens), whatever the cache length.

Rows write a run of consecutive positions per step (negative positions are padding), as every
caller does; positions may go back (speculative decoding rewrites rejected drafts), which
rewrites the kernels ending there. Kernels past a row's length hold stale or zero values;
selection never sees them because a kernel is visible only once the query has reached its end.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cpmjax.config import SparseConfig
from kernels.infllmv2.documents import window_means

Compressed = tuple[jax.Array, jax.Array]  # fine, coarse: [B, N, KV, D] float32


def kernel_shapes(sc: SparseConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(size, stride) of the fine and coarse kernels; coarse = 4x as HF's ``k2`` (HF modeling_minicpm.py)."""
    return ((sc.kernel_size, sc.kernel_stride), (4 * sc.kernel_size, 4 * sc.kernel_stride))


def n_kernels(length: int, size: int, stride: int) -> int:
    """Full kernels in ``length`` keys (step A: trailing partial kernels are dropped)."""
    return (length - size) // stride + 1 if length >= size else 0


def init_compressed(sc: SparseConfig, batch: int, max_len: int, kv_heads: int,
                    head_dim: int) -> Compressed:
    """Zero fine and coarse kernel caches of one layer, ``[B, N, KV, D]`` float32."""
    return tuple(jnp.zeros((batch, n_kernels(max_len, size, stride), kv_heads, head_dim),
                           jnp.float32) for size, stride in kernel_shapes(sc))


def truncate_compressed(compressed: Compressed, kv_len: int, sc: SparseConfig) -> Compressed:
    """The kernels a read of the first ``kv_len`` cache positions can see."""
    return tuple(c[:, :n_kernels(kv_len, size, stride)]
                 for c, (size, stride) in zip(compressed, kernel_shapes(sc)))


def update_compressed(compressed: Compressed, keys: jax.Array, positions: jax.Array,
                      sc: SparseConfig) -> Compressed:
    """Kernel caches after ``keys [B, S, KV, D]`` (or lane-packed ``[B, S, KV * D]``, see
    `cpmjax.model.cache.lane_packed`; already holding the new tokens) were written
    at ``positions [B, T]`` (negative = padding, not written)."""
    return tuple(cache if cache.shape[1] == 0 else _write_completed(cache, keys, positions, size,
                                                                    stride)
                 for cache, (size, stride) in zip(compressed, kernel_shapes(sc)))


def _write_completed(cache: jax.Array, keys: jax.Array, positions: jax.Array, size: int,
                     stride: int) -> jax.Array:
    """Recompute the kernels whose end position is among ``positions`` (one run per row)."""
    b, t = positions.shape
    n = cache.shape[1]
    written = positions >= 0
    lo = jnp.min(jnp.where(written, positions, jnp.iinfo(jnp.int32).max), axis=1)  # [B]
    lo = jnp.where(written.any(axis=1), lo, 0)  # a row writing nothing matches no end below
    first = jnp.maximum(-((size - 1 - lo) // stride), 0)  # the first kernel ending at >= lo
    j = first[:, None] + jnp.arange(-(-t // stride))  # [B, m]: every kernel ending in the run
    end = stride * j + size - 1
    done = (end[:, :, None] == jnp.where(written, positions, -1)[:, None, :]).any(-1)
    j = jnp.where(done & (j < n), j, n)  # n: dropped

    # Each row's kernels span one run of keys: cut it with a per-row dynamic slice (a batched
    # gather of the windows straight from the cache made libtpu relayout the whole cache, seen
    # in the compiled HLO of a batch-8 decode step), then take the windows from that run.
    s = keys.shape[1]
    span = min(stride * (j.shape[1] - 1) + size, s)
    start = jnp.clip(end[:, 0] - size + 1, 0, s - span)  # [B]
    # A lane-packed cache [B, S, KV * D] is pooled as it is (a per-lane mean is the per-head
    # mean, same arithmetic): viewing the run as heads made libtpu keep the whole key cache
    # S-minor, a relayout copy in and out of every batch-1 decode step (compiled HLO).
    lanes = keys.shape[2:] if keys.ndim == 4 else (keys.shape[2], 1)
    zeros = (0,) * (keys.ndim - 2)
    run = jnp.concatenate([jax.lax.dynamic_slice(keys, (i, start[i], *zeros),
                                                 (1, span, *keys.shape[2:]))
                           for i in range(b)]).reshape(b, span, *lanes)
    offsets = jnp.clip(end - size + 1 - start[:, None], 0, span - size)  # [B, m]
    windows = jnp.take_along_axis(
        run[:, None], (offsets[:, :, None] + jnp.arange(size))[:, :, :, None, None], axis=2)
    means = window_means(windows, stride).reshape(*j.shape, *cache.shape[2:])
    return cache.at[jnp.arange(b)[:, None], j].set(means, mode="drop")


def node_coarse_kernel(keys: jax.Array, committed: jax.Array, ancestors_at: jax.Array,
                       positions: jax.Array, sc: SparseConfig, head_dim: int
                       ) -> tuple[jax.Array, jax.Array]:
    """The coarse kernel each speculation-tree node would see cached, had its ancestors been
    committed at their positions: the first kernel ending at or after the committed length m
    (``committed [B]``), pooled from the cache's keys below m and the node's own path from m
    on, with the arithmetic of the cache's kernels (`window_means`).

    ``keys``: the cache (heads or lane-packed layout) with the nodes written at slots
    m + node index; ``ancestors_at [B, T, T]``: node u's ancestor (tree index) at depth i,
    root first; ``positions [B, T]``: m + depth (-1: idle). Returns the kernels ``[B, T, KV,
    D]`` float32 and their index ``[B, T]`` among the coarse kernels, -1 where the node has not
    reached the kernel's end. One kernel suffices: a tree shallower than the coarse stride
    (`check_tree_depth`) crosses at most one kernel end.
    """
    size, stride = kernel_shapes(sc)[1]
    m = jnp.maximum(committed, 0)
    j = jnp.maximum(-((size - 1 - m) // stride), 0)  # the first kernel ending at >= m
    end = stride * j + size - 1
    w = end[:, None] - size + 1 + jnp.arange(size)  # [B, size]: the window's positions
    depth = jnp.clip(w - m[:, None], 0, ancestors_at.shape[2] - 1)  # path entry of w >= m
    on_path = jnp.take_along_axis(ancestors_at, jnp.broadcast_to(
        depth[:, None], ancestors_at.shape[:2] + depth.shape[1:]), axis=2)  # [B, T, size]
    src = jnp.where((w < m[:, None])[:, None], w[:, None], m[:, None, None] + on_path)
    heads = keys if keys.ndim == 4 else keys.reshape(*keys.shape[:2], -1, head_dim)
    windows = heads[jnp.arange(keys.shape[0])[:, None, None], src]  # [B, T, size, KV, D]
    index = jnp.where((committed[:, None] >= 0) & (positions >= end[:, None]), j[:, None], -1)
    return window_means(windows, stride), index.astype(jnp.int32)
