"""Logits parity with transformers: LlamaForCausalLM on the llama export, and the exported MiniCPM
folder through trust_remote_code (this project's PyTorch modeling file)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it at import

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import cpmjax
from cpmjax.config import ModelConfig
from cpmjax.model import forward, init_cache, init_params
from tests.conftest import tiny_hf_config

CONFIGS = {
    "gqa_longrope_long_untied": tiny_hf_config(),
    "gqa_longrope_short_tied": tiny_hf_config(tie_word_embeddings=True, max_position_embeddings=128),
    "mha_no_rope_scaling_odd_scales": tiny_hf_config(
        num_key_value_heads=4, rope_scaling=None, scale_emb=3.5, scale_depth=0.7,
        dim_model_base=8),
}


def _tokens(cfg: ModelConfig, length: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (2, length))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    cfg = ModelConfig.from_hf_config(CONFIGS[request.param])
    params = init_params(cfg, jax.random.key(1))
    model = cpmjax.Model(cfg, params)
    root = tmp_path_factory.mktemp(request.param)
    cpmjax.save_hf(model, root / "minicpm", max_shard_size="40KB")
    cpmjax.save_hf(model, root / "llama", format="llama")
    return model, root


# 150 > original_max_position_embeddings (128): transformers' Llama switches LongRoPE lists per
# sequence length, MiniCPM does not; the export makes both lengths agree.
@pytest.mark.parametrize("length", [40, 150])
def test_llama_export_matches_transformers_llama(exported, length):
    model, root = exported
    toks = _tokens(model.config, length)
    hf = LlamaForCausalLM.from_pretrained(root / "llama", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(toks)).logits.numpy()
    ours = np.asarray(model.logits(toks))
    assert np.abs(theirs - ours).max() <= 1e-4


def test_llama_export_loads_back_into_cpmjax(exported):
    model, root = exported
    back = cpmjax.load(root / "llama")
    assert back.config.scale_emb == 1.0 and back.config.residual_scale == pytest.approx(1.0)
    toks = _tokens(model.config)
    diff = np.abs(np.asarray(back.logits(toks)) - np.asarray(model.logits(toks))).max()
    assert diff <= 1e-4


def test_minicpm_export_matches_remote_code(exported):
    model, root = exported
    assert len(list(root.joinpath("minicpm").glob("model-*.safetensors"))) > 1  # sharded
    toks = _tokens(model.config)
    hf = AutoModelForCausalLM.from_pretrained(root / "minicpm", trust_remote_code=True,
                                              dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(toks)).logits.numpy()
    assert np.abs(theirs - np.asarray(model.logits(toks))).max() <= 1e-4


def test_remote_code_generate_matches_cpmjax_cached_greedy(exported):
    model, root = exported
    cfg = model.config
    prompt = _tokens(cfg)[:1, :7]
    hf = AutoModelForCausalLM.from_pretrained(root / "minicpm", trust_remote_code=True,
                                              dtype=torch.float32)
    theirs = hf.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=cfg.pad_token_id)[0, 7:].tolist()
    step = jax.jit(lambda p, t, pos, c: forward(p, cfg, t, positions=pos, cache=c))
    positions = jnp.arange(prompt.shape[1])[None]
    out = step(model.params, jnp.asarray(prompt), positions, init_cache(cfg, 1, 32))
    ours, pos = [], prompt.shape[1]
    for _ in range(8):
        tok = int(jnp.argmax(out.logits[0, -1]))
        ours.append(tok)
        out = step(model.params, jnp.array([[tok]]), jnp.array([[pos]]), out.cache)
        pos += 1
    assert ours == theirs


def test_remote_code_accepts_sparse_config_and_runs_dense(tmp_path, caplog):
    sparse = {"kernel_size": 8, "kernel_stride": 4, "init_blocks": 1, "block_size": 16,
              "window_size": 32, "topk": 2, "use_nope": False, "dense_len": 64}
    cfg = ModelConfig.from_hf_config(tiny_hf_config(sparse_config=sparse))
    params = init_params(cfg, jax.random.key(2))
    cpmjax.save_hf(cpmjax.Model(cfg, params), tmp_path / "sparse")
    with caplog.at_level("WARNING"):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse", trust_remote_code=True,
                                                  dtype=torch.float32)
    assert "runs dense attention" in caplog.text
    toks = _tokens(cfg, 100)  # longer than dense_len: cpmjax would go sparse, PyTorch stays dense
    with torch.no_grad():
        theirs = hf(torch.tensor(toks)).logits.numpy()
    dense = cpmjax.Model(cfg.replace(sparse_config=None), params)
    assert np.abs(theirs - np.asarray(dense.logits(toks))).max() <= 1e-4


def test_remote_code_left_padding_with_attention_mask(exported):
    model, root = exported
    toks = _tokens(model.config, 12)[:1]
    hf = AutoModelForCausalLM.from_pretrained(root / "minicpm", trust_remote_code=True,
                                              dtype=torch.float32)
    padded = np.concatenate([np.full((1, 3), model.config.pad_token_id), toks], axis=1)
    mask = np.concatenate([np.zeros((1, 3)), np.ones((1, 12))], axis=1)
    positions = np.concatenate([np.zeros((1, 3)), np.arange(12)[None]], axis=1)
    with torch.no_grad():
        theirs = hf(torch.tensor(padded), attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs[:, 3:] - np.asarray(model.logits(toks))).max() <= 1e-4
