"""BitCPM ternary weights: the quantizer, quantization-aware training and the packed format.

Quantizer (BitCPM4, MiniCPM4 report arXiv 2506.07900 §3.3; the formula as BitCPM-CANN, which
builds on it, states it): for a weight viewed as ``[in, out]`` and each group of ``group_size``
consecutive input rows of an output column, ``s = max(mean(|W_group|), eps)`` (absmean, as in
BitNet b1.58, arXiv 2402.17764 §2), ``q = clip(round(W / s), -1, 1)``, ``W ≈ q * s``.
``group_size=-1`` is one group per output column (per channel), ``0`` one scale per tensor.
Training uses the straight-through estimator ``W + stop_gradient(q * s - W)`` (forward: the
ternary weight; backward: identity), with the scale recomputed every step and never learned.
By default every decoder linear (q, k, v, o, gate, up, down) is ternary; the embedding and the
output head stay in full precision (``targets`` may add ``embed`` and ``lm_head``). Optionally
(``act_bits=8``) the input of every decoder linear is quantized to int8 per token with absmax
scaling, as BitNet b1.58 does (§2); MiniCPM4's BitCPM4 keeps activations in high precision
("quantizing activations increases QAT overhead without reducing much inference cost").

No JAX library provides this: qwix's 2-bit types have four levels, not three.

Packed format (``pack_params`` / ``save_packed`` / ``load_packed``): each ternary linear of the
stacked layers is ``{"qweight": uint8 [L, in/4, out], "scales": float32 [L, in/group, out]}``
(per tensor: ``[L, 1, 1]``). Codes are ``q + 1`` in {0, 1, 2}, 2 bits each, four consecutive
input rows per byte: rows ``4j..4j+3`` of a column go to byte ``j``, row ``4j+r`` in bits
``2r..2r+1`` (the int4 format's row order, :mod:`cpmjax.quant.packing`). The serving engine runs
these params as it runs int4 ones: ``cpmjax.quant.packing.dequantize`` recognises the uint8
codes and ``layer_transform_for`` hands each layer's packed tensors, inside the layer scan, to
matmuls that read them packed (:mod:`cpmjax.quant.qlinear`). On disk a packed model is a folder
with ``config.json`` (the model config plus a ``quantization_config``) and
``ternary.safetensors`` (cpmjax key paths joined by dots).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from cpmjax.atomic import atomic_dir
from cpmjax.config import ConfigError, ModelConfig
from cpmjax.convert import layout
from cpmjax.model.params import Params, param_specs
from cpmjax.train.step import Transforms

LINEARS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
TOP_LEVEL = ("embed", "lm_head")
QUANT_METHOD = "bitcpm_ternary"
PACKED_FILE = "ternary.safetensors"


@dataclasses.dataclass(frozen=True)
class TernaryConfig:
    """What is ternary and how: groups, which weights, optional int8 activations."""

    group_size: int = 128  # > 0: input rows per scale; -1: per output channel; 0: per tensor
    targets: tuple[str, ...] = LINEARS
    act_bits: int = 0  # 0: activations in the compute dtype; 8: int8 per token (BitNet b1.58)
    eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: Any) -> "TernaryConfig":
        """From a config section (``cfg.qat``) or a saved ``quantization_config``."""
        targets = d.get("targets", ",".join(LINEARS))
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return cls(int(d.get("group_size", 128)), tuple(targets), int(d.get("act_bits", 0)),
                   float(d.get("eps", 1e-5)))

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "bits": 2, "group_size": self.group_size,
                "targets": list(self.targets), "act_bits": self.act_bits, "eps": self.eps}

    def validate(self, cfg: ModelConfig, field: str = "qat") -> None:
        """Refuse settings the model cannot use, naming the field and the rule."""
        known = LINEARS + TOP_LEVEL
        bad = [t for t in self.targets if t not in known or (t == "lm_head"
                                                             and cfg.tie_word_embeddings)]
        if bad or not self.targets:
            raise ConfigError(f"config field '{field}.targets': {list(self.targets)} must be a "
                              f"non-empty subset of {list(known)} (no lm_head in a model with "
                              "tied embeddings)")
        if self.act_bits not in (0, 8):
            raise ConfigError(f"config field '{field}.act_bits': {self.act_bits} is not 0 or 8")
        if not self.eps > 0:
            raise ConfigError(f"config field '{field}.eps': {self.eps} must be > 0")
        if self.group_size < -1:
            raise ConfigError(f"config field '{field}.group_size': {self.group_size} must be "
                              "> 0, -1 (per channel) or 0 (per tensor)")
        for name in self.targets:
            n_in = weight_shape_2d(cfg, name)[0]
            if self.group_size > 0 and n_in % self.group_size:
                raise ConfigError(f"config field '{field}.group_size': {self.group_size} does "
                                  f"not divide the input dim {n_in} of {name}")


@functools.lru_cache(maxsize=1)
def _n_in() -> dict[str, int]:
    """Leading input dims of each linear in its cpmjax shape (the conversion table's)."""
    return {e.path[-1]: e.n_in for e in layout.entries(ModelConfig(tie_word_embeddings=False))
            if e.n_in is not None}


def weight_shape_2d(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(in, out) of a target weight (the embedding as ``[d, vocab]``, like a tied head)."""
    specs = param_specs(cfg)
    if name == "embed":
        return cfg.hidden_size, cfg.vocab_size
    shape = specs[name].shape if name == "lm_head" else specs["layers"][name].shape[1:]
    n_in = _n_in()[name]
    return int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))


def _to_2d(w: jax.Array, name: str, lead: int) -> jax.Array:
    """``[*lead, in, out]`` view of a weight with ``lead`` leading (layer) axes."""
    if name == "embed":
        return jnp.swapaxes(w, -1, -2)
    n_in = _n_in()[name]
    shape = w.shape[lead:]
    return w.reshape(*w.shape[:lead], int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))


def _from_2d(w2: jax.Array, name: str, like: jax.Array) -> jax.Array:
    return jnp.swapaxes(w2, -1, -2) if name == "embed" else w2.reshape(like.shape)


def absmean_scales(w2: jax.Array, group_size: int, eps: float) -> jax.Array:
    """Scales ``[..., in/group, out]`` (per tensor: ``[..., 1, 1]``) of ``w2 [..., in, out]``."""
    a = jnp.abs(w2.astype(jnp.float32))
    n_in, n_out = w2.shape[-2:]
    if group_size == 0:
        s = jnp.mean(a, axis=(-2, -1), keepdims=True)
    else:
        g = n_in if group_size == -1 else group_size
        s = jnp.mean(a.reshape(*a.shape[:-2], n_in // g, g, n_out), axis=-2)
    return jnp.maximum(s, eps)


def _grouped(x: jax.Array, groups: int) -> jax.Array:
    n_in, n_out = x.shape[-2:]
    return x.reshape(*x.shape[:-2], groups, n_in // groups, n_out)


def ternary_codes(w2: jax.Array, scales: jax.Array) -> jax.Array:
    """int8 codes in {-1, 0, 1} of ``w2 [..., in, out]`` given its scales."""
    g = _grouped(w2.astype(jnp.float32), scales.shape[-2])
    q = jnp.clip(jnp.round(g / scales[..., :, None, :]), -1, 1)
    return q.reshape(w2.shape).astype(jnp.int8)


def dequantize_codes(codes: jax.Array, scales: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``q * s`` as ``[..., in, out]`` in ``dtype``."""
    g = _grouped(codes.astype(jnp.float32), scales.shape[-2])
    return (g * scales[..., :, None, :].astype(jnp.float32)).reshape(codes.shape).astype(dtype)


def fake_quant_2d(w2: jax.Array, group_size: int, eps: float) -> jax.Array:
    """The ternary weight ``q * s`` of ``w2 [..., in, out]`` in ``w2``'s dtype."""
    s = absmean_scales(w2, group_size, eps)
    return dequantize_codes(ternary_codes(w2, s), s, w2.dtype)


def fake_quant(w: jax.Array, name: str, tc: TernaryConfig, lead: int = 0) -> jax.Array:
    """The ternary version of weight ``name`` (same shape; ``lead`` leading layer axes)."""
    return _from_2d(fake_quant_2d(_to_2d(w, name, lead), tc.group_size, tc.eps), name, w)


def ste(w: jax.Array, name: str, tc: TernaryConfig, lead: int = 0) -> jax.Array:
    """Straight-through estimator: ternary in the forward pass, identity in the backward."""
    return w + jax.lax.stop_gradient(fake_quant(w, name, tc, lead) - w)


def int8_activations(x: jax.Array) -> jax.Array:
    """Per-token absmax int8 fake quantization with a straight-through gradient (BitNet b1.58
    §2: ``x * 127 / max|x|``, rounded and clipped to [-128, 127], scaled back)."""
    scale = 127.0 / jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-5)
    q = jnp.clip(jnp.round(x * scale), -128, 127) / scale
    return x + jax.lax.stop_gradient(q.astype(x.dtype) - x)


def transforms_for_run(qat: Any, cfg: ModelConfig) -> Transforms | None:
    """The QAT transforms an experiment's ``qat`` section asks for (validated), or None."""
    if qat is None or not qat.get("enabled"):
        return None
    tc = TernaryConfig.from_dict(qat)
    tc.validate(cfg)
    return qat_transforms(tc)


def qat_transforms(tc: TernaryConfig) -> Transforms:
    """The train step's :class:`~cpmjax.train.step.Transforms` for ternary QAT: every target
    weight through :func:`ste` before the forward pass (the stacked layers at once: the ternary
    copy is the size of the weights in the compute dtype, sharded as they are), and int8
    activations if asked."""
    def params(p: Params) -> Params:
        out = {k: ste(v, k, tc) if k in tc.targets else v for k, v in p.items() if k != "layers"}
        out["layers"] = {k: ste(v, k, tc, lead=1) if k in tc.targets else v
                         for k, v in p["layers"].items()}
        return out

    return Transforms(params=params,
                      activation=int8_activations if tc.act_bits == 8 else None)


def fake_quant_params(params: Params, tc: TernaryConfig) -> Params:
    """The model with every target weight replaced by its ternary value ``q * s`` (float):
    what the fake-quantized HF export holds, and "plain rounding" of a full-precision model."""
    out = {k: fake_quant(v, k, tc) if k in tc.targets else v for k, v in params.items()
           if k != "layers"}
    out["layers"] = {k: fake_quant(v, k, tc, lead=1) if k in tc.targets else v
                     for k, v in params["layers"].items()}
    return out


# ---- packed format -------------------------------------------------------------------------

def pack_codes(codes: np.ndarray) -> np.ndarray:
    """int codes in {-1, 0, 1} ``[..., in, out]`` -> uint8 ``[..., in/4, out]`` (module doc)."""
    codes = np.asarray(codes)
    n_in = codes.shape[-2]
    if n_in % 4:
        raise ValueError(f"ternary packing needs an input dim divisible by 4, got {n_in}")
    u = (codes.astype(np.int16) + 1).astype(np.uint8)
    u = u.reshape(*codes.shape[:-2], n_in // 4, 4, codes.shape[-1])
    out = np.zeros(u.shape[:-2] + u.shape[-1:], np.uint8)
    for r in range(4):
        out |= u[..., r, :] << np.uint8(2 * r)
    return out


def unpack_codes(qweight: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_codes` in jax (inside jit): uint8 ``[..., in/4, out]`` -> int8
    codes ``[..., in, out]``."""
    shifts = (2 * jnp.arange(4, dtype=jnp.uint8))[:, None]
    two_bits = (qweight[..., :, None, :] >> shifts) & jnp.uint8(3)
    codes = two_bits.astype(jnp.int8) - jnp.int8(1)
    return codes.reshape(*qweight.shape[:-2], qweight.shape[-2] * 4, qweight.shape[-1])


def dequantize_packed(qt: dict[str, Any], dtype: Any = jnp.float32) -> jax.Array:
    """``[..., in, out]`` weights of a packed ternary tensor."""
    return dequantize_codes(unpack_codes(jnp.asarray(qt["qweight"])), jnp.asarray(qt["scales"]),
                            dtype)


def pack_params(params: Params, tc: TernaryConfig) -> Params:
    """Packed copy of ``params``: ternary decoder linears as packed tensors (with their layer
    axis); ternary embedding/head targets stored fake-quantized in float (they are lookups
    and the one head matmul, not part of the layer scan); the rest unchanged."""
    out = {k: (fake_quant(v, k, tc) if k in tc.targets else v) for k, v in params.items()
           if k != "layers"}
    layers = {}
    for k, v in params["layers"].items():
        if k not in tc.targets or k not in LINEARS:
            layers[k] = v
            continue
        w2 = _to_2d(jnp.asarray(v, jnp.float32), k, lead=1)
        s = absmean_scales(w2, tc.group_size, tc.eps)
        layers[k] = {"qweight": jnp.asarray(pack_codes(np.asarray(ternary_codes(w2, s)))),
                     "scales": s}
    out["layers"] = layers
    return out


def _flat(tree: Params, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def packed_nbytes(packed: Params) -> int:
    """Bytes of every tensor of a (packed) params tree."""
    return sum(np.asarray(v).nbytes for _, v in _flat(packed))


def save_packed(cfg: ModelConfig, packed: Params, folder: str | os.PathLike, tc: TernaryConfig,
                tokenizer_file: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write a packed ternary model folder (atomically; an existing one only with
    ``overwrite``); ``tokenizer_file`` is copied next to it so the folder serves text."""
    out = Path(folder)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    with atomic_dir(out) as tmp:
        tensors = {k: np.ascontiguousarray(np.asarray(v, None if k.endswith(".qweight")
                                                      else np.float32))
                   for k, v in _flat(packed)}
        save_file(tensors, str(tmp / PACKED_FILE), metadata={"format": QUANT_METHOD})
        config = {**cfg.to_hf_config(), "quantization_config": tc.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    return out


def is_packed_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / PACKED_FILE).is_file()


def load_packed(folder: str | os.PathLike) -> tuple[ModelConfig, Params, TernaryConfig]:
    """(config, packed params, ternary settings) of a packed folder; every tensor is checked
    against the config (names, shapes, dtypes, valid codes) before it is used."""
    folder = Path(folder)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}/config.json is missing or not JSON ({e})") from e
    qc = raw.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{folder}/config.json has no quantization_config with quant_method "
                         f"{QUANT_METHOD!r}")
    cfg = ModelConfig.from_hf_config(raw)
    tc = TernaryConfig.from_dict(qc)
    tc.validate(cfg, "quantization_config")
    tensors = load_file(str(folder / PACKED_FILE))
    want = _expected_tensors(cfg, tc)
    missing, extra = sorted(want.keys() - tensors.keys()), sorted(tensors.keys() - want.keys())
    if missing or extra:
        raise ValueError(f"{folder / PACKED_FILE}: missing tensors {missing[:5]}, unexpected "
                         f"{extra[:5]}")
    for name, (shape, dtype) in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{folder / PACKED_FILE}: {name} is {t.dtype}{list(t.shape)}, the "
                             f"config expects {np.dtype(dtype)}{list(shape)}")
        if dtype == np.uint8 and np.any(((t[..., None] >> np.arange(0, 8, 2, dtype=np.uint8))
                                         & 3) == 3):
            raise ValueError(f"{folder / PACKED_FILE}: {name} holds the invalid 2-bit code 3")
    params: Params = {}
    for name, t in tensors.items():
        node = params
        *path, leaf = name.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(t)
    return cfg, params, tc


def _expected_tensors(cfg: ModelConfig, tc: TernaryConfig) -> dict[str, tuple[tuple, Any]]:
    specs = param_specs(cfg)
    L = cfg.num_hidden_layers
    want: dict[str, tuple[tuple, Any]] = {}
    for k, spec in specs.items():
        if k != "layers":
            want[k] = (spec.shape, np.float32)
    for k, spec in specs["layers"].items():
        if k in tc.targets and k in LINEARS:
            n_in, n_out = weight_shape_2d(cfg, k)
            groups = 1 if tc.group_size in (0, -1) else n_in // tc.group_size
            want[f"layers.{k}.qweight"] = ((L, n_in // 4, n_out), np.uint8)
            want[f"layers.{k}.scales"] = ((L, groups, 1 if tc.group_size == 0 else n_out),
                                          np.float32)
        else:
            want[f"layers.{k}"] = (spec.shape, np.float32)
    return want


def ternary_config_of_run(run_dir: str | os.PathLike) -> TernaryConfig:
    """The ternary settings a QAT run trained with (its ``experiment.json`` ``qat`` section)."""
    path = Path(run_dir) / "experiment.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not a training run)")
    qat = json.loads(path.read_text()).get("qat") or {}
    if not qat.get("enabled"):
        raise ValueError(f"{run_dir} was not trained with ternary QAT (qat.enabled is false)")
    return TernaryConfig.from_dict(qat)



def export_ternary(cfg: ModelConfig, params: Params, tc: TernaryConfig, *,
                   hf_out: str | os.PathLike | None = None,
                   packed_out: str | os.PathLike | None = None,
                   tokenizer_file: str | os.PathLike | None = None,
                   overwrite: bool = False) -> dict[str, Path]:
    """Write the ternary model of full-precision (latent) ``params``: a fake-quantized HF MiniCPM
    folder (``q * s`` in float32; plain transformers with this project's modeling file loads it,
    as BitCPM4's released checkpoints are fake-quantized) and/or the packed folder."""
    from cpmjax.convert import save_hf

    tc.validate(cfg)
    out = {}
    if hf_out is not None:
        out["hf"] = save_hf(cfg, jax.device_get(fake_quant_params(params, tc)), hf_out,
                            dtype="float32", overwrite=overwrite)
    if packed_out is not None:
        out["packed"] = save_packed(cfg, jax.device_get(pack_params(params, tc)), packed_out, tc,
                                    tokenizer_file, overwrite)
    return out
