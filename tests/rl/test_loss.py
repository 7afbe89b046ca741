"""The per-token objective: clip-higher, dual-clip, k3 KL, aggregation weights and the gradient
function against a direct computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.rl.loss import (PolicyLoss, clipped_token_loss, k3_kl, make_rl_grad_fn,
                            target_logprobs, token_weights)
from tests.conftest import tiny_hf_config


def _loss(ratio: float, adv: float, dual: float | None = 3.0):
    logp, adv = jnp.log(jnp.float32(ratio)), jnp.float32(adv)
    return [float(x) for x in clipped_token_loss(logp, jnp.float32(0.0), adv, 0.2, 0.28, dual)]


@pytest.mark.parametrize("ratio,adv,want,clipped,dual", [
    (1.0, 2.0, -2.0, 0, 0),          # on-policy: -A
    (1.5, 2.0, -2.56, 1, 0),         # A > 0 clipped at 1 + eps_high = 1.28 (clip-higher)
    (1.25, 2.0, -2.5, 0, 0),         # inside the asymmetric range: not clipped
    (0.5, 2.0, -1.0, 0, 0),          # A > 0 below 1 - eps_low: the pessimistic unclipped term
    (0.5, -2.0, 1.6, 1, 0),          # A < 0 clipped at 1 - eps_low = 0.8
    (2.0, -2.0, 4.0, 0, 0),          # A < 0, ratio 2 < c = 3: plain PPO loss
    (5.0, -2.0, 6.0, 0, 1),          # A < 0, ratio 5 > c = 3: dual-clip bound c|A|
])
def test_clip_higher_and_dual_clip(ratio, adv, want, clipped, dual):
    loss, was_clipped, was_dual, r = _loss(ratio, adv)
    assert loss == pytest.approx(want, rel=1e-5)
    assert (was_clipped, was_dual) == (clipped, dual)
    assert r == pytest.approx(ratio, rel=1e-5)


def test_dual_clip_off_and_gradients():
    assert _loss(5.0, -2.0, dual=None)[0] == pytest.approx(10.0, rel=1e-5)
    grad = jax.grad(lambda lp, a: clipped_token_loss(lp, 0.0, a, 0.2, 0.28, 3.0)[0])
    # clipped and dual-clipped tokens pass no gradient; an unclipped one passes -A r
    assert float(grad(jnp.log(1.5), 2.0)) == 0.0
    assert float(grad(jnp.log(5.0), -2.0)) == 0.0
    assert float(grad(jnp.log(1.1), 2.0)) == pytest.approx(-2.2, rel=1e-5)


def test_k3_kl():
    logp = jnp.log(jnp.asarray([0.5, 0.2, 0.3]))
    assert np.allclose(k3_kl(logp, logp), 0.0)
    ref = jnp.log(jnp.asarray([0.25, 0.5, 0.25]))
    kl = np.asarray(k3_kl(logp, ref))
    assert (kl > 0).all()
    # unbiased: its mean under pi_theta is KL(pi_theta || pi_ref)
    p = np.exp(np.asarray(logp))
    assert float((p * kl).sum()) == pytest.approx(float((p * (logp - ref)).sum()), rel=1e-5)


def test_token_weights():
    mask = np.asarray([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
    tok = token_weights(mask, "token")
    assert np.allclose(tok, mask / 5)  # every token counts the same (DAPO)
    seq = token_weights(mask, "sequence")
    assert np.allclose(seq.sum(axis=1), [0.5, 0.5, 0.0])  # every sequence counts the same
    with pytest.raises(ValueError, match="aggregation"):
        token_weights(mask, "mean")


def _rl_batch(cfg: ModelConfig, rows: int = 4, T: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, cfg.vocab_size, (rows, T + 1)).astype(np.int32)
    mask = np.zeros((rows, T), np.float32)
    mask[:, 4:] = 1.0
    mask[1, 9:] = 0.0  # a shorter response
    b = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
         "positions": np.tile(np.arange(T, dtype=np.int32), (rows, 1)),
         "segment_ids": np.ones((rows, T), np.int32), "loss_mask": mask,
         "advantages": np.repeat(rng.normal(size=(rows, 1)), T, 1).astype(np.float32),
         "weights": token_weights(mask, "token")}
    return {k: jnp.asarray(v) for k, v in b.items()}


CFG = ModelConfig.from_hf_config(tiny_hf_config(num_hidden_layers=2))
_logprobs = jax.jit(lambda p, b, t: target_logprobs(p, CFG, b, t)[0], static_argnums=2)


def test_grad_fn_on_policy_is_reinforce_and_accumulates():
    """At ratio 1 (behaviour = current policy) the clipped objective's gradient is the policy
    gradient -sum_t w_t A_t grad log pi(o_t); two microbatches give the same gradient."""
    cfg = CFG
    params = init_params(cfg, jax.random.key(0))
    b = _rl_batch(cfg)
    logp = _logprobs(params, b, 1.0)
    b["old_logprobs"] = jax.lax.stop_gradient(logp)
    loss = PolicyLoss(kl_coef=0.0)
    g, m = jax.jit(make_rl_grad_fn(cfg, loss))(params, b)
    want = jax.jit(jax.grad(lambda p: -jnp.sum(b["weights"] * b["advantages"]
                                               * target_logprobs(p, cfg, b, 1.0)[0])))(params)
    for a, w in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, w, rtol=2e-4, atol=1e-7)
    assert float(m["ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(m["clip_frac"]) == 0.0 and float(m["tokens"]) == float(b["loss_mask"].sum())
    g2, m2 = jax.jit(make_rl_grad_fn(cfg, loss, grad_accum=2))(params, b)
    for a, w in zip(jax.tree.leaves(g2), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, w, rtol=2e-4, atol=1e-7)
    assert float(m2["loss"]) == pytest.approx(float(m["loss"]), rel=1e-5)


def test_grad_fn_kl_and_temperature():
    cfg = CFG
    params = init_params(cfg, jax.random.key(0))
    b = _rl_batch(cfg)
    hot, cold = _logprobs(params, b, 2.0), _logprobs(params, b, 1.0)
    assert not np.allclose(hot, cold)  # log-probs are of softmax(logits / T)
    b["old_logprobs"] = hot
    b["ref_logprobs"] = hot
    grad_fn = jax.jit(make_rl_grad_fn(cfg, PolicyLoss(temperature=2.0, kl_coef=0.1)))
    _, m = grad_fn(params, b)
    assert float(m["kl"]) == pytest.approx(0.0, abs=1e-6)  # reference == policy
    b["ref_logprobs"] = _logprobs(init_params(cfg, jax.random.key(1)), b, 2.0)
    _, m = grad_fn(params, b)
    assert float(m["kl"]) > 0.0
    assert float(m["loss"]) == pytest.approx(float(m["pg_loss"]) + 0.1 * float(
        jnp.sum(b["weights"] * k3_kl(hot, b["ref_logprobs"]))), rel=1e-4)
