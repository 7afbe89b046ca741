"""``Model.generate(speculative=...)``: the public path gives the plain greedy output."""

from __future__ import annotations

import jax
import pytest

import cpmjax
from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.model.mtp import init_mtp_params
from cpmjax.serve.generate import Speculative
from tests.conftest import tiny_hf_config


def test_greedy_speculative_generate_equals_plain_generate():
    cfg = ModelConfig.from_hf_config(tiny_hf_config(eos_token_id=[2]))
    model = cpmjax.Model(cfg, init_params(cfg, jax.random.key(0)))
    draft = init_mtp_params(cfg, jax.random.key(1))
    prompts = [[1, 7, 9, 11], [1, 30, 31], [1, 4, 50, 60, 70, 80]]
    plain = model.generate(prompts, max_new_tokens=12)
    spec = model.generate(prompts, max_new_tokens=12, speculative=Speculative(draft, k=3))
    assert spec == plain


def test_speculative_rejects_unsupported_sampling_and_bad_settings():
    cfg = ModelConfig.from_hf_config(tiny_hf_config())
    model = cpmjax.Model(cfg, init_params(cfg, jax.random.key(0)))
    draft = init_mtp_params(cfg, jax.random.key(1))
    with pytest.raises(ValueError, match="top_k=0, top_p=1"):
        model.generate([[1, 2]], max_new_tokens=4, speculative=Speculative(draft), top_k=5)
    with pytest.raises(TypeError, match="Speculative"):
        model.generate([[1, 2]], max_new_tokens=4, speculative={"k": 3})
