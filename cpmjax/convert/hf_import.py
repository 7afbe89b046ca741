"""Import an HF MiniCPM folder (config.json + safetensors, single or sharded) into cpmjax params.

Each cpmjax parameter is assembled from its per-layer tensors (read one at a time with
``safe_open(..., framework="numpy")``, so nothing passes through an accelerator), moved to a jax
array, and its host buffer freed before the next one, so the checkpoint is never held twice in
memory. Every way the folder can be wrong gives an error that names the file or tensor.

A llama-layout folder written by ``save_hf(format="llama")`` also loads: its muP scales are
already folded into the weights, so it becomes a MiniCPM config with neutral scales (see
``llama_as_minicpm``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from cpmjax.config import ConfigError, ModelConfig
from cpmjax.convert import layout
from cpmjax.model.params import Params, abstract_params


class CheckpointError(ValueError):
    """The checkpoint folder is missing, inconsistent or corrupt; the message names what."""


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    try:
        if isinstance(hf, dict) and hf.get("model_type") == "llama":
            hf = llama_as_minicpm(hf)
        return ModelConfig.from_hf_config(hf)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def llama_as_minicpm(hf: dict[str, Any]) -> dict[str, Any]:
    """The MiniCPM config.json equivalent to a Llama one: scale_emb 1, scale_depth sqrt(L) (so the
    residual scale scale_depth/sqrt(L) is 1) and dim_model_base = hidden_size (width multiplier 1).

    Only the RoPE that cpmjax computes exactly is accepted: none/default, or the longrope form our
    llama export writes (equal long and short factors, attention_factor equal to MiniCPM's
    sqrt(1 + ln(s)/ln(orig))). Llama picks long/short factors per sequence length
    (transformers ``dynamic_rope_update``); cpmjax fixes one list, so unequal lists cannot be
    represented and are refused rather than silently mis-rotated.
    """
    out = dict(hf)
    rope = out.pop("rope_parameters", None) or out.get("rope_scaling")
    out.pop("rope_scaling", None)
    if rope is not None:
        rope = dict(rope)
        out["rope_theta"] = rope.pop("rope_theta", out.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "longrope":
            if list(rope["long_factor"]) != list(rope["short_factor"]):
                raise ConfigError("config field 'rope_scaling': a llama longrope config with "
                                  "different long_factor and short_factor switches lists per "
                                  "sequence length, which cpmjax cannot represent")
            orig = rope["original_max_position_embeddings"]
            s = out["max_position_embeddings"] / orig
            want = math.sqrt(1 + math.log(s) / math.log(orig))
            got = rope.get("attention_factor", want)
            if not math.isclose(got, want, rel_tol=1e-6):
                raise ConfigError(f"config field 'rope_scaling.attention_factor': {got} differs "
                                  f"from MiniCPM's sqrt(1 + ln(s)/ln(orig)) = {want}")
            out["rope_scaling"] = {"rope_type": "longrope", "long_factor": rope["long_factor"],
                                   "short_factor": rope["short_factor"],
                                   "original_max_position_embeddings": orig}
        elif kind != "default":
            raise ConfigError(f"config field 'rope_scaling': llama rope_type {kind!r} is not "
                              "supported (only default and longrope)")
    out.update(model_type="minicpm", scale_emb=1.0, dim_model_base=out["hidden_size"],
               scale_depth=math.sqrt(out["num_hidden_layers"]))
    if out.pop("mlp_bias", False):
        raise ConfigError("config field 'mlp_bias': MiniCPM4 MLPs have no bias; true is not "
                          "supported")
    out.pop("architectures", None)
    return out


def check_safetensors_file(path: Path) -> dict[str, Any]:
    """Read and check a safetensors header: a truncated or garbled file is named, not loaded."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is corrupt: shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{path} is corrupt: header length {header_len} exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt: unreadable header ({e})") from e
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + header_len + max(ends, default=0) != size:
        raise CheckpointError(f"{path} is corrupt or truncated: header describes "
                              f"{8 + header_len + max(ends, default=0)} bytes, file has {size}")
    return header


def tensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file holding it, from the index when sharded."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = {name: folder / fname for name, fname in weight_map.items()}
        for fname in sorted(set(files.values())):
            if not fname.is_file():
                raise CheckpointError(f"{index} names shard {fname.name}, which is missing")
    elif (folder / SINGLE_NAME).is_file():
        files = {}
    else:
        raise CheckpointError(f"{folder} has neither {SINGLE_NAME} nor {INDEX_NAME}")
    headers: dict[Path, dict[str, Any]] = {}
    for fname in sorted(set(files.values()) or {folder / SINGLE_NAME}):
        headers[fname] = check_safetensors_file(fname)
    if not files:
        files = {k: folder / SINGLE_NAME for k in headers[folder / SINGLE_NAME]
                 if k != "__metadata__"}
    for name, fname in files.items():
        if name not in headers[fname]:
            raise CheckpointError(f"index maps tensor {name!r} to {fname.name}, which lacks it")
    return files


def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[ModelConfig, Params]:
    """(config, params) from an HF MiniCPM folder; norm gains stay float32."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory")
    cfg = read_config(folder)
    files = tensor_files(folder)
    table = layout.entries(cfg)
    expected = {n for e in table for n in layout.hf_names(e, cfg)}
    if cfg.tie_word_embeddings and "lm_head.weight" in files:
        raise CheckpointError("checkpoint has lm_head.weight but config.json says "
                              "tie_word_embeddings=true; fix the config or drop the tensor")
    missing = sorted(expected - set(files))
    if missing:
        raise CheckpointError(f"missing tensor(s) {missing[:5]} in {folder}")
    unexpected = sorted(set(files) - expected)
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) {unexpected[:5]} in {folder}")

    shapes = abstract_params(cfg)
    params: Params = {}
    with _ShardReader() as reader:
        for entry in table:
            target = _get(shapes, entry.path)
            is_norm = entry.path[-1].endswith("norm")
            out_dtype = np.float32 if is_norm else jnp.dtype(dtype)
            one_shape = target.shape[1:] if entry.per_layer else target.shape
            host = np.empty(target.shape, out_dtype) if entry.per_layer else None
            for i, name in enumerate(layout.hf_names(entry, cfg)):
                t = reader.get(files[name], name)
                want = layout.hf_shape(entry, one_shape)
                if tuple(t.shape) != want:
                    raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, "
                                          f"expected {want} for this config")
                piece = layout.to_cpmjax(entry, t, one_shape).astype(out_dtype)
                if entry.per_layer:
                    host[i] = piece
                else:
                    host = piece
                del t, piece
            _set(params, entry.path, jnp.asarray(host))
            del host
    return cfg, params


class _ShardReader:
    """Keeps at most one safetensors file open (mapped) at a time. A stacked param gathers its
    layers from several shards, so a shard may be reopened; that costs a header parse, while the
    tensor bytes are read once either way."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._handle: Any = None

    def __enter__(self) -> "_ShardReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle = self._path = None

    def get(self, path: Path, name: str) -> np.ndarray:
        if path != self._path:
            self._close()
            self._handle = safe_open(str(path), framework="numpy").__enter__()
            self._path = path
        return self._handle.get_tensor(name)


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
