"""Small models shared by the speculative-decoding tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.model import forward, init_params
from cpmjax.model.mtp import init_mtp_params
from tests.conftest import tiny_hf_config


def small_models(vocab: int = 97, seed: int = 0, **overrides) -> tuple[ModelConfig, dict, dict]:
    """(cfg, target params, random draft params) of a 2-layer model; muP scales non-trivial."""
    cfg = ModelConfig.from_hf_config(tiny_hf_config(vocab_size=vocab, num_hidden_layers=2,
                                                    **overrides))
    params = init_params(cfg, jax.random.key(seed))
    draft = init_mtp_params(cfg, jax.random.key(seed + 1))
    return cfg, params, draft


def greedy_oracle(cfg: ModelConfig, params: dict, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding by full recompute (no cache): the reference output. The row is
    right-padded to one fixed length (causal attention: padding after a token cannot change it),
    so the forward compiles once."""
    width = len(prompt) + n
    seq = np.zeros((1, width), np.int32)
    seq[0, :len(prompt)] = prompt
    fwd = jax.jit(lambda t: forward(params, cfg, t).logits[0])
    for i in range(len(prompt), width):
        seq[0, i] = int(np.argmax(np.asarray(fwd(jnp.asarray(seq))[i - 1])))
    return seq[0, len(prompt):].tolist()
