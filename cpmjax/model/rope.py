"""Rotary embeddings with MiniCPM's LongRoPE (HF modeling_minicpm.py: rotate_half, MiniCPMLongRoPE).

NeoX-style half split (``rotate_half``), computed in float32. LongRoPE divides frequency i by a
per-frequency factor and multiplies cos/sin by ``scaling_factor = sqrt(1 + ln(s)/ln(orig))`` with
s = max_position_embeddings / original_max_position_embeddings. Which factor list applies follows
the HF code: its cos/sin cache is built for ``max_position_embeddings``, so the long factors are
used iff max_position_embeddings > original_max_position_embeddings (a static choice, not per call).
``rope_scaling["attention_factor"]`` (transformers' name) replaces the computed scaling factor:
MiniCPM4's 128K configs (``cpmjax.presets``) set it to 1, as CPM.cu runs them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim/2] already divided by the LongRoPE factors, cos/sin scale)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    rs = cfg.rope_scaling
    if rs is None or rs.get("rope_type", rs.get("type")) == "default":
        return inv_freq.astype(np.float32), 1.0
    orig = rs["original_max_position_embeddings"]
    use_long = cfg.max_position_embeddings > orig
    factors = np.asarray(rs["long_factor"] if use_long else rs["short_factor"], np.float32)
    scale = cfg.max_position_embeddings / orig
    scaling_factor = rs.get("attention_factor", math.sqrt(1 + math.log(scale) / math.log(orig)))
    return (inv_freq / factors).astype(np.float32), scaling_factor


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin, float32 ``[..., head_dim]`` for integer ``positions`` of any shape."""
    inv_freq, scaling = rope_frequencies(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, heads, head_dim]`` with cos/sin ``[B, T, head_dim]``, in float32."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
