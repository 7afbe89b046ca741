"""Multi-token prediction in the train step: targets x_{i+2} within a document, the MTP head's
own parameters in the state, and its loss reaching both the head and the shared model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpmjax.model import forward
from cpmjax.model.mtp import mtp_loss
from cpmjax.train.step import make_grad_fn, mtp_mask
from tests.train.helpers import batch, setup, step_fn


def test_mtp_mask_matches_the_heads_loss() -> None:
    """The count the step normalises by is the count ``mtp_loss`` sums over."""
    cfg, _, _, _, state = setup(mtp_weight=0.3)
    b = batch(6)
    b["loss_mask"] = b["loss_mask"].at[1, 20].set(0.0)
    hidden = forward(state["params"], cfg, b["inputs"], positions=b["positions"],
                     segment_ids=b["segment_ids"]).hidden
    _, count = mtp_loss(state["mtp_params"], state["params"], cfg, hidden, b)
    mask = mtp_mask(b)
    assert float(count) == float(mask.sum()) == 4 * (31 - 2) - 2
    assert float(mask[0, 15]) == 0.0 and float(mask[0, 14]) == 0.0  # x_16/x_17 cross documents


def test_mtp_training_step() -> None:
    cfg, mesh, sh, tx, state = setup(mtp_weight=0.3)
    assert "mtp_params" in state
    step = step_fn(cfg, tx, sh, mesh, (4, 32), mtp_weight=0.3)
    b = batch(0)
    first = None
    for _ in range(12):
        state, m = step(state, b)
        first = first or (float(m["loss"]), float(m["mtp_loss"]))
    assert float(m["loss"]) < first[0] - 0.5 and float(m["mtp_loss"]) < first[1] - 0.5


def test_mtp_gradients_reach_head_and_shared_weights() -> None:
    cfg, _, _, _, state = setup(mtp_weight=0.5)
    tree = {"model": state["params"], "mtp": state["mtp_params"]}
    b = batch(1, b=8)
    g, m = jax.jit(make_grad_fn(cfg, mtp_weight=0.5))(tree, b)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g["mtp"]))
    g_ntp, _ = jax.jit(make_grad_fn(cfg))(state["params"], b)
    assert not np.allclose(g["model"]["embed"], g_ntp["embed"])  # the MTP loss adds to it
    g2, m2 = jax.jit(make_grad_fn(cfg, mtp_weight=0.5, grad_accum=2))(tree, b)
    np.testing.assert_allclose(float(m2["mtp_loss"]), float(m["mtp_loss"]), rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


def test_frozen_model_step_trains_only_the_head_with_self_distillation() -> None:
    """freeze_model: the model stays bit-identical (weight decay on) and gets zero gradients while
    the head learns; mtp_distill: the head's loss is the CE against the model's own next-next-token
    distribution, which equals the data CE when the teacher is one-hot at the data tokens."""
    cfg, mesh, sh, tx, state = setup(mtp_weight=1.0, weight_decay=0.1)
    before = jax.tree.map(np.asarray, state["params"])
    head0 = jax.tree.map(np.asarray, state["mtp_params"])
    step = step_fn(cfg, tx, sh, mesh, (4, 32), mtp_weight=1.0, freeze_model=True,
                   mtp_distill=True)
    b = batch(0)
    for _ in range(3):
        state, m = step(state, b)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in
               zip(jax.tree.leaves(head0), jax.tree.leaves(state["mtp_params"])))
    tree = {"model": state["params"], "mtp": state["mtp_params"]}
    g, _ = jax.jit(make_grad_fn(cfg, mtp_weight=1.0, freeze_model=True))(tree, b)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g["model"]))

    hidden = forward(state["params"], cfg, b["inputs"], positions=b["positions"],
                     segment_ids=b["segment_ids"]).hidden
    one_hot = 1e4 * jax.nn.one_hot(b["targets"], cfg.vocab_size)  # teacher = the data tokens
    data, n1 = mtp_loss(state["mtp_params"], state["params"], cfg, hidden, b)
    distilled, n2 = mtp_loss(state["mtp_params"], state["params"], cfg, hidden, b, one_hot)
    assert float(n1) == float(n2)
    np.testing.assert_allclose(float(distilled), float(data), rtol=1e-5)
