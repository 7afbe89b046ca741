"""The single attention dispatch point of the decoder.

Every layer calls :func:`attend`. It sees the (rotated) queries and keys, the positions and
document ids of both sides, and the model config, and picks the implementation: dense GQA
attention through the ``kernels.attention`` registry (flash on every platform: splash on TPU,
cuDNN on GPU, chunked XLA elsewhere); InfLLM v2 sparse attention (``cpmjax.sparse``, on top of
``kernels/infllmv2``) when ``cfg.sparse_config`` is set, with HF's dense/sparse switch on
``dense_len``. Implementation names come from the experiment config (``kernels`` section) or
the caller; ``"auto"`` is the platform default.

Masking rule (``kernels.attention.masking``): with ``kv_is_query`` (training, a whole-prompt
forward) causal by index within each document; otherwise query i sees key j iff
``0 <= kv_pos[j] <= q_pos[i]`` and, with segment ids, both are in the same document. Keys in a
KV cache are stored at their absolute position, so the same rule covers prefill and decode.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from cpmjax.config import ConfigError, ModelConfig
from cpmjax.parallel.sharding import kernel_map
from cpmjax.sparse import sparse_attend
from kernels import attention as dense_op
from kernels.infllmv2 import api as sparse_op
from kernels.infllmv2.layout import heads_view, kv_heads
from kernels.registry import current_platform

# the query heads of one KV head stay together in a shard (GQA), see activation_q_per_kv
_Q_AXES = ("activation_batch", "activation_length", "activation_kv_heads",
           "activation_q_per_kv", None)
_KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", None)
_TOKEN_AXES = ("activation_batch", "activation_length")


CONFIG_FIELDS = ("config field 'kernels.attention_impl'",
                 "config field 'kernels.sparse_attention_impl'")
ARGUMENTS = ("argument attn_impl", "argument sparse_impl")


def check_kernel_names(attn_impl: str, sparse_impl: str,
                       fields: tuple[str, str] = ARGUMENTS) -> None:
    """Refuse unknown implementation names before anything compiles, naming the field."""
    known = (("auto", *dense_op.REGISTRY.names), ("auto", *sparse_op.ATTENTION.names))
    for field, names, value in zip(fields, known, (attn_impl, sparse_impl)):
        if value not in names:
            raise ConfigError(f"{field}: unknown implementation {value!r}; known: {list(names)}")


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array | None,
                   kv_seg: jax.Array | None, kv_is_query: bool = False) -> jax.Array:
    """Boolean ``[B, Tq, Tk]`` of the masking rule (the reference/masked paths only)."""
    return dense_op.visible(q_pos, kv_pos, q_seg, kv_seg, kv_is_query)


def _per_shard(body: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
               q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array | None,
               kv_seg: jax.Array | None, extra: tuple[tuple[Any, Any], ...] = ()) -> jax.Array:
    """``body(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *extra)`` per shard under ``shard_map``
    with specs from the rules table (no-op without a context mesh): batch over the batch axes,
    query heads grouped per KV head, KV heads (or, when they cannot be split, the query heads
    of each group) over ``tensor``. ``extra`` pairs further arguments with their logical axes."""
    B, Tq, H, D = q.shape
    KV = kv_heads(k, D)  # k may be a lane-packed cache [B, S, KV * D]
    kv_axes = _KV_AXES[:k.ndim]

    def shard(qg, k, v, q_pos, kv_pos, q_seg, kv_seg, *rest):
        b, t, kv, g, d = qg.shape
        out = body(qg.reshape(b, t, kv * g, d), k, v, q_pos, kv_pos, q_seg, kv_seg, *rest)
        return out.reshape(b, t, kv, g, d)

    seg_axes = _TOKEN_AXES if q_seg is not None else None
    in_axes = (_Q_AXES, kv_axes, kv_axes, _TOKEN_AXES, _TOKEN_AXES, seg_axes, seg_axes,
               *(axes for _, axes in extra))
    run = kernel_map(shard, in_axes, _Q_AXES)
    out = run(q.reshape(B, Tq, KV, H // KV, D), k, v, q_pos, kv_pos, q_seg, kv_seg,
              *(x for x, _ in extra))
    return out.reshape(B, Tq, H, D)


def dense_attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array,
                 kv_pos: jax.Array, q_seg: jax.Array | None, kv_seg: jax.Array | None,
                 scale: float, kv_is_query: bool, implementation: str = "auto") -> jax.Array:
    """Dense attention through the registry; kernels XLA cannot partition (Pallas Mosaic) run
    per shard (``_per_shard``)."""
    name = dense_op.REGISTRY.resolve(implementation)

    def body(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        return dense_op.dot_product_attention(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg,
                                              kv_seg=kv_seg, scale=scale,
                                              keys_are_queries=kv_is_query, implementation=name)

    if name not in dense_op.MANUAL_PARTITIONING:
        return body(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return _per_shard(body, q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def _sparse_is_mosaic(name: str) -> bool:
    """Whether InfLLM v2 stage 2 runs the Pallas TPU kernel (which XLA cannot partition)."""
    return name == "pallas_tpu" or (name == "auto" and current_platform() == "tpu")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array, kv_pos: jax.Array,
           q_seg: jax.Array | None, kv_seg: jax.Array | None, cfg: ModelConfig,
           implementation: str = "auto", sparse_implementation: str = "auto",
           kv_is_query: bool = False,
           compressed: tuple[jax.Array, jax.Array] | None = None,
           stepwise: bool = False) -> jax.Array:
    """Attention for one layer; returns ``[B, Tq, H, D]`` in q's dtype.

    ``kv_is_query`` says the keys are exactly the queries' own tokens (training / no cache),
    which allows the fused causal kernels. ``implementation`` names the dense attention
    (``kernels.attention.REGISTRY``), ``sparse_implementation`` InfLLM v2's stage 2.
    ``compressed`` are the layer's cached InfLLM v2 kernels (``cpmjax.sparse.cache``), used by
    sparse decode. ``k``/``v`` are ``[B, Tk, KV, D]``, or a lane-packed ``[B, S, KV * D]`` cache
    (`cpmjax.model.cache.lane_packed`), which only the sparse op reads as it is.
    ``stepwise``: InfLLM v2's dense/sparse mode per query (`cpmjax.sparse.sparse_attend`).
    """
    scale = cfg.head_dim ** -0.5
    if cfg.sparse_config is None:
        return dense_attend(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg,
                            scale=scale, kv_is_query=kv_is_query, implementation=implementation)

    def sparse(q, k, v, q_pos, kv_pos, q_seg, kv_seg, compressed):
        # inside a shard the dense callback runs its kernel directly (kernel_map is a no-op)
        def dense() -> jax.Array:
            k4, v4 = heads_view(k, cfg.head_dim), heads_view(v, cfg.head_dim)
            return dense_attend(q, k4, v4, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg,
                                kv_seg=kv_seg, scale=scale, kv_is_query=kv_is_query,
                                implementation=implementation)

        return sparse_attend(q, k, v, q_pos=q_pos, q_seg=q_seg, cfg=cfg, dense=dense,
                             kv_is_query=kv_is_query, compressed=compressed,
                             implementation=sparse_implementation, stepwise=stepwise)

    if not _sparse_is_mosaic(sparse_implementation):
        return sparse(q, k, v, q_pos, kv_pos, q_seg, kv_seg, compressed)
    comp_axes = None if compressed is None else (_KV_AXES,) * len(compressed)
    return _per_shard(sparse, q, k, v, q_pos, kv_pos, q_seg, kv_seg, ((compressed, comp_axes),))
