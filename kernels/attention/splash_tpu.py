"""TPU: JAX's maintained splash attention kernel (``jax.experimental.pallas.ops.tpu``), bound to
this op's layout.

Splash is a Pallas (Mosaic) flash kernel with a block-sparse static mask and runtime segment
ids, forward and backward: a causal mask skips the blocks above the diagonal and segment ids
give packed documents. GQA is native (the "mha" kernel groups query heads per KV head).

- Only self-attention over whole rows (``keys_are_queries``); keys in a cache raise
  ``NotImplementedError`` and the caller uses the XLA path.
- The sequence is padded to a multiple of the block size; padding gets a segment id of its own.
- q is multiplied by the softmax scale before the kernel (splash applies none).
- Mosaic kernels are not partitioned automatically: under a mesh, call this inside
  ``shard_map`` (``cpmjax.model.attention`` does, with specs from the rules table).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 512  # MaxText's default splash tile for v5e/v5p
MIN_BLOCK = 128  # the TPU lane width: block sizes must be multiples of it


def _block(t: int) -> int:
    return min(BLOCK, -(-t // MIN_BLOCK) * MIN_BLOCK)


def _kernel(seq: int, heads: int, block: int, interpret: bool):
    """A splash kernel for one shape. Built per trace, not cached: its mask-info arrays become
    constants of the trace that builds them."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (splash_attention_kernel as sk,
                                                                   splash_attention_mask as sm)
    mask = sm.MultiHeadMask([sm.CausalMask((seq, seq)) for _ in range(heads)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                interpret=interpret)
    return kernel, sk.SegmentIds


def attention_splash(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array,
                     kv_pos: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
                     scale: float, keys_are_queries: bool, interpret: bool = False) -> jax.Array:
    """Causal (and per-document) GQA attention; q ``[B,T,H,D]``, k/v ``[B,T,KV,D]``."""
    del q_pos, kv_pos  # the causal rule of keys_are_queries is by index (see masking.py)
    if not keys_are_queries:
        raise NotImplementedError("splash attention covers self-attention over whole rows")
    B, T, H, D = q.shape
    block = _block(T)
    padded = -(-T // block) * block
    seg = None
    if q_seg is not None or padded != T:
        seg = jnp.zeros((B, T), jnp.int32) if q_seg is None else q_seg.astype(jnp.int32)
        # padding gets an id no real token has: one past the row's largest
        fill = jnp.broadcast_to(jnp.max(seg, axis=1, keepdims=True) + 1, (B, padded - T))
        seg = jnp.concatenate([seg, fill], axis=1)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - T), (0, 0), (0, 0)))
    heads_first = lambda x: jnp.swapaxes(pad(x), 1, 2)
    kernel, segment_ids = _kernel(padded, H, block, interpret)
    qh = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype))
    kh, vh = heads_first(k), heads_first(v)
    if seg is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids(q=s, kv=s)))(qh, kh, vh,
                                                                                   seg)
    return jnp.swapaxes(out, 1, 2)[:, :T].astype(q.dtype)
