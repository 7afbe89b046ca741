"""Compressed-key caches for sparse decode (HF modeling_minicpm.py ``InfLLMv2Cache``).

HF keeps the fine (kernel_size/stride) and coarse (4x) mean-pooled keys plus a buffer of the
keys not yet compressed. Our KV cache is preallocated and holds every key at its absolute
position, so the "not yet compressed" tail is simply the cache itself: when a key completes a
kernel (its position is ``stride*j + size - 1``) kernel j is the mean of the ``size`` cached keys
ending there, written at index j. A step of one token does O(size) work per layer; a longer
write (prefill into the cache) re-pools the whole row once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cpmjax.config import SparseConfig
from kernels.infllmv2.selection import pooled_kernels

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


def kernel_ends(n: int, size: int, stride: int, batch: int) -> jax.Array:
    """Absolute end position of kernel j = ``stride*j + size - 1``, ``[B, n]``."""
    return jnp.broadcast_to(stride * jnp.arange(n, dtype=jnp.int32) + size - 1, (batch, n))


def update_compressed(compressed: Compressed, keys: jax.Array, positions: jax.Array,
                      sc: SparseConfig) -> Compressed:
    """Kernel caches after ``keys [B, S, KV, D]`` (already holding the new tokens) were written
    at ``positions [B, T]`` (negative = padding, not written).

    Kernels past the written length hold stale or zero values; selection never sees them
    because a kernel is visible only once the query has reached its end position.
    """
    out = []
    for cache, (size, stride) in zip(compressed, kernel_shapes(sc)):
        if cache.shape[1] == 0:
            out.append(cache)
        elif positions.shape[1] == 1:
            out.append(_append_one(cache, keys, positions[:, 0], size, stride))
        else:
            out.append(jnp.transpose(pooled_kernels(keys, size, stride), (0, 2, 1, 3)))
    return tuple(out)


def _append_one(cache: jax.Array, keys: jax.Array, pos: jax.Array, size: int,
                stride: int) -> jax.Array:
    """Write the kernel that the key at ``pos`` completes, if any (one decode step)."""
    n = cache.shape[1]
    first = pos - size + 1
    done = (first >= 0) & (first % stride == 0)
    j = jnp.where(done, first // stride, n)  # out of range: dropped

    def window(row: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(row, jnp.maximum(start, 0), size, axis=0)

    mean = jax.vmap(window)(keys.astype(jnp.float32), first).mean(axis=1)  # [B, KV, D]
    return cache.at[jnp.arange(cache.shape[0]), j].set(mean, mode="drop")
