"""Shared fixtures: tiny model configs used across the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpmjax.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_hf_config(**overrides) -> dict:
    """A tiny MiniCPM config.json dict with non-trivial muP scales, GQA and LongRoPE factors."""
    hd = 16
    cfg = {
        "model_type": "minicpm", "architectures": ["MiniCPMForCausalLM"],
        "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "longrope",
                         "short_factor": [1.0 + 0.37 * i for i in range(hd // 2)],
                         "long_factor": [1.5 + 0.9 * i for i in range(hd // 2)],
                         "original_max_position_embeddings": 128},
        "scale_emb": 12.0, "dim_model_base": 16, "scale_depth": 1.4,
        "tie_word_embeddings": False, "initializer_range": 0.1,
        "bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 2, "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig.from_hf_config(tiny_hf_config())


@pytest.fixture(scope="session")
def project_tokenizer() -> Path:
    """The project tokenizer (4096 tokens, chat tokens included) in the repo's .cache, built on
    first use as the main job builds it."""
    from cpmjax.data.tokenizer import get_or_build_default_tokenizer

    return get_or_build_default_tokenizer(ROOT / ".cache" / "cpmjax", 4096)
