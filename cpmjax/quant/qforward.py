"""Quantize a model's decoder linears and run it with weights dequantized on the fly.

The quantized params are the model's tree with each of ``wq wk wv wo w_gate w_up w_down`` under
``layers`` replaced by a packed tensor ``{"qweight": [L, ...], "scales": [L, in/group, out]}``;
embedding, norms and lm_head stay in floating point (as GPTQ checkpoints do). ``qforward`` is
``cpmjax.model.forward`` with a ``layer_transform`` that wraps the current layer's packed leaves
as :class:`~cpmjax.quant.qlinear.QuantizedWeight` inside the scan; each matmul then reads the
packed codes and dequantizes inside the matmul (:mod:`cpmjax.quant.qlinear`).

GPTQ runs sequentially (Frantar et al. §4 "sequential"): each layer's Hessians are measured on
the outputs of the already-quantized layers below it.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model import embed_tokens, forward, param_specs
from cpmjax.model.params import Params
from cpmjax.quant.gptq import (LINEAR_INPUTS, CalibBatch, accumulate_hessians, gptq_quantize,
                               layer_outputs)
from cpmjax.quant.packing import dequantize, quantize_rtn
from cpmjax.quant.qlinear import QuantizedWeight, quantized_weight

Method = Literal["rtn", "gptq", "pgptq"]
PGPTQ_SKIP = 4  # positions dropped from the Hessian by P-GPTQ (MiniCPM4 report §4.1.2)


def _as_2d(w: np.ndarray, n_in: int) -> np.ndarray:
    return w.reshape(int(np.prod(w.shape[:n_in])), -1)


def dequantize_layer(cfg: ModelConfig, dtype: Any = jnp.float32
                     ) -> Callable[[Params], Params]:
    """``layer_transform`` for :func:`cpmjax.model.forward`: packed leaves ->
    :class:`~cpmjax.quant.qlinear.QuantizedWeight`, which the layer's matmuls read packed
    (dequantizing inside each matmul, not the whole layer to dense first)."""
    shapes = {k: s.shape[1:] for k, s in param_specs(cfg)["layers"].items()}

    def transform(layer: Params) -> Params:
        return {k: quantized_weight(v, shapes[k], dtype) if isinstance(v, dict) else v
                for k, v in layer.items()}

    return transform


def _has_packed_linears(layer: Params) -> bool:
    return any(isinstance(layer.get(k), dict) for k in LINEAR_INPUTS)


def is_quantized(params: Params) -> bool:
    """Whether ``params`` hold packed decoder linears (the output of :func:`quantize_params`)."""
    return _has_packed_linears(params["layers"])


def layer_transform_for(params: Params, cfg: ModelConfig, dtype: Any = jnp.float32):
    """The ``layer_transform`` that ``forward`` needs for ``params``: dequantization for packed
    params, None for floating-point ones (decided from the tree's structure, so under jit too)."""
    return dequantize_layer(cfg, dtype) if is_quantized(params) else None


def quantize_draft(cfg: ModelConfig, draft_params: Params, bits: int = 4,
                   group_size: int = 128) -> Params:
    """RTN-quantized copy of an MTP/EAGLE draft's decoder layer (fc, norms stay floating point);
    CPM.cu quantizes its draft only together with a W4A16 target (see :func:`check_spec_quant`)."""
    layer = dict(draft_params["layer"])
    for name, (_, n_in) in LINEAR_INPUTS.items():
        qt = quantize_rtn(_as_2d(np.asarray(layer[name]), n_in), bits, group_size)
        layer[name] = {f: jnp.asarray(qt[f]) for f in ("qweight", "scales")}
    return {**draft_params, "layer": layer}


def is_quantized_draft(draft_params: Params) -> bool:
    """Whether a draft's decoder layer is packed (the output of :func:`quantize_draft`)."""
    return _has_packed_linears(draft_params["layer"])


def dense_draft(draft_params: Params, cfg: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """The draft with its layer dequantized to dense arrays (a no-op for a floating-point
    draft); inside jit this dequantizes the one draft layer on the fly each step."""
    if not is_quantized_draft(draft_params):
        return draft_params
    layer = dequantize_layer(cfg, dtype)(draft_params["layer"])
    return {**draft_params, "layer": {k: v.dense() if isinstance(v, QuantizedWeight) else v
                                      for k, v in layer.items()}}


def qforward(qparams: Params, cfg: ModelConfig, tokens: jax.Array, **kwargs: Any):
    """``cpmjax.model.forward`` on quantized params (same keyword arguments)."""
    return forward(qparams, cfg, tokens, layer_transform=dequantize_layer(cfg), **kwargs)


def _calibration(params: Params, cfg: ModelConfig, batches: Iterable[dict[str, Any]]
                 ) -> list[CalibBatch]:
    """The calibration batches embedded, kept batch by batch (GPTQ streams over them)."""
    out = [CalibBatch(embed_tokens(params, cfg, jnp.asarray(b["inputs"])),
                      jnp.asarray(b["positions"]),
                      None if b.get("segment_ids") is None else jnp.asarray(b["segment_ids"]))
           for b in batches]
    if not out:
        raise ValueError("GPTQ needs at least one calibration batch")
    return out


def quantize_params(cfg: ModelConfig, params: Params, method: Method = "rtn", *, bits: int = 4,
                    group_size: int = 128, calibration: Iterable[dict[str, Any]] | None = None,
                    damp: float = 0.01) -> Params:
    """Quantized copy of ``params`` (the input is not modified).

    ``calibration`` (GPTQ/P-GPTQ only): batches with ``inputs`` and ``positions`` ``[B, T]``
    (optionally ``segment_ids``), e.g. from ``cpmjax.data.make_batch_iterator``. Layer by layer,
    each layer's Hessians accumulate over the batches one at a time (``cpmjax.quant.gptq``), so
    memory grows with one batch's activations, not with the whole calibration set.
    """
    if method not in ("rtn", "gptq", "pgptq"):
        raise ValueError(f"method must be 'rtn', 'gptq' or 'pgptq', got {method!r}")
    if method == "rtn" and calibration is not None:
        warnings.warn("calibration batches are ignored by RTN quantization", stacklevel=2)
    if method != "rtn" and calibration is None:
        raise ValueError(f"method {method!r} needs calibration batches")
    L = cfg.num_hidden_layers
    layers = {k: np.asarray(v) for k, v in params["layers"].items()}
    out: dict[str, list] = {k: [] for k in LINEAR_INPUTS}
    if method != "rtn":
        calib = _calibration(params, cfg, calibration)
    for l in range(L):
        layer = {k: jnp.asarray(v[l]) for k, v in layers.items()}
        if method != "rtn":
            hess = accumulate_hessians(calib, layer, cfg, PGPTQ_SKIP if method == "pgptq" else 0)
        for name, (tap, n_in) in LINEAR_INPUTS.items():
            w2 = _as_2d(layers[name][l], n_in)
            qt = (quantize_rtn(w2, bits, group_size) if method == "rtn" else
                  gptq_quantize(w2, hess[tap], bits, group_size, damp))
            out[name].append(qt)
            if method != "rtn":
                layer[name] = dequantize(qt).reshape(layers[name][l].shape)
        if method != "rtn":  # the next layer calibrates on this layer's quantized output
            calib = layer_outputs(calib, layer, cfg)
    qlayers = {k: jnp.asarray(v) for k, v in params["layers"].items() if k not in LINEAR_INPUTS}
    for name, qts in out.items():
        qlayers[name] = {f: jnp.asarray(np.stack([q[f] for q in qts])) for f in ("qweight", "scales")}
    return {**{k: v for k, v in params.items() if k != "layers"}, "layers": qlayers}


def check_spec_quant(target_quantized: bool, draft_quantized: bool) -> None:
    """Warn on a quantized draft with an unquantized target: the draft's proposals then drift from
    a full-precision target and acceptance drops for no speed gain on the (large) target; CPM.cu
    quantizes the draft only together with its W4A16 target (CPM.cu issue 4)."""
    if draft_quantized and not target_quantized:
        warnings.warn("quantized draft with a full-precision target: acceptance length drops and "
                      "the target's cost (the one that matters) is unchanged; quantize the target "
                      "too or keep the draft in full precision", stacklevel=2)
