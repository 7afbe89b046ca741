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
- *tree nodes* (`sparse_tree_attend`): speculation-tree nodes after a committed prefix, each
  computing what one-token decoding at its position computes with its ancestors committed.
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

from typing import Any, Callable

import jax
import jax.numpy as jnp

from cpmjax.config import ConfigError, ModelConfig, SparseConfig
from cpmjax.sparse.cache import Compressed, node_coarse_kernel
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
                  implementation: str = "auto", stepwise: bool = False) -> jax.Array:
    """InfLLM v2 attention of one layer with HF's dense/sparse switch; ``[B, Tq, H, D]``.

    ``dense()`` is the caller's dense attention of the same queries and keys (it must honour
    positions and documents itself). With ``kv_is_query`` the keys are the queries' own tokens
    (``q_seg``: their document ids, or None); otherwise ``k``/``v`` are a position-addressed
    cache whose compressed keys are ``compressed`` (`cpmjax.sparse.cache`). ``implementation``
    names the stage-2 kernel in ``kernels.infllmv2.ATTENTION``. ``stepwise`` (cached): the
    queries are consecutive decode steps checked at once (speculative verification), so each
    decides dense or sparse mode from its own position, as one-token decoding does.
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
    return _cached(q, k, v, q_pos, compressed, sc, scale, implementation, stepwise)


def _switch(any_dense: jax.Array | None, run: Callable[[int], Any], dense_len: int) -> Any:
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


def _select_cached(q: jax.Array, compressed: Compressed, q_pos: jax.Array, kv_len: int,
                   sc: SparseConfig, dense_len: int, **kw) -> jax.Array:
    """Stage 1 from a layer's cached kernels (``select_blocks_at``; ``kw``: its per-query
    options)."""
    fine, coarse = (jnp.transpose(c, (0, 2, 1, 3)) for c in compressed)
    return infllmv2.select_blocks_at(q, fine, coarse, q_pos, kv_len=kv_len,
                                     kernel_size=sc.kernel_size, kernel_stride=sc.kernel_stride,
                                     block_size=sc.block_size, topk=sc.total_topk,
                                     init_blocks=sc.init_blocks, local_blocks=sc.local_blocks,
                                     dense_len=dense_len, **kw)


def _any_dense(q_pos: jax.Array, sc: SparseConfig, per_query: bool) -> jax.Array | None:
    """Whether a busy row (``per_query``: a query) is shorter than dense_len, so the wider
    dense-mode op must run; None when the switch is off."""
    if sc.dense_len <= 0:
        return None
    longest = q_pos if per_query else q_pos.max(axis=1)
    return jnp.any((longest >= 0) & (longest + 1 < sc.dense_len))


def _cached(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
            compressed: Compressed, sc: SparseConfig, scale: float,
            implementation: str, stepwise: bool) -> jax.Array:
    """Sparse attention of queries at ``q_pos`` into a cache holding key s at position s."""
    def run(dense_len: int) -> jax.Array:
        idx = _select_cached(q, compressed, q_pos, k.shape[1], sc, dense_len,
                             dense_per_query=stepwise)
        return infllmv2.sparse_attention_at(q, k, v, idx, q_pos, block_size=sc.block_size,
                                            softmax_scale=scale, implementation=implementation)

    return _switch(_any_dense(q_pos, sc, stepwise), run, sc.dense_len)


def check_tree_depth(sc: SparseConfig, depth: int) -> None:
    """Reject trees too deep for `sparse_tree_attend`'s exact form, naming the rule: each
    node's path may cross at most one coarse kernel end, and every fine kernel it completes
    must touch only blocks the node keeps anyway (its local window)."""
    coarse_stride = 4 * sc.kernel_stride
    if depth >= coarse_stride:
        raise ConfigError(f"a speculation tree of depth {depth} under InfLLM v2 must be "
                          f"shallower than the coarse kernel stride 4 * kernel_stride = "
                          f"{coarse_stride}")
    if (depth + sc.kernel_size - 1) // sc.block_size + 1 > sc.local_blocks:
        raise ConfigError(f"a speculation tree of depth {depth} under InfLLM v2 needs "
                          f"(depth + kernel_size - 1) // block_size + 1 <= window_size // "
                          f"block_size = {sc.local_blocks} (the node's path inside its local "
                          f"window)")


def sparse_tree_attend(q: jax.Array, keys: jax.Array, values: jax.Array,
                       compressed: Compressed, *, slots: jax.Array, mask: jax.Array,
                       positions: jax.Array, cfg: ModelConfig,
                       implementation: str = "auto") -> jax.Array:
    """InfLLM v2 attention of speculation-tree nodes, ``[B, T, H, D]``: for each node, what a
    one-token decode step at its position computes had its ancestors been committed.

    ``keys``/``values``: the cache as the layer reads it, the nodes' keys written at ``slots
    [B, T]`` (the root, the newest committed token, at the committed length m; negative: idle
    row); ``compressed``: its kernels, valid below m; ``mask [B, T, S]``: the tree's
    visibility over cache slots; ``positions [B, T]``: m + depth. The kernel that completes on
    a node's path is pooled from the cache as stored; attention reads it in ``q``'s dtype.

    Exact decomposition (the depth bound of `check_tree_depth` makes it so): a node at p
    selects blocks as at p, from the cache's kernels ending below m plus the one coarse kernel
    its own path completes (`node_coarse_kernel`; the fine kernels its path completes touch
    only blocks of its local window, which are always kept); it attends to the selected
    blocks' committed keys (below m) and to its ancestors and itself, which lie in its local
    window and so are always attended. The two parts are merged by their log-sum-exps. Dense
    mode is decided per node from its own position, as plain decoding decides per step.
    """
    sc = cfg.sparse_config
    check_supported(sc)
    b, t, h, d = q.shape
    committed = slots[:, 0]
    active = committed >= 0
    safe = jnp.maximum(slots, 0)
    # a node whose slot is past the read span is seen by none (its key was not written; the
    # round never accepts it): jnp's out-of-range fill for a bool gather would be True
    in_span = (slots >= 0) & (slots < mask.shape[-1])
    ancestors = jnp.take_along_axis(mask, jnp.minimum(safe, mask.shape[-1] - 1)[:, None, :],
                                    axis=2) & in_span[:, None, :] & active[:, None, None]
    depth = positions - committed[:, None]
    at = ancestors[:, :, None, :] & (depth[:, None, None, :] == jnp.arange(t)[None, None, :,
                                                                            None])
    ancestors_at = jnp.argmax(at, axis=-1).astype(jnp.int32)  # [B, T, depth]: tree index
    own = node_coarse_kernel(keys, committed, ancestors_at, positions, sc, cfg.head_dim)
    seen = jnp.broadcast_to(jnp.where(active, committed - 1, -1)[:, None], (b, t))
    scale = cfg.head_dim ** -0.5

    def run(dense_len: int) -> tuple[jax.Array, jax.Array]:
        idx = _select_cached(q, compressed, positions, keys.shape[1], sc, dense_len,
                             dense_per_query=True, seen=seen, own=own)
        return infllmv2.sparse_attention_at(q, keys.astype(q.dtype), values.astype(q.dtype),
                                            idx, seen, block_size=sc.block_size,
                                            softmax_scale=scale, implementation=implementation,
                                            return_lse=True)

    prefix, lse = _switch(_any_dense(positions, sc, True), run, sc.dense_len)
    lse = jnp.where((committed >= 1)[:, None, None], lse, -jnp.inf)  # no prefix: no weight

    rows = jnp.arange(b)[:, None]
    kv = keys.shape[2] if keys.ndim == 4 else keys.shape[2] // d
    k_tree, v_tree = (x.reshape(b, x.shape[1], kv, d)[rows, safe] for x in (keys, values))
    qg = q.reshape(b, t, kv, h // kv, d)
    s = jnp.einsum("bukgd,bvkd->bkguv", qg, k_tree.astype(q.dtype),
                   preferred_element_type=jnp.float32) * scale
    s = jnp.where(ancestors[:, None, None], s, -jnp.inf)
    top = jnp.maximum(jnp.max(s, axis=-1), jnp.moveaxis(lse.reshape(b, t, kv, h // kv),
                                                        1, 3))  # [B, KV, G, T]
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.exp(s - top[..., None])
    tree_out = jnp.einsum("bkguv,bvkd->bukgd", p, v_tree.astype(jnp.float32))
    w = jnp.moveaxis(jnp.exp(lse.reshape(b, t, kv, h // kv) - jnp.moveaxis(top, 3, 1)), 1, 3)
    den = jnp.moveaxis(p.sum(-1) + w, 3, 1)  # [B, T, KV, G]
    num = tree_out + prefix.reshape(b, t, kv, h // kv, d).astype(jnp.float32) * jnp.moveaxis(
        w, 3, 1)[..., None]
    out = num / jnp.where(den > 0, den, 1.0)[..., None]
    return out.reshape(b, t, h, d).astype(q.dtype)
