"""The two key/value layouts stage 2 reads: ``[B, S, KV, D]`` and lane-packed ``[B, S, KV * D]``.

A lane-packed KV cache keeps every head of a position in one row of lanes; the model uses it when
D is not a multiple of TPU's 128 lanes (see `cpmjax.model.cache.lane_packed`), so the TPU kernel
DMAs its blocks without a relayout of the cache. Every other implementation reads the heads view.
"""
from __future__ import annotations

import jax


def kv_heads(k: jax.Array, head_dim: int) -> int:
    """KV heads of keys in either layout."""
    return k.shape[2] if k.ndim == 4 else k.shape[2] // head_dim


def heads_view(x: jax.Array, head_dim: int) -> jax.Array:
    """Keys or values as ``[B, S, KV, D]`` whichever layout they are in."""
    return x if x.ndim == 4 else x.reshape(*x.shape[:2], -1, head_dim)
