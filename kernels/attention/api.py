"""Dense attention, one entry point over a registry of implementations.

``dot_product_attention(q, k, v, q_pos=..., kv_pos=..., q_seg=..., kv_seg=..., scale=...,
keys_are_queries=..., implementation="auto")``; the visibility rule is in ``masking.py``.

Implementations (``REGISTRY.names``; ``"auto"`` = the platform default):
- ``"xla"``: flash attention in plain XLA, O(T x chunk) memory, custom backward
  (``xla_chunked.py``). Default on CPU and wherever nothing fused applies.
- ``"splash"``: TPU splash attention (Pallas Mosaic). Default on TPU.
- ``"splash_interpret"``: the same kernel in Pallas interpret mode (CPU tests).
- ``"cudnn"``: cuDNN flash attention, packed documents included. Default on GPU.
- ``"reference"``: the jnp oracle with the whole ``[Tq, Tk]`` matrix (tests, short rows).

An implementation that does not cover a call (splash and cuDNN take only whole-row
self-attention; cuDNN only bf16/fp16) raises ``NotImplementedError`` and the call runs on
``"xla"``: one configured name can serve training, prefill chunks and decode steps alike.
"""

from __future__ import annotations

import functools

import jax

from kernels.registry import Registry

from .reference import attention_reference
from .xla_chunked import attention_xla_chunked


def _splash(interpret: bool):
    from .splash_tpu import attention_splash
    return functools.partial(attention_splash, interpret=interpret)


def _cudnn():
    from .cudnn_gpu import attention_cudnn
    return attention_cudnn


REGISTRY = Registry("attention", defaults={"tpu": "splash", "gpu": "cudnn"}, fallback="xla")
REGISTRY.register("xla", lambda: attention_xla_chunked)
REGISTRY.register("reference", lambda: attention_reference)
REGISTRY.register("splash", lambda: _splash(False))
REGISTRY.register("splash_interpret", lambda: _splash(True))
REGISTRY.register("cudnn", _cudnn)

# Pallas Mosaic kernels cannot be partitioned by XLA: under a mesh they must run in shard_map.
MANUAL_PARTITIONING = frozenset({"splash"})


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array,
                          kv_pos: jax.Array, q_seg: jax.Array | None = None,
                          kv_seg: jax.Array | None = None, scale: float | None = None,
                          keys_are_queries: bool = False,
                          implementation: str = "auto") -> jax.Array:
    """GQA softmax attention; q ``[B, Tq, H, D]``, k/v ``[B, Tk, KV, D]``, positions and
    segment ids ``[B, T]`` of each side; returns ``[B, Tq, H, D]`` in q's dtype.

    ``keys_are_queries``: k/v are the queries' own tokens in order (Tq == Tk), so the mask is
    causal by index within each segment and fused causal kernels apply.
    """
    B, Tq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % k.shape[2]:
        raise ValueError(f"need q [B,Tq,H,D] and k, v [B,Tk,KV,D] with H % KV == 0, got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if q_pos.shape != (B, Tq) or kv_pos.shape != k.shape[:2]:
        raise ValueError(f"q_pos must be {(B, Tq)} and kv_pos {k.shape[:2]}, got "
                         f"{q_pos.shape} and {kv_pos.shape}")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("give segment ids for both queries and keys, or for neither")
    if keys_are_queries and Tq != k.shape[1]:
        raise ValueError(f"keys_are_queries needs Tq == Tk, got {Tq} and {k.shape[1]}")
    kw = dict(q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg,
              scale=D ** -0.5 if scale is None else float(scale),
              keys_are_queries=keys_are_queries)
    try:
        return REGISTRY.get(implementation)(q, k, v, **kw)
    except NotImplementedError:
        return attention_xla_chunked(q, k, v, **kw)
