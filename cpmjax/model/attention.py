"""The single attention dispatch point of the decoder.

Every layer calls :func:`attend`. It sees the (rotated) queries and keys, the positions and
document ids of both sides, and the model config, and picks the implementation: dense GQA
attention here; InfLLM v2 sparse attention (``cpmjax.sparse``, on top of ``kernels/infllmv2``)
when ``cfg.sparse_config`` is set, with HF's dense/sparse switch on ``dense_len``.

Masking rule (all implementations): query i sees key j iff ``kv_pos[j] <= q_pos[i]`` and both
belong to the same document (segment id). Keys in a KV cache are stored at their absolute
position, so the same rule covers training, packed rows, prefill and decode.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from cpmjax.config import ModelConfig
from cpmjax.sparse import sparse_attend

Implementation = Literal["auto", "xla", "cudnn"]
_MASKED = -1e30  # finite, so a row with no visible key gives zeros-weighted output, not NaN


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array | None,
                   kv_seg: jax.Array | None) -> jax.Array:
    """Boolean ``[B, Tq, Tk]``: causal by absolute position, and within one document."""
    mask = kv_pos[:, None, :] <= q_pos[:, :, None]
    mask &= kv_pos[:, None, :] >= 0
    if q_seg is not None and kv_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    return mask


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    scale: float) -> jax.Array:
    """GQA softmax attention with float32 scores; q ``[B,Tq,H,D]``, k/v ``[B,Tk,KV,D]``.

    ``mask`` is ``[B, Tq, Tk]`` for all heads, or ``[B, KV, Tq, Tk]`` per KV-head group (sparse
    block masks are per group).
    """
    B, Tq, H, D = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, Tq, KV, H // KV, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = mask[:, None, None] if mask.ndim == 3 else mask[:, :, None]
    scores = jnp.where(mask, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(B, Tq, H, D).astype(q.dtype)


def _can_use_cudnn(q: jax.Array, q_seg: jax.Array | None, same_positions: bool) -> bool:
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q_seg is None and same_positions)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array, kv_pos: jax.Array,
           q_seg: jax.Array | None, kv_seg: jax.Array | None, cfg: ModelConfig,
           implementation: Implementation = "auto", kv_is_query: bool = False,
           compressed: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Attention for one layer; returns ``[B, Tq, H, D]`` in q's dtype.

    ``kv_is_query`` says the keys are exactly the queries' own tokens (training / no cache), which
    allows the fused causal kernels (cuDNN flash attention on GPU). ``compressed`` are the
    layer's cached InfLLM v2 kernels (``cpmjax.sparse.cache``), used by sparse decode.
    """
    scale = cfg.head_dim ** -0.5

    def dense() -> jax.Array:
        return _dense_or_cudnn(q, k, v, attention_mask(q_pos, kv_pos, q_seg, kv_seg), scale,
                               q_seg, kv_is_query, implementation)

    if cfg.sparse_config is not None:
        return sparse_attend(q, k, v, q_pos=q_pos, q_seg=q_seg, cfg=cfg, dense=dense,
                             kv_is_query=kv_is_query, compressed=compressed)
    return dense()


def _dense_or_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                    q_seg: jax.Array | None, kv_is_query: bool,
                    implementation: Implementation) -> jax.Array:
    """cuDNN causal flash attention when the mask is the plain causal one, else `dense_attention`."""
    if mask.ndim == 3 and (implementation == "cudnn" or (
            implementation == "auto" and _can_use_cudnn(q, q_seg, kv_is_query))):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation="cudnn")
    return dense_attention(q, k, v, mask, scale)
