"""muP parameter groups: labels, per-group learning-rate multipliers, weight-decay masks, and the
update each group actually receives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.train.experiment import experiment_config
from cpmjax.train.optimizer import lr_multipliers, make_optimizer, param_groups, weight_decay_mask
from tests.conftest import tiny_hf_config

LAYER_MATS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig.from_hf_config(tiny_hf_config())  # hidden 64 / base 16: m = 4


def _train(**kw) -> ConfigDict:
    t = experiment_config(tiny_hf_config(), "t").train
    t.update(kw)
    return t


def test_groups(cfg: ModelConfig) -> None:
    g = param_groups(cfg)
    assert g["embed"] == "embed" and g["lm_head"] == "output" and g["final_norm"] == "ones"
    assert {k: g["layers"][k] for k in LAYER_MATS} == {k: "hidden" for k in LAYER_MATS}
    assert g["layers"]["input_norm"] == g["layers"]["post_norm"] == "ones"
    tied = param_groups(ModelConfig.from_hf_config(tiny_hf_config(tie_word_embeddings=True)))
    assert "lm_head" not in tied


def test_lr_multipliers_and_decay_mask(cfg: ModelConfig) -> None:
    assert cfg.width_multiplier == 4.0
    mult = lr_multipliers(cfg, "mup")
    assert all(mult["layers"][k] == 0.25 for k in LAYER_MATS)
    assert mult["embed"] == mult["lm_head"] == mult["final_norm"] == 1.0
    assert mult["layers"]["input_norm"] == 1.0
    assert set(jax.tree.leaves(lr_multipliers(cfg, "standard"))) == {1.0}
    mask = weight_decay_mask(cfg)
    assert all(mask["layers"][k] for k in LAYER_MATS) and mask["lm_head"]
    assert not mask["embed"] and not mask["final_norm"] and not mask["layers"]["post_norm"]
    assert weight_decay_mask(cfg, decay_embeddings=True)["embed"]


def test_update_sizes_per_group(cfg: ModelConfig) -> None:
    """First Adam step moves every weight by lr x multiplier (|m/sqrt(v)| = 1); decay adds
    lr x mult x wd x w only where the mask says so."""
    params = init_params(cfg, jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, params)
    lr, wd = 1e-2, 0.5
    tx = make_optimizer(_train(lr=lr, weight_decay=wd, warmup_steps=0, schedule="constant",
                               clip_norm=0.0, eps=1e-12), cfg)
    upd, _ = tx.update(grads, tx.init(params), params)
    mult, mask = lr_multipliers(cfg, "mup"), weight_decay_mask(cfg)
    expect = jax.tree.map(lambda p, mu, d: -lr * mu * (1 + (wd * p if d else 0)),
                          params, mult, mask)
    for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    assert float(upd["final_norm"][0]) == pytest.approx(-lr, rel=1e-5)  # base rate, no decay


def test_unknown_schedule_is_named(cfg: ModelConfig) -> None:
    with pytest.raises(ValueError, match="train.schedule"):
        make_optimizer(_train(schedule="step"), cfg)
