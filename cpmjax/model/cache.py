"""Preallocated KV cache: keys/values stored at their absolute position, per layer and slot."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cpmjax.config import ModelConfig
from cpmjax.sparse.cache import init_compressed

KVCache = dict[str, jax.Array]
CACHE_AXES = {"k": ("layers", "batch", "length", "kv_heads", "head_dim"),
              "v": ("layers", "batch", "length", "kv_heads", "head_dim"),
              # InfLLM v2 fine / coarse compressed keys (only with cfg.sparse_config)
              "kc1": ("layers", "batch", None, "kv_heads", "head_dim"),
              "kc2": ("layers", "batch", None, "kv_heads", "head_dim")}
CACHE_FIELDS = ("k", "v", "kc1", "kc2")  # order of a layer's cache tuple in the layer scan


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """Zeros of shape ``[L, batch, max_len, KV, head_dim]`` for keys and values.

    With ``cfg.sparse_config`` also ``"kc1"``/``"kc2"`` ``[L, batch, n_kernels, KV, head_dim]``
    float32: the compressed keys InfLLM v2 decode selects blocks from (HF modeling_minicpm.py InfLLMv2Cache).
    """
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if cfg.sparse_config is not None:
        kc1, kc2 = init_compressed(cfg.sparse_config, batch, max_len, cfg.num_key_value_heads,
                                   cfg.head_dim)
        cache["kc1"] = jnp.broadcast_to(kc1, (cfg.num_hidden_layers,) + kc1.shape)
        cache["kc2"] = jnp.broadcast_to(kc2, (cfg.num_hidden_layers,) + kc2.shape)
    return cache


def write_kv(cache_layer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Write ``new [B, T, KV, D]`` into ``cache_layer [B, S, KV, D]`` at ``positions [B, T]``.

    Negative positions (padding tokens) are dropped rather than written.
    """
    B, S = cache_layer.shape[:2]
    pos = jnp.where(positions < 0, S, positions)
    rows = jnp.arange(B)[:, None]
    return cache_layer.at[rows, pos].set(new.astype(cache_layer.dtype), mode="drop")
