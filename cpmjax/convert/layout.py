"""The mapping between HF MiniCPM tensor names and cpmjax parameters (HF modeling_minicpm.py module names).

One table; import and export both read it. HF stores Linear weights ``[out, in]``; cpmjax stores
them ``[in..., out...]`` for ``x @ W``, so a linear entry is transposed and reshaped both ways.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cpmjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str  # with "{i}" for the layer index when per_layer
    path: tuple[str, ...]  # key path into the cpmjax params
    n_in: int | None  # leading input dims of a linear weight; None = copied as is
    per_layer: bool


_LAYER = [
    ("input_layernorm.weight", "input_norm", None),
    ("self_attn.q_proj.weight", "wq", 1),
    ("self_attn.k_proj.weight", "wk", 1),
    ("self_attn.v_proj.weight", "wv", 1),
    ("self_attn.o_proj.weight", "wo", 2),
    ("post_attention_layernorm.weight", "post_norm", None),
    ("mlp.gate_proj.weight", "w_gate", 1),
    ("mlp.up_proj.weight", "w_up", 1),
    ("mlp.down_proj.weight", "w_down", 1),
]


def entries(cfg: ModelConfig) -> list[Entry]:
    """Every HF tensor of the model, in checkpoint order."""
    out = [Entry("model.embed_tokens.weight", ("embed",), None, False)]
    out += [Entry(f"model.layers.{{i}}.{name}", ("layers", key), n_in, True)
            for name, key, n_in in _LAYER]
    out.append(Entry("model.norm.weight", ("final_norm",), None, False))
    if not cfg.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head",), 1, False))
    return out


def hf_names(entry: Entry, cfg: ModelConfig) -> list[str]:
    if not entry.per_layer:
        return [entry.hf_name]
    return [entry.hf_name.format(i=i) for i in range(cfg.num_hidden_layers)]


def hf_shape(entry: Entry, cpmjax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF shape of one tensor given the cpmjax shape of one layer's slice."""
    if entry.n_in is None:
        return cpmjax_shape
    n_in = math.prod(cpmjax_shape[:entry.n_in])
    return (math.prod(cpmjax_shape) // n_in, n_in)


def to_cpmjax(entry: Entry, tensor: np.ndarray, cpmjax_shape: tuple[int, ...]) -> np.ndarray:
    return tensor if entry.n_in is None else tensor.T.reshape(cpmjax_shape)


def to_hf(entry: Entry, array: np.ndarray) -> np.ndarray:
    if entry.n_in is None:
        return array
    n_in = math.prod(array.shape[:entry.n_in])
    return np.ascontiguousarray(array.reshape(n_in, -1).T)
