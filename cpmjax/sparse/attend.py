"""InfLLM v2 for one layer: the dense/sparse switch and the choice of sparse path.

Paths (InfLLM-V2, arXiv 2509.24663 §3; HF modeling_minicpm.py):
- *fast*: one sequence per row at positions 0..T-1, no cache (training, plain prefill) ->
  ``kernels.infllmv2.select_blocks`` + ``sparse_attention`` (gather-based: FLOPs scale with the
  selected blocks).
- *cached*: one sequence per row in a position-addressed KV cache, key s at position s
  (decode, speculative verification, prefill chunks; per-row dynamic positions) ->
  ``select_blocks_at`` on the layer's cached kernels + ``sparse_attention_at``, which gathers
  only the selected blocks from the cache: attention cost scales with topk*block_size, stage 1
  with the number of kernels (cache/stride), neither with dense attention over the cache. A
  cache without kernels (the MTP draft layer's) has them pooled from its keys per call.
- *masked*: packed rows (segment ids) -> selection on document-relative positions
  (`cpmjax.sparse.masked`) and dense attention under the selected block mask. Exact per
  document; costs as much as dense attention.

Dense/sparse switch, as HF: ``max(position) + 1 < dense_len`` -> dense; ``dense_len == -1``
-> always sparse. Decided statically when the key length settles it (key length below
``dense_len`` -> dense; ``dense_len`` in {-1, 0} -> sparse), else by ``lax.cond`` on the
positions. The static rule assumes positions are smaller than the key length, which holds for
default positions, packed rows and cache slots.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cpmjax.config import ConfigError, ModelConfig, SparseConfig
from cpmjax.sparse import masked
from cpmjax.sparse.cache import Compressed, kernel_ends, kernel_shapes
from kernels import infllmv2
from kernels.infllmv2.selection import pooled_kernels

DenseFn = Callable[..., jax.Array]  # () -> flash output; (mask [B,(KV,)Tq,Tk]) -> masked output


def check_supported(sc: SparseConfig) -> None:
    """Reject what this integration does not implement, naming the field."""
    if sc.use_nope:
        raise ConfigError("sparse_config.use_nope=True (block selection on un-rotated q/k) is not "
                          "supported by cpmjax; set it to false (MiniCPM4 releases use false)")


def sparse_attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array,
                  kv_pos: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
                  base_mask: jax.Array, cfg: ModelConfig, dense: DenseFn, kv_is_query: bool,
                  compressed: Compressed | None = None,
                  implementation: str = "auto") -> jax.Array:
    """InfLLM v2 attention of one layer with HF's dense/sparse switch; ``[B, Tq, H, D]``.

    ``dense()`` is the caller's dense (flash) attention, ``dense(mask)`` dense attention under
    an explicit mask; ``base_mask`` is the causal/document mask. ``implementation`` names the
    stage-2 kernel (``kernels.infllmv2.sparse_attention``).
    Without segment ids and with ``kv_is_query`` false, ``k``/``v`` are a position-addressed
    cache (``kv_pos`` = 0..S-1, as the model builds it). ``compressed`` are the layer's cached
    kernels (decode); without them kernels are pooled from ``k``.
    """
    sc = cfg.sparse_config
    check_supported(sc)

    def sparse() -> jax.Array:
        if kv_is_query and q_seg is None:
            return _fast(q, k, v, sc, cfg.head_dim ** -0.5, implementation)
        if q_seg is None and kv_seg is None:
            return _cached(q, k, v, q_pos, compressed, sc, cfg.head_dim ** -0.5)
        n_blocks = -(-k.shape[1] // sc.block_size)
        fine, coarse = layer_kernels(k, kv_pos, kv_seg, sc, compressed)
        chosen = masked.select_masked(q, q_pos, q_seg, fine, coarse, sc, n_blocks)
        return dense(masked.token_mask(chosen, base_mask, kv_pos, sc.block_size))

    if sc.dense_len in (-1, 0):
        return sparse()
    if k.shape[1] < sc.dense_len:
        return dense()
    return jax.lax.cond(jnp.max(q_pos) + 1 < sc.dense_len, lambda: dense(), sparse)


def _fast(q: jax.Array, k: jax.Array, v: jax.Array, sc: SparseConfig, scale: float,
          implementation: str = "auto") -> jax.Array:
    idx = infllmv2.select_blocks(q, k, kernel_size=sc.kernel_size, kernel_stride=sc.kernel_stride,
                                 block_size=sc.block_size, topk=sc.total_topk,
                                 init_blocks=sc.init_blocks, local_blocks=sc.local_blocks)
    return infllmv2.sparse_attention(q, k, v, idx, block_size=sc.block_size, softmax_scale=scale,
                                     implementation=implementation)


def _cached(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
            compressed: Compressed | None, sc: SparseConfig, scale: float) -> jax.Array:
    """Sparse attention of queries at ``q_pos`` into a cache holding key s at position s."""
    fine, coarse = cache_kernels(k, sc, compressed)
    idx = infllmv2.select_blocks_at(q, fine, coarse, q_pos, kv_len=k.shape[1],
                                    kernel_size=sc.kernel_size, kernel_stride=sc.kernel_stride,
                                    block_size=sc.block_size, topk=sc.total_topk,
                                    init_blocks=sc.init_blocks, local_blocks=sc.local_blocks)
    return infllmv2.sparse_attention_at(q, k, v, idx, q_pos, block_size=sc.block_size,
                                        softmax_scale=scale)


def cache_kernels(k: jax.Array, sc: SparseConfig,
                  compressed: Compressed | None) -> tuple[jax.Array, jax.Array]:
    """Fine and coarse kernels ``[B, KV, N, D]`` of a position-addressed cache ``k``: the
    cached ones, else pooled from ``k`` (kernel j spans positions ``stride*j .. +size-1``)."""
    if compressed is not None:
        return tuple(jnp.transpose(c, (0, 2, 1, 3)) for c in compressed)
    return tuple(pooled_kernels(k, size, stride) for size, stride in kernel_shapes(sc))


def layer_kernels(k: jax.Array, kv_pos: jax.Array, kv_seg: jax.Array | None, sc: SparseConfig,
             compressed: Compressed | None) -> tuple[masked.Kernels, masked.Kernels]:
    """Fine and coarse kernels with their end positions (and documents, for packed rows)."""
    if compressed is not None:
        return tuple((kc, kernel_ends(kc.shape[2], size, stride, k.shape[0]), None)
                     for kc, (size, stride) in zip(cache_kernels(k, sc, compressed),
                                                   kernel_shapes(sc)))
    out = []
    for size, stride in kernel_shapes(sc):
        kc, ends = masked.window_kernels(k, kv_pos, kv_seg, size, stride)
        out.append((kc, ends, kv_seg))
    return out[0], out[1]
