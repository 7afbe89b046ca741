"""Export of quantized params as a GPTQ checkpoint folder (the layout vLLM's ``gptq`` and
``gptq_marlin`` loaders read, and CPM.cu's ``gptq2marlin.py`` converts to Marlin).

Per quantized linear ``<module>`` (HF MiniCPM names, ``cpmjax.convert.layout``), GPTQ's "v1"
checkpoint format (AutoGPTQ ``QuantLinear``, ``sym=True``, ``desc_act=False``, static groups):

- ``<module>.qweight`` int32 ``[in * bits / 32, out]``: 32/bits consecutive input rows per word,
  row ``k`` of a word in bits ``bits*k ..``, each as the unsigned code ``q + 2**(bits-1)``;
- ``<module>.qzeros`` int32 ``[in / group, out * bits / 32]``: the zero point ``2**(bits-1)``
  stored minus one (the v1 convention; loaders add the one back), packed along output columns;
- ``<module>.scales`` float16 ``[in / group, out]``;
- ``<module>.g_idx`` int32 ``[in]``: the group of each input row, ``row // group``.

So ``w[i, o] = scales[g_idx[i], o] * (code[i, o] - (zero[g_idx[i], o] + 1))``, which is
cpmjax's ``q * scale`` with the scale rounded to float16. cpmjax's own int4 packing is already
GPTQ's ``qweight`` (``cpmjax.quant.packing``); int8 codes are packed here. Every other tensor is
written as ``cpmjax.convert.save_hf`` writes it, in float16, and ``config.json`` carries the
``quantization_config`` the loaders dispatch on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors.numpy import save_file

from cpmjax.atomic import atomic_dir
from cpmjax.config import ModelConfig
from cpmjax.convert import layout
from cpmjax.convert.export_dir import check_destination, copy_tokenizer, write_manifest
from cpmjax.convert.hf_export import copy_minicpm_code, minicpm_config
from cpmjax.convert.hf_import import SINGLE_NAME
from cpmjax.model.params import Params
from cpmjax.quant.gptq import LINEAR_INPUTS
from cpmjax.quant.packing import unpack_int4


def _pack(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned ``codes`` packed 32/bits per int32 along ``axis`` (0: rows, 1: columns), the
    lowest index in the lowest bits."""
    per = 32 // bits
    u = np.moveaxis(codes.astype(np.uint32), axis, 0)
    u = u.reshape(u.shape[0] // per, per, *u.shape[1:])
    words = np.zeros(u.shape[:1] + u.shape[2:], np.uint32)
    for k in range(per):
        words |= u[:, k] << np.uint32(bits * k)
    return np.moveaxis(words, 0, axis).view(np.int32)


def gptq_linear(qt: dict[str, Any]) -> dict[str, np.ndarray]:
    """The four GPTQ tensors of one packed ``[in, out]`` linear (int4 or int8)."""
    qw, scales = np.asarray(qt["qweight"]), np.asarray(qt["scales"], np.float32)
    if qw.dtype == np.int32:
        bits, codes = 4, np.asarray(unpack_int4(qw))
    elif qw.dtype == np.int8:
        bits, codes = 8, qw.astype(np.int32)
    else:
        raise ValueError(f"GPTQ export takes int4 or int8 weights, got qweight {qw.dtype} "
                         "(ternary weights have no GPTQ layout)")
    n_in, n_out = codes.shape
    group = n_in // scales.shape[0]
    zero = 2 ** (bits - 1)
    qweight = qw if bits == 4 else _pack(codes + zero, bits, 0)
    zeros = np.full((scales.shape[0], n_out), zero - 1, np.uint32)
    return {"qweight": qweight, "qzeros": _pack(zeros, bits, 1),
            "scales": scales.astype(np.float16),
            "g_idx": (np.arange(n_in) // group).astype(np.int32)}


def _bits_and_group(qparams: Params) -> tuple[int, int]:
    found = set()
    for name in LINEAR_INPUTS:
        qt = qparams["layers"][name]
        if not isinstance(qt, dict):
            raise ValueError(f"layers.{name} is not quantized: export GPTQ from quantize_params "
                             "output")
        qw, scales = qt["qweight"], qt["scales"]
        bits = 4 if np.dtype(qw.dtype) == np.int32 else 8
        n_in = qw.shape[-2] * (8 if bits == 4 else 1)
        found.add((bits, n_in // scales.shape[-2]))
    if len(found) != 1:
        raise ValueError(f"GPTQ needs one bit width and group size for every linear, got "
                         f"{sorted(found)}")
    return found.pop()


def gptq_tensors(cfg: ModelConfig, qparams: Params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) of the whole checkpoint, in layout order."""
    for entry in layout.entries(cfg):
        value = qparams
        for key in entry.path:
            value = value[key]
        for i, name in enumerate(layout.hf_names(entry, cfg)):
            if entry.per_layer and entry.path[-1] in LINEAR_INPUTS:
                base = name.removesuffix(".weight")
                one = {f: np.asarray(value[f][i]) for f in ("qweight", "scales")}
                for field, tensor in gptq_linear(one).items():
                    yield f"{base}.{field}", tensor
            else:
                piece = np.asarray(value[i] if entry.per_layer else value, np.float32)
                yield name, layout.to_hf(entry, piece).astype(np.float16)


def save_gptq(cfg: ModelConfig, qparams: Params, out_dir: str | os.PathLike, *,
              damp: float = 0.01, overwrite: bool = False,
              tokenizer: str | os.PathLike | None = None) -> Path:
    """Write ``qparams`` (``cpmjax.quant.quantize_params`` output, int4 or int8) as a GPTQ
    folder: one safetensors file, config.json with ``quantization_config`` (also as
    ``quantize_config.json``, AutoGPTQ's name), the MiniCPM code files and the tokenizer."""
    bits, group = _bits_and_group(qparams)
    out = check_destination(out_dir, overwrite)
    quant = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False,
             "sym": True, "damp_percent": damp, "true_sequential": True,
             "checkpoint_format": "gptq"}
    with atomic_dir(out) as tmp:
        save_file(dict(gptq_tensors(cfg, qparams)), str(tmp / SINGLE_NAME),
                  metadata={"format": "pt"})
        hf_cfg = minicpm_config(cfg, "float16") | {"quantization_config": quant}
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(quant, indent=2) + "\n")
        copy_minicpm_code(tmp)
        copy_tokenizer(tokenizer, tmp)
        write_manifest(tmp, "gptq")
    return out
