"""The jitted train step: learning, gradient accumulation, non-finite handling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.train.step import make_grad_fn

from tests.train.helpers import batch, setup, step_fn


def test_loss_decreases_on_repeated_batch() -> None:
    cfg, mesh, sh, tx, state = setup()
    step = step_fn(cfg, tx, sh, mesh, (4, 32))
    b = batch(0)
    losses = []
    for _ in range(15):
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 1.0, losses
    assert int(state["step"]) == 15 and int(state["nonfinite_steps"]) == 0


def test_grad_accumulation_equals_big_batch() -> None:
    """Microbatches of unequal token counts: normalising by the total count gives the big batch's
    loss and gradient (up to float32 summation order)."""
    cfg, _, _, _, state = setup()
    b = batch(1, b=8)
    b["loss_mask"] = b["loss_mask"].at[:4, :10].set(0.0)  # first microbatch has fewer targets
    g1, m1 = jax.jit(make_grad_fn(cfg))(state["params"], b)
    g2, m2 = jax.jit(make_grad_fn(cfg, grad_accum=2))(state["params"], b)
    assert float(m1["tokens"]) == float(m2["tokens"]) == 8 * 31 - 4 * 10
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        scale = float(jnp.abs(a).max())
        assert scale > 0
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5 * scale)
    wrong, _ = jax.jit(make_grad_fn(cfg))(state["params"], {k: v[4:] for k, v in b.items()})
    assert not np.allclose(wrong["embed"], g1["embed"], rtol=1e-3)  # the test can tell apart


def test_nonfinite_step_is_skipped_and_counted() -> None:
    cfg, mesh, sh, tx, state = setup()
    step = step_fn(cfg, tx, sh, mesh, (4, 32))
    before = jax.tree.map(np.asarray, state)
    bad = batch(2)
    bad["loss_mask"] = bad["loss_mask"].at[0, 3].set(jnp.nan)  # poisons loss and gradients
    state, m = step(state, bad)
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    assert int(state["nonfinite_steps"]) == 1 and int(state["step"]) == 1
    for a, b in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
                    jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"])):
        np.testing.assert_array_equal(a, b)  # neither weights nor Adam moments/count changed
    state, m = step(state, batch(3))
    assert bool(m["finite"]) and int(state["nonfinite_steps"]) == 1
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"]))]
    assert all(changed)


def test_bf16_compute_keeps_float32_master_weights() -> None:
    cfg, mesh, sh, tx, state = setup()
    b = batch(4)
    s32, m32 = step_fn(cfg, tx, sh, mesh, (4, 32))(jax.tree.map(jnp.copy, state), b)
    s16, m16 = step_fn(cfg, tx, sh, mesh, (4, 32), dtype=jnp.bfloat16)(state, b)
    assert {x.dtype for x in jax.tree.leaves(s16["params"])} == {jnp.dtype(jnp.float32)}
    assert float(m16["loss"]) != float(m32["loss"])  # the compute really ran in bfloat16
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-2)


def test_remat_policies_give_the_same_gradients() -> None:
    cfg, _, _, _, state = setup()
    b = batch(5)
    g0, m0 = jax.jit(make_grad_fn(cfg))(state["params"], b)
    for policy in ("full", "dots"):
        g1, m1 = jax.jit(make_grad_fn(cfg, remat=policy))(state["params"], b)
        np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-6)
        for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


def test_bad_train_config_names_the_field() -> None:
    from cpmjax.config import ConfigError
    from cpmjax.train.experiment import check_experiment, experiment_config
    from tests.conftest import tiny_hf_config

    for field, value, match in [("on_nonfinite", "ignore", "train.on_nonfinite"),
                                ("grad_accum", 3, "train.grad_accum"),
                                ("steps", 0, "train.steps")]:
        cfg = experiment_config(tiny_hf_config(), "t")
        cfg.train[field] = value
        with pytest.raises(ConfigError, match=match):
            check_experiment(cfg)
