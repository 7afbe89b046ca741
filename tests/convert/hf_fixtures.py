"""Tiny random checkpoints in the HF MiniCPM layout, written the way HF writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from cpmjax.config import ModelConfig


def hf_tensors(hf_cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under HF names with HF [out, in] shapes."""
    cfg = ModelConfig.from_hf_config(hf_cfg)
    rng = np.random.default_rng(seed)
    d, hd, I, V = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads

    def w(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    out = {"model.embed_tokens.weight": w(V, d), "model.norm.weight": 1 + w(d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": 1 + w(d), p + "post_attention_layernorm.weight": 1 + w(d),
            p + "self_attn.q_proj.weight": w(H * hd, d), p + "self_attn.k_proj.weight": w(KV * hd, d),
            p + "self_attn.v_proj.weight": w(KV * hd, d), p + "self_attn.o_proj.weight": w(d, H * hd),
            p + "mlp.gate_proj.weight": w(I, d), p + "mlp.up_proj.weight": w(I, d),
            p + "mlp.down_proj.weight": w(d, I)})
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = w(V, d)
    return out


def write_hf_folder(folder: Path, hf_cfg: dict, tensors: dict[str, np.ndarray],
                    shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_cfg))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
