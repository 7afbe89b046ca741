"""Memory traffic of one quantized decoder layer's decode step, from the compiled program.

Decode (one token per row) is bound by reading the weights, so what a packed format buys is the
bytes the compiled step reads. ``layer_decode_bytes`` compiles one decoder layer's decode step
(batch 1, one token, a short bf16 KV cache so the weights dominate; dense attention, so the 8B
preset's InfLLM v2 settings are dropped) as the serving scan body runs it, its linears bf16 or
packed (int4 / int8 GPTQ layout, ternary BitCPM layout, group 128) and read through
``cpmjax.quant.qforward.dequantize_layer``, and returns XLA's ``cost_analysis()["bytes
accessed"]``, for this CPU or, through libtpu's ahead-of-time compiler, for one chip of a TPU
topology. One layer, not the model: cost analysis counts a scan body once.
``linear_bytes`` gives the same figures for a single matmul at a given row count.

``bytes accessed`` counts every memory space: on TPU it includes XLA's prefetch copies of whole
weights into alternate memory (``copy-start`` to ``S(1)`` in the optimized HLO: the bf16 layer's
``wo``, the int4 layer's packed ``w_down``, which the matmul then reads a second time), so it
overstates weight traffic for both. ``bytes_read`` (bytes accessed minus what its instructions
write, ``bytes accessedout{}``) leaves the copies' writes out (a decode step's own writes, one
token's hidden state and K/V, are a few KiB) but still counts a prefetched weight twice.
``prefetch=False`` compiles with that alternate-memory assignment off (``xla_msa_enable``, a
libtpu flag, for the measurement only: a chip runs the program with it on), so that every weight
is counted once: the bf16 8B layer then accesses 476 MB against its 474 MB of weights. Either way
the HBM bytes a chip reads for a weight are its size once; the prefetch moves them earlier.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.bench.common import meta
from cpmjax.config import ModelConfig
from cpmjax.model import abstract_params, init_cache
from cpmjax.model.layers import linear
from cpmjax.model.params import Params
from cpmjax.model.rope import rope_cos_sin
from cpmjax.model.transformer import decoder_layer
from cpmjax.parallel.aot import tpu_devices
from cpmjax.presets import model_config
from cpmjax.quant.gptq import LINEAR_INPUTS
from cpmjax.quant.qforward import dense_draft, dequantize_layer
from cpmjax.quant.qlinear import quantized_weight

FORMATS = ("bf16", "int4", "int8", "ternary")
GROUP_SIZE = 128
# packed dtype and input rows per stored element of each format
_PACKED = {"int4": (jnp.int32, 8), "int8": (jnp.int8, 1), "ternary": (jnp.uint8, 4)}


def _abstract_weight(k: int, n: int, fmt: str, shape: tuple[int, ...] | None = None) -> Any:
    """A ``[k, n]`` linear (stored as ``shape`` when bf16) as bf16 or packed abstract arrays."""
    if fmt == "bf16":
        return jax.ShapeDtypeStruct(shape or (k, n), jnp.bfloat16)
    dtype, rows = _PACKED[fmt]
    return {"qweight": jax.ShapeDtypeStruct((k // rows, n), dtype),
            "scales": jax.ShapeDtypeStruct((k // GROUP_SIZE, n), jnp.float32)}


def _layer_args(cfg: ModelConfig, fmt: str) -> Params:
    """Abstract params of one layer (no layer axis): linears bf16 or packed, norms float32."""
    out: Params = {}
    for name, spec in abstract_params(cfg)["layers"].items():
        shape = spec.shape[1:]
        if name in LINEAR_INPUTS:
            n_in = LINEAR_INPUTS[name][1]
            out[name] = _abstract_weight(math.prod(shape[:n_in]), math.prod(shape[n_in:]), fmt,
                                         shape)
        else:
            out[name] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return out


def weight_bytes(cfg: ModelConfig, fmt: str) -> int:
    """Stored bytes of one layer's seven linears (packed codes plus scales) in ``fmt``."""
    leaves = jax.tree.leaves({k: v for k, v in _layer_args(cfg, fmt).items()
                              if k in LINEAR_INPUTS})
    return sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in leaves)


def _transform(cfg: ModelConfig, fmt: str, fused: bool) -> Callable[[Params], Params]:
    if fmt == "bf16":
        return lambda layer: layer
    if fused:
        return dequantize_layer(cfg, jnp.bfloat16)
    # the layer dequantized to dense before its matmuls (what dense_draft does to a draft)
    return lambda layer: dense_draft({"layer": layer}, cfg, jnp.bfloat16)["layer"]


class CompiledBytes(NamedTuple):
    """Bytes a compiled program moves, from its cost analysis."""

    accessed: float  # cost_analysis()["bytes accessed"]
    read: float  # the same minus the bytes written ("bytes accessedout{}")


def layer_decode_bytes(cfg: ModelConfig, fmt: str, topology: str | None = None,
                       cache_len: int = 128, fused: bool = True, prefetch: bool = True
                       ) -> CompiledBytes:
    """Bytes of one decoder layer's compiled decode step (batch 1, one token at
    the last position of a ``cache_len`` bf16 cache, donated as the engine donates it), for this
    host's backend or, with ``topology`` (e.g. ``"v5p:2x2x1"``), one chip of that TPU topology.
    ``fused=False`` dequantizes the whole layer to dense before its matmuls, for comparison;
    ``prefetch=False``: the TPU compile without alternate-memory prefetch (module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    cfg = dataclasses.replace(cfg, sparse_config=None)  # dense attention over the short cache
    transform = _transform(cfg, fmt, fused)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, cache_len, jnp.bfloat16))
    kv = tuple(jax.ShapeDtypeStruct(cache[n].shape[1:], cache[n].dtype) for n in ("k", "v"))

    def step(layer: Params, h: jax.Array, pos: jax.Array, k: jax.Array, v: jax.Array
             ) -> tuple[jax.Array, Any]:
        cos, sin = rope_cos_sin(cfg, pos)
        return decoder_layer(h, transform(layer), cfg, cos=cos, sin=sin, positions=pos,
                             segment_ids=None, cache_kv=(k, v))

    args = (_layer_args(cfg, fmt), jax.ShapeDtypeStruct((1, 1, cfg.hidden_size), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, 1), jnp.int32), *kv)
    return _compiled_bytes(step, args, topology, donate=(3, 4), prefetch=prefetch)


def linear_bytes(k: int, n: int, m: int, fmt: str, topology: str | None = None,
                 prefetch: bool = True) -> CompiledBytes:
    """The same figures for one ``linear``: bf16 ``x [m, k]`` times a ``[k, n]`` weight, bf16 or
    packed (read through a :class:`~cpmjax.quant.qlinear.QuantizedWeight`)."""
    def f(x: jax.Array, w: Any) -> jax.Array:
        w = w if fmt == "bf16" else quantized_weight(w, (k, n), jnp.bfloat16)
        return linear(x, w)

    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), _abstract_weight(k, n, fmt))
    return _compiled_bytes(f, args, topology, prefetch=prefetch)


def _compiled_bytes(fn: Callable[..., Any], args: tuple[Any, ...], topology: str | None,
                    donate: tuple[int, ...] = (), prefetch: bool = True) -> CompiledBytes:
    options = {}
    if topology is not None:
        sharding = jax.sharding.SingleDeviceSharding(tpu_devices(topology, 1)[0])
        args = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            args)
        if not prefetch:
            options = {"xla_msa_enable": False}
    elif not prefetch:
        raise ValueError("prefetch=False is a TPU compile option: pass a topology")
    lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    cost = lowered.compile(compiler_options=options).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    accessed = float(cost["bytes accessed"])
    return CompiledBytes(accessed, accessed - float(cost.get("bytes accessedout{}", 0.0)))


def _target(topology: str | None) -> str:
    return (f"tpu {topology} (libtpu {importlib.metadata.version('libtpu')} AOT, 1 chip)"
            if topology else jax.default_backend())


def rows(presets: tuple[str, ...], formats: tuple[str, ...] = ("bf16", "int4", "ternary"),
         topology: str | None = None, cache_len: int = 128, fused: bool = True,
         prefetch: bool = True) -> list[dict[str, Any]]:
    """One decode-layer row per (preset, format), each with its ratio to the preset's bf16
    layer compiled alike."""
    head = {"tool": "launch/quant_bytes.py", **meta(), "target": _target(topology),
            "scope": "decode layer"}
    out = []
    for preset in presets:
        cfg = model_config(preset)
        bf16 = layer_decode_bytes(cfg, "bf16", topology, cache_len, prefetch=prefetch)
        for fmt in formats:
            b = bf16 if fmt == "bf16" else layer_decode_bytes(cfg, fmt, topology, cache_len,
                                                              fused, prefetch)
            wb = weight_bytes(cfg, fmt)
            out.append({**head, "preset": preset, "format": fmt, "fused": fused,
                        "alternate_memory_prefetch": prefetch, "batch": 1,
                        "cache_len": cache_len, "group_size": GROUP_SIZE,
                        **_ratios(b, bf16), "weight_bytes": wb,
                        "weight_ratio_to_bf16": round(wb / weight_bytes(cfg, "bf16"), 4)})
    return out


def linear_rows(k: int, n: int, ms: tuple[int, ...], formats: tuple[str, ...],
                topology: str | None = None) -> list[dict[str, Any]]:
    """One row per (rows M, format) for a single ``[k, n]`` linear (the figures that chose
    :mod:`cpmjax.quant.qlinear`'s formulation)."""
    head = {"tool": "launch/quant_bytes.py", **meta(), "target": _target(topology),
            "scope": "linear", "k": k, "n": n, "group_size": GROUP_SIZE}
    out = []
    for m in ms:
        bf16 = linear_bytes(k, n, m, "bf16", topology)
        for fmt in formats:
            b = bf16 if fmt == "bf16" else linear_bytes(k, n, m, fmt, topology)
            out.append({**head, "m": m, "format": fmt, **_ratios(b, bf16)})
    return out


def _ratios(b: CompiledBytes, bf16: CompiledBytes) -> dict[str, float]:
    return {"bytes_accessed": b.accessed, "bf16_bytes_accessed": bf16.accessed,
            "ratio_to_bf16": round(b.accessed / bf16.accessed, 4), "bytes_read": b.read,
            "read_ratio_to_bf16": round(b.read / bf16.read, 4)}
