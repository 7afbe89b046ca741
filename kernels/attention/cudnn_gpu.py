"""GPU: cuDNN's fused flash attention, with packed documents.

- One document per row: ``jax.nn.dot_product_attention(implementation="cudnn",
  is_causal=True)``.
- Packed rows (segment ids): ``jax.nn.dot_product_attention`` has no segment-id argument and
  would turn a document mask into a ``[T, T]`` bias, so the call goes to JAX's cuDNN binding
  underneath it (``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention``), whose
  packed layout takes per-row segment offsets and lengths (``q_offsets`` / ``q_seqlen``, cuDNN's
  ragged "THD" sequences, compute capability >= 9.0) with a padding-causal mask: causal inside
  each document, nothing across. That module is private JAX API; it exists in jax 0.10 and
  0.11. A row with more than ``max_segments`` documents takes the XLA flash path instead
  (``lax.cond``), so the result is right for any packing.

Needs bf16/fp16 inputs and self-attention over whole rows; anything else raises
``NotImplementedError`` and the caller uses the XLA path. Never run on a GPU by this project
(no GPU was available): the tests marked ``gpu`` are its only check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .xla_chunked import attention_xla_chunked

MIN_DOC_TOKENS = 64  # max_segments = T // this: rows of shorter documents fall back


def segment_offsets(seg: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """(offsets ``[B, M+1]``, lengths ``[B, M]``) of the runs of equal ids in ``seg [B, T]``,
    -1 padded (the layout of cuDNN's packed sequences)."""
    B, T = seg.shape
    idx = jnp.arange(T)
    starts = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    first = jnp.sort(jnp.where(starts, idx, T), axis=1)[:, :max_segments + 1]
    if first.shape[1] < max_segments + 1:
        first = jnp.pad(first, ((0, 0), (0, max_segments + 1 - first.shape[1])),
                        constant_values=T)
    valid = first[:, :max_segments] < T
    lengths = jnp.where(valid, first[:, 1:] - first[:, :max_segments], -1)
    offsets = jnp.where(first < T, first, -1).at[:, max_segments].set(-1)
    return offsets.astype(jnp.int32), lengths.astype(jnp.int32)


def attention_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array,
                    kv_pos: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
                    scale: float, keys_are_queries: bool) -> jax.Array:
    """Causal (and per-document) GQA flash attention through cuDNN."""
    if not keys_are_queries:
        raise NotImplementedError("cuDNN flash attention here covers whole-row self-attention")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"cuDNN flash attention needs bf16/fp16, got {q.dtype}")
    if q_seg is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation="cudnn")
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    T = q.shape[1]
    max_segments = max(1, T // MIN_DOC_TOKENS)
    offsets, lengths = segment_offsets(q_seg, max_segments)

    def packed(_: None) -> jax.Array:
        return dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths,
                                     q_offsets=offsets, kv_offsets=offsets, scale=scale,
                                     mask_type=MaskType.PADDING_CAUSAL)

    def chunked(_: None) -> jax.Array:
        return attention_xla_chunked(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg,
                                     kv_seg=kv_seg, scale=scale, keys_are_queries=True)

    starts = jnp.sum(q_seg[:, 1:] != q_seg[:, :-1], axis=1) + 1
    return jax.lax.cond(jnp.max(starts) > max_segments, chunked, packed, None)
