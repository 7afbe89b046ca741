"""Preallocated KV cache: keys/values stored at their absolute position, per layer and slot."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cpmjax.config import ModelConfig

KVCache = dict[str, jax.Array]
CACHE_AXES = {"k": ("layers", "batch", "length", "kv_heads", "head_dim"),
              "v": ("layers", "batch", "length", "kv_heads", "head_dim")}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """Zeros of shape ``[L, batch, max_len, KV, head_dim]`` for keys and values."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def write_kv(cache_layer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Write ``new [B, T, KV, D]`` into ``cache_layer [B, S, KV, D]`` at ``positions [B, T]``.

    Negative positions (padding tokens) are dropped rather than written.
    """
    B, S = cache_layer.shape[:2]
    pos = jnp.where(positions < 0, S, positions)
    rows = jnp.arange(B)[:, None]
    return cache_layer.at[rows, pos].set(new.astype(cache_layer.dtype), mode="drop")
