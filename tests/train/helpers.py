"""Shared pieces of the train tests: a tiny model, its optimizer and synthetic packed batches."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.config import ModelConfig
from cpmjax.parallel import make_mesh
from cpmjax.train.experiment import experiment_config
from cpmjax.train.optimizer import make_optimizer
from cpmjax.train.step import init_state, jit_train_step, make_train_step, state_shardings
from tests.conftest import tiny_hf_config


def setup(mesh=None, **train: Any):
    """(model cfg, mesh, state shardings, optimizer, initial state) on ``mesh`` (default: all
    devices on fsdp); ``train`` overrides fields of the experiment's train config."""
    exp = experiment_config(tiny_hf_config(), "t")
    exp.train.update(dict(lr=1e-2, warmup_steps=2, steps=50, **train))
    cfg = ModelConfig.from_hf_config(exp.model.to_dict())
    tx = make_optimizer(exp.train, cfg)
    mesh = mesh or make_mesh()
    init = lambda k: init_state(cfg, tx, k, with_mtp=exp.train.mtp_weight > 0)
    sh = state_shardings(cfg, jax.eval_shape(init, jax.random.key(0)), mesh)
    state = jax.jit(init, out_shardings=sh)(jax.random.key(0))
    return cfg, mesh, sh, tx, state


def batch(seed: int, b: int = 4, t: int = 32, vocab: int = 97) -> dict[str, jax.Array]:
    """Two packed documents per row, so segment ids, positions and the loss mask all matter."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, vocab, (b, t + 1)).astype(np.int32)
    split = t // 2
    seg = np.where(np.arange(t) < split, 1, 2)[None].repeat(b, 0).astype(np.int32)
    pos = np.where(np.arange(t) < split, np.arange(t), np.arange(t) - split)[None].repeat(b, 0)
    mask = np.ones((b, t), np.float32)
    mask[:, split - 1] = 0.0  # the last token of doc 1 does not predict doc 2
    return {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
            "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos.astype(np.int32)),
            "loss_mask": jnp.asarray(mask)}


def step_fn(cfg: ModelConfig, tx, sh, mesh, shape, **kw):
    return jit_train_step(make_train_step(cfg, tx, **kw), sh, mesh, shape)
