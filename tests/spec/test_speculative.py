"""Speculative decoding is lossless: greedy output equals plain greedy decoding token for token;
sampling preserves the target distribution (the rejection rule, also with an FR-Spec draft)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.model import forward
from cpmjax.serve.generate import speculative_generate
from cpmjax.serve.speculative import accept_chain
from tests.spec.helpers import greedy_oracle, small_models


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculative_matches_plain_greedy(k):
    cfg, params, draft = small_models()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.vocab_size, size=n)) for n in (1, 3, 7, 12, 5, 9)]
    n_new = 12
    toks, stats = speculative_generate(cfg, params, draft, prompts, n_new, k=k)
    for i, p in enumerate(prompts):
        assert toks[i].tolist() == greedy_oracle(cfg, params, p, n_new), f"prompt {i}"
    # a random draft is mostly rejected: rounds must have happened with rejections
    assert 1.0 <= stats["mean_accept_length"] < k + 1
    assert stats["verify_steps"] >= len(prompts) * (n_new - 1) // (k + 1)


def test_greedy_with_frspec_subset_matches_plain_greedy():
    cfg, params, draft = small_models()
    ids = np.arange(0, cfg.vocab_size, 2)  # draft can never propose odd ids
    prompts = [[3, 8, 1, 40], [7], [11, 12, 13, 14, 15, 16]]
    toks, _ = speculative_generate(cfg, params, draft, prompts, 10, k=2, frspec_ids=ids)
    for i, p in enumerate(prompts):
        assert toks[i].tolist() == greedy_oracle(cfg, params, p, 10)


def test_greedy_rows_accept_exactly_the_argmax_prefix():
    """Greedy rows are the rule with one-hot p (target argmax) and one-hot q (the draft): drafts
    equal to the argmax are accepted up to the first mismatch, where the argmax is emitted; a draft
    equal to the target everywhere is accepted whole (k+1 tokens) with the argmax as bonus."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 4, 11)), jnp.float32)
    best = jnp.argmax(logits, axis=-1)  # [4, 4]
    wrong = (best[:, :3] + 1) % 11
    cut = jnp.asarray([0, 1, 2, 3])  # row r: first mismatch at draft r (3 = none)
    draft = jnp.where(jnp.arange(3)[None] < cut[:, None], best[:, :3], wrong)
    p = jax.nn.one_hot(best, 11)
    q = jax.nn.one_hot(draft, 11)
    for seed in range(5):  # the outcome must not depend on the randomness
        n, nxt = accept_chain(p, q, draft, jax.random.split(jax.random.key(seed), 4))
        assert n.tolist() == [0, 1, 2, 3]
        assert nxt.tolist() == best[jnp.arange(4), cut].tolist()


def _rule_samples(p, q, n_samples, seed):
    """Run the sampling rule ``n_samples`` times: drafts drawn from q, fresh keys each time."""
    k = q.shape[0]

    def one(key):
        kd, ka = jax.random.split(key)
        d = jax.random.categorical(kd, jnp.log(q), axis=-1)  # [k]
        n, nxt = accept_chain(p[None], q[None], d[None], ka[None])
        first = jnp.where(n[0] > 0, d[0], nxt[0])
        second = jnp.where(n[0] > 1, d[1], nxt[0])  # valid only when n >= 1
        return n[0], first, second

    return jax.vmap(one)(jax.random.split(jax.random.key(seed), n_samples))


@pytest.mark.parametrize("subset", [False, True])
def test_rejection_rule_preserves_target_distribution(subset):
    """First emitted token ~ p_0; given d_0 accepted, the second ~ p_1 (within a 5-sigma bound on
    every cell and TV < 0.015 at N = 100k). With ``subset`` q is zero on half the vocabulary (an
    FR-Spec head): those tokens can only come from the residual, which must restore their mass."""
    V, N = 10, 100_000
    rng = np.random.default_rng(2)
    p = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, V)) * 1.5, jnp.float32), axis=-1)
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, V)) * 1.5, jnp.float32), axis=-1)
    if subset:
        q = q.at[:, V // 2:].set(0.0)
        q = q / q.sum(-1, keepdims=True)
    n, first, second = map(np.asarray, _rule_samples(p, q, N, seed=3))
    emp = np.bincount(first, minlength=V) / N
    sigma = np.sqrt(np.asarray(p[0]) * (1 - np.asarray(p[0])) / N)
    assert np.all(np.abs(emp - np.asarray(p[0])) < 5 * sigma + 1e-4), (emp, p[0])
    assert 0.5 * np.abs(emp - np.asarray(p[0])).sum() < 0.015
    acc = second[n >= 1]
    emp2 = np.bincount(acc, minlength=V) / len(acc)
    sigma2 = np.sqrt(np.asarray(p[1]) * (1 - np.asarray(p[1])) / len(acc))
    assert np.all(np.abs(emp2 - np.asarray(p[1])) < 5 * sigma2 + 1e-4), (emp2, p[1])
    # acceptance probability of the first draft is sum_x min(p, q) (Leviathan et al. Thm. 3.5)
    alpha = float(jnp.minimum(p[0], q[0]).sum())
    assert abs(np.mean(n >= 1) - alpha) < 5 * np.sqrt(alpha * (1 - alpha) / N)


def test_sampled_speculative_generate_matches_target_joint_distribution():
    """End to end on a V=8 model with an FR-Spec draft: the empirical joint law of the first two
    generated tokens over 2000 rows equals p(x1) p(x2 | x1) computed by the target (chi-square)."""
    cfg, params, draft = small_models(vocab=8, seed=4)
    prompt = [1, 7, 3]
    N, T = 2000, 1.0
    toks, stats = speculative_generate(cfg, params, draft, [prompt] * N, 2, k=2, temperature=T,
                                       seed=5, frspec_ids=np.arange(5))
    V = cfg.vocab_size
    p1 = np.asarray(jax.nn.softmax(forward(params, cfg, jnp.asarray([prompt])).logits[0, -1]))
    seqs = jnp.asarray([prompt + [a] for a in range(V)])
    p2 = np.asarray(jax.nn.softmax(forward(params, cfg, seqs).logits[:, -1], axis=-1))
    joint = (p1[:, None] * p2).ravel()
    counts = np.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V)
    keep = joint * N >= 5  # chi-square cells with enough expected mass; the rest pooled
    exp, obs = joint[keep] * N, counts[keep]
    if (~keep).any():
        exp, obs = np.append(exp, joint[~keep].sum() * N), np.append(obs, counts[~keep].sum())
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(exp) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)  # ~5 sigma of the chi-square law
    assert stats["mean_accept_length"] > 1.0


def test_bad_inputs_are_named():
    cfg, params, draft = small_models()
    with pytest.raises(ValueError, match="prompt token ids"):
        speculative_generate(cfg, params, draft, [[cfg.vocab_size]], 2)
    with pytest.raises(ValueError, match="frspec_ids"):
        speculative_generate(cfg, params, draft, [[1]], 2, frspec_ids=[1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        speculative_generate(cfg, params, draft, [[]], 2)
