"""Shared tiny model for the serving tests: random weights scaled up so greedy output varies."""

import jax
import pytest

from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.presets import tiny


@pytest.fixture(scope="session")
def cfg() -> ModelConfig:
    return ModelConfig.from_hf_config(tiny())


@pytest.fixture(scope="session")
def params(cfg):
    # x3 on "standard" init: small random weights make the model repeat its last token forever,
    # which would let a broken cache pass the greedy comparison.
    p = init_params(cfg, jax.random.PRNGKey(0), parametrization="standard")
    return jax.tree.map(lambda x: x * 3, p)
