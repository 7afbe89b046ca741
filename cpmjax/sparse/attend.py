"""InfLLM v2 for one layer: the dense/sparse switch and the choice of sparse path.

Paths (InfLLM-V2, arXiv 2509.24663 §3; HF modeling_minicpm.py), both on the op in
``kernels/infllmv2`` and neither ever holding a ``[T, T]`` array:
- *no cache* (training, plain prefill; ``kv_is_query``): ``select_blocks`` + ``sparse_attention``
  on the row, with its ``segment_ids`` when it is packed: every document selects among its own
  blocks, in its own coordinates, what it would select alone.
- *cached*: one sequence per row in a position-addressed KV cache, key s at position s
  (decode, speculative verification, prefill chunks; per-row dynamic positions) ->
  ``select_blocks_at`` on the layer's compressed-key caches + ``sparse_attention_at``, which
  reads only the selected blocks from the cache.
Stage 2 is the registry implementation ``implementation`` names (``"auto"``: the Pallas kernel on
TPU, the XLA gather elsewhere).

Dense/sparse switch, as HF (``max(position) + 1 < dense_len`` -> dense; ``dense_len`` -1 or 0:
always sparse), decided for each *sequence* from its own length: each document of a packed row,
each row (slot) of a cache. So a request's output does not depend on what it is batched with.
When the key length settles it for everyone (fewer keys than ``dense_len``) the caller's dense
attention runs; otherwise the sparse op runs and a sequence in dense mode keeps every block up
to each query's own, which is dense causal attention. That needs ``dense_slots`` (> topk) slots
per query, so a `lax.cond` takes the wider op only when some sequence is in dense mode.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cpmjax.config import ConfigError, ModelConfig, SparseConfig
from cpmjax.sparse.cache import Compressed
from kernels import infllmv2
from kernels.infllmv2.documents import documents

DenseFn = Callable[[], jax.Array]  # the layer's ordinary dense attention -> [B, Tq, H, D]


def check_supported(sc: SparseConfig) -> None:
    """Reject what this integration does not implement, naming the field."""
    if sc.use_nope:
        raise ConfigError("sparse_config.use_nope=True (block selection on un-rotated q/k) is not "
                          "supported by cpmjax; set it to false (MiniCPM4 releases use false)")


def sparse_attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array,
                  q_seg: jax.Array | None, cfg: ModelConfig, dense: DenseFn, kv_is_query: bool,
                  compressed: Compressed | None = None,
                  implementation: str = "auto") -> jax.Array:
    """InfLLM v2 attention of one layer with HF's dense/sparse switch; ``[B, Tq, H, D]``.

    ``dense()`` is the caller's dense attention of the same queries and keys (it must honour
    positions and documents itself). With ``kv_is_query`` the keys are the queries' own tokens
    (``q_seg``: their document ids, or None); otherwise ``k``/``v`` are a position-addressed
    cache whose compressed keys are ``compressed`` (`cpmjax.sparse.cache`). ``implementation``
    names the stage-2 kernel in ``kernels.infllmv2.ATTENTION``.
    """
    sc = cfg.sparse_config
    check_supported(sc)
    if 0 < k.shape[1] < sc.dense_len:  # every sequence is shorter than dense_len
        return dense()
    scale = cfg.head_dim ** -0.5
    if kv_is_query:
        return _no_cache(q, k, v, q_seg, sc, scale, implementation)
    if compressed is None:
        raise ValueError("sparse attention into a KV cache needs the layer's compressed-key "
                         "caches (cpmjax.model.init_cache adds kc1/kc2 for a sparse config)")
    return _cached(q, k, v, q_pos, compressed, sc, scale, implementation)


def _switch(any_dense: jax.Array | None, run: Callable[[int], jax.Array],
            dense_len: int) -> jax.Array:
    """``run(dense_len)`` if a sequence is in dense mode, else the narrower ``run(-1)``."""
    if any_dense is None:
        return run(-1)
    return jax.lax.cond(any_dense, lambda: run(dense_len), lambda: run(-1))


def _no_cache(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None,
              sc: SparseConfig, scale: float, implementation: str) -> jax.Array:
    def run(dense_len: int) -> jax.Array:
        idx = infllmv2.select_blocks(q, k, kernel_size=sc.kernel_size,
                                     kernel_stride=sc.kernel_stride, block_size=sc.block_size,
                                     topk=sc.total_topk, init_blocks=sc.init_blocks,
                                     local_blocks=sc.local_blocks, segment_ids=seg,
                                     dense_len=dense_len)
        return infllmv2.sparse_attention(q, k, v, idx, block_size=sc.block_size,
                                         softmax_scale=scale, segment_ids=seg,
                                         implementation=implementation)

    # one sequence per row is as long as the keys (>= dense_len here): sparse
    any_dense = None if seg is None or sc.dense_len <= 0 else jnp.any(
        documents(seg).length < sc.dense_len)
    return _switch(any_dense, run, sc.dense_len)


def _cached(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
            compressed: Compressed, sc: SparseConfig, scale: float,
            implementation: str) -> jax.Array:
    """Sparse attention of queries at ``q_pos`` into a cache holding key s at position s."""
    fine, coarse = (jnp.transpose(c, (0, 2, 1, 3)) for c in compressed)

    def run(dense_len: int) -> jax.Array:
        idx = infllmv2.select_blocks_at(q, fine, coarse, q_pos, kv_len=k.shape[1],
                                        kernel_size=sc.kernel_size,
                                        kernel_stride=sc.kernel_stride,
                                        block_size=sc.block_size, topk=sc.total_topk,
                                        init_blocks=sc.init_blocks,
                                        local_blocks=sc.local_blocks, dense_len=dense_len)
        return infllmv2.sparse_attention_at(q, k, v, idx, q_pos, block_size=sc.block_size,
                                            softmax_scale=scale, implementation=implementation)

    any_dense = None
    if sc.dense_len > 0:  # a busy row whose length (largest position + 1) is below dense_len
        longest = q_pos.max(axis=1)
        any_dense = jnp.any((longest >= 0) & (longest + 1 < sc.dense_len))
    return _switch(any_dense, run, sc.dense_len)
