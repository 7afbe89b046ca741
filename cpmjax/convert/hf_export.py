"""Export cpmjax params to an HF folder: the MiniCPM layout (loads with trust_remote_code through
this project's own PyTorch modeling file) or the llama layout (muP scales folded into weights, for
engines without MiniCPM support).

Folders are written atomically: everything goes to a temporary sibling directory that is renamed
into place at the end; an existing folder is never overwritten unless asked, and then only if it
is a previous export (``cpmjax.convert.export_dir``). The source's tokenizer files come along.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from cpmjax.atomic import atomic_dir
from cpmjax.config import ModelConfig
from cpmjax.convert import layout
from cpmjax.convert.export_dir import check_destination, copy_tokenizer, write_manifest
from cpmjax.convert.hf_import import INDEX_NAME, SINGLE_NAME
from cpmjax.model.params import Params, abstract_params
from cpmjax.model.rope import rope_frequencies

HF_FILES = Path(__file__).parent / "hf_files"
Format = Literal["minicpm", "llama"]
_DTYPES = ("float32", "bfloat16", "float16")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '2GB' or '500MiB'."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)?\s*", str(size).upper())
        if not m:
            raise ValueError(f"max_shard_size {size!r} is not a size such as '2GB' or 1000000")
        value = int(float(m.group(1)) * _UNITS[m.group(2) or "B"])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def check_params(cfg: ModelConfig, params: Params) -> None:
    """Params against the config's shapes before anything is written: a mismatch would otherwise
    give a folder that loads as a different model, or not at all."""
    def flat(tree: Any) -> dict[str, tuple[int, ...]]:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): tuple(np.shape(x)) for path, x in leaves}

    want, got = flat(abstract_params(cfg)), flat(params)
    if want.keys() != got.keys():
        raise ValueError(f"params do not match the config: missing {sorted(want - got.keys())}, "
                         f"unexpected {sorted(got.keys() - want.keys())}")
    for name, shape in want.items():
        if got[name] != shape:
            raise ValueError(f"params{name} has shape {got[name]}, the config expects {shape}")


def _llama_scale(entry: layout.Entry, cfg: ModelConfig) -> float:
    """The muP factor folded into a weight for the llama layout."""
    key = entry.path[-1]
    if entry.hf_name == "lm_head.weight":  # also a tied head, whose path is the embedding
        return 1.0 / cfg.width_multiplier
    if key == "embed":
        return cfg.scale_emb
    if key in ("wo", "w_down"):
        return cfg.residual_scale
    return 1.0


def _llama_entries(cfg: ModelConfig) -> list[layout.Entry]:
    # the llama head is always untied: embedding and head carry different folded scales
    table = layout.entries(cfg)
    if cfg.tie_word_embeddings:
        table.append(layout.Entry("lm_head.weight", ("embed",), None, False))
    return table


def _tensors(cfg: ModelConfig, params: Params, fmt: Format,
             dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) in checkpoint order, converted lazily one at a time."""
    table = layout.entries(cfg) if fmt == "minicpm" else _llama_entries(cfg)
    for entry in table:
        value = params
        for key in entry.path:
            value = value[key]
        scale = 1.0 if fmt == "minicpm" else _llama_scale(entry, cfg)
        for i, name in enumerate(layout.hf_names(entry, cfg)):
            piece = np.asarray(value[i] if entry.per_layer else value)
            if scale != 1.0:
                piece = (piece.astype(np.float32) * np.float32(scale))
            yield name, layout.to_hf(entry, piece).astype(dtype)


def copy_minicpm_code(folder: Path) -> None:
    """The project's MiniCPM config and modeling files (``trust_remote_code``) into ``folder``."""
    for src in ("configuration_minicpm.py", "modeling_minicpm.py"):
        shutil.copyfile(HF_FILES / src, folder / src)


def llama_config(cfg: ModelConfig, dtype_name: str) -> dict[str, Any]:
    """A LlamaForCausalLM config.json for the folded weights.

    The difference: transformers' Llama (5.x ``dynamic_rope_update``) picks LongRoPE long/short
    factors per call, long once the sequence passes original_max_position_embeddings, while
    MiniCPM fixes the choice once from max_position_embeddings > original_max_position_embeddings.
    Writing the list MiniCPM uses as both lists, with MiniCPM's cos/sin scale as
    ``attention_factor`` (otherwise Llama derives its own from ``factor``), makes the two agree at
    every length, below and above original_max_position_embeddings (tested on both sides).
    The RoPE goes under ``rope_parameters`` (what transformers >= 5 reads, rope_theta inside) and
    also under the older ``rope_scaling`` key for engines that read only that.
    """
    out: dict[str, Any] = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.to_hf_config().get("eos_token_id"),
        "pad_token_id": cfg.pad_token_id, "torch_dtype": dtype_name,
    }
    rs = cfg.rope_scaling
    if rs is not None and rs.get("rope_type", rs.get("type")) == "longrope":
        orig = rs["original_max_position_embeddings"]
        key = "long_factor" if cfg.max_position_embeddings > orig else "short_factor"
        _, scaling = rope_frequencies(cfg)
        out["rope_scaling"] = {
            "rope_type": "longrope", "long_factor": list(rs[key]), "short_factor": list(rs[key]),
            "original_max_position_embeddings": orig, "attention_factor": scaling,
            "factor": cfg.max_position_embeddings / orig}
    rope = dict(out.get("rope_scaling") or {"rope_type": "default"})
    out["rope_parameters"] = dict(rope, rope_theta=cfg.rope_theta)
    return out


def minicpm_config(cfg: ModelConfig, dtype_name: str) -> dict[str, Any]:
    out = cfg.to_hf_config()
    out["model_type"] = "minicpm"
    out["architectures"] = ["MiniCPMForCausalLM"]
    out["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                       "AutoModel": "modeling_minicpm.MiniCPMModel",
                       "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"}
    out["torch_dtype"] = dtype_name
    return out


def _plan_shards(cfg: ModelConfig, params: Params, fmt: Format, itemsize: int,
                 max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, from shapes only, so file names are known before writing."""
    shards: list[list[str]] = [[]]
    size = 0
    table = layout.entries(cfg) if fmt == "minicpm" else _llama_entries(cfg)
    for entry in table:
        value = params
        for key in entry.path:
            value = value[key]
        nbytes = math.prod(value.shape[1:] if entry.per_layer else value.shape) * itemsize
        for name in layout.hf_names(entry, cfg):
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
    return shards


def save_hf(cfg: ModelConfig, params: Params, out_dir: str | os.PathLike,
            format: Format = "minicpm", max_shard_size: int | str = "5GB",
            dtype: str | None = None, overwrite: bool = False,
            tokenizer: str | os.PathLike | None = None,
            sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Write an HF folder; returns its path. ``dtype`` defaults to the config's torch_dtype.
    ``tokenizer``: a tokenizer.json (or its folder) whose files are copied in; ``sources``:
    paths the export was made from, which the destination must not contain."""
    if format not in ("minicpm", "llama"):
        raise ValueError(f"format must be 'minicpm' or 'llama', got {format!r}")
    out = check_destination(out_dir, overwrite, sources)
    dtype_name = dtype or cfg.torch_dtype
    if dtype_name not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype_name!r}")
    check_params(cfg, params)
    np_dtype = jnp.dtype(dtype_name)
    max_bytes = parse_size(max_shard_size)
    with atomic_dir(out) as tmp:
        shards = _plan_shards(cfg, params, format, np_dtype.itemsize, max_bytes)
        names = ([SINGLE_NAME] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map: dict[str, str] = {}
        tensors = _tensors(cfg, params, format, np_dtype)
        total = 0
        for shard, fname in zip(shards, names):
            batch = {}
            for expected_name in shard:
                name, tensor = next(tensors)
                assert name == expected_name, (name, expected_name)
                batch[name] = tensor
                total += tensor.nbytes
                weight_map[name] = fname
            save_file(batch, str(tmp / fname), metadata={"format": "pt"})
            del batch
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        hf_cfg = (minicpm_config if format == "minicpm" else llama_config)(cfg, dtype_name)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf_cfg.get("eos_token_id"),
               "pad_token_id": cfg.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if format == "minicpm":
            copy_minicpm_code(tmp)
        copy_tokenizer(tokenizer, tmp)
        write_manifest(tmp, format)
    return out

