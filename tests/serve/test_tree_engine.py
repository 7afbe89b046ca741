"""The tree engine is lossless in the strong sense: greedy and seeded sampled requests get the
tokens plain decoding gives them, whatever tree, step kind or batch companions; full acceptance
leaves the caches of plain decoding; a sparse model speculates at any length, across InfLLM v2's
dense/sparse switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.model import init_params
from cpmjax.model.mtp import init_mtp_params
from cpmjax.serve.engine import DecodeEngine
from cpmjax.serve.generate import speculative_generate
from cpmjax.serve.sampling import SamplingParams
from cpmjax.serve.scheduler import Scheduler
from cpmjax.serve.spec_engine import SpeculativeEngine
from cpmjax.serve.tree_engine import PLAIN, TreeEngine
from tests.sparse.test_sparse_model import make_cfg
from tests.spec.helpers import greedy_oracle, small_models


def _decode(engine, params, prompts, n, samplings):
    sched = Scheduler(engine, params, max_queue=len(prompts))
    reqs = [sched.submit(p, n, sp, stop_token_ids=[], ignore_eos=True)
            for p, sp in zip(prompts, samplings)]
    sched.run_until_done()
    return [r.output for r in reqs], sched


def _prompts(vocab, lens, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lens]


@pytest.mark.parametrize("tree, policy, subset", [((3, 2, 4), "fixed", False),
                                                  ((4, 3, 8), "measured", True)])
def test_greedy_tree_decoding_matches_plain_greedy(tree, policy, subset):
    cfg, params, draft = small_models()
    prompts = _prompts(cfg.vocab_size, (1, 3, 7, 12, 5, 9))
    ids = np.arange(0, cfg.vocab_size, 2) if subset else None
    toks, stats = speculative_generate(cfg, params, draft, prompts, 12, tree=tree,
                                       policy=policy, frspec_ids=ids)
    for i, p in enumerate(prompts):
        assert toks[i].tolist() == greedy_oracle(cfg, params, p, 12), f"prompt {i}"
    assert stats["verify_steps"] >= len(prompts)


def _predictable():
    """A target whose logits are all zero (lm_head = 0) and a draft that shares its head: both
    rank token 0 first, and a sampled row's target and draft see the same Gumbel noise over
    the same (uniform) distribution, so every drafted level is accepted; the hidden states and
    caches still depend on every token and position."""
    cfg, params, draft = small_models()
    params = {**params, "lm_head": jnp.zeros_like(params["lm_head"])}
    return cfg, params, draft


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_full_acceptance_leaves_the_caches_of_plain_decoding(temperature):
    cfg, params, draft = _predictable()
    prompts = _prompts(cfg.vocab_size, (6, 11))
    sp = [SamplingParams(temperature, seed=s) for s in (3, 4)]
    plain = DecodeEngine(cfg, max_slots=2, max_len=64, chunk=8)
    tree = TreeEngine(cfg, draft, tree=(3, 2, 7), policy="fixed", max_slots=2, max_len=64,
                      chunk=8)
    want, ps = _decode(plain, params, prompts, 21, sp)
    got, ts = _decode(tree, params, prompts, 21, sp)
    assert got == want
    assert ts.step_tokens / ts.decode_steps == pytest.approx(4.0)  # depth 3 + 1, every round
    if temperature:
        assert len({t for row in got for t in row}) > 5  # sampled, not a constant
    # the rows were released; their caches hold prompt + 20 generated tokens at 0..n-1
    for row, p in enumerate(prompts):
        n = len(p) + 20
        for name in ("k", "v"):
            np.testing.assert_allclose(ts.state.cache[name][:, row, :n],
                                       ps.state.cache[name][:, row, :n], atol=2e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tree_rounds_report_the_chain_they_hold(temperature):
    """Every drafted level accepted: a tree round emits depth + 1 tokens per row, and so would
    the chain of its first children, which the round reports to the policy for each chain
    kind, cut at that chain's depth + 1 (greedy and seeded sampled rows: the coupled rule
    makes both kinds' tokens equal)."""
    cfg, params, draft = _predictable()
    prompts = _prompts(cfg.vocab_size, (6, 11))
    sp = [SamplingParams(temperature, seed=s) for s in (3, 4)]
    engine = TreeEngine(cfg, draft, tree=(3, 2, 7), max_slots=2, max_len=64, chunk=8)
    engine.policy = _Scripted([0])
    _decode(engine, params, prompts, 21, sp)
    want = {engine.kinds.index((d, 1, d)): d + 1 for d in (3, 2, 1)}
    assert engine.policy.paired and all(p == want for p in engine.policy.paired)
    # a chain round tells the shorter chains' tokens (its own count cut at their depth + 1)
    engine.policy = _Scripted([1])
    _decode(engine, params, prompts, 21, sp)
    want = {engine.kinds.index((d, 1, d)): d + 1 for d in (2, 1)}
    assert engine.policy.paired and all(p == want for p in engine.policy.paired)


def test_seeded_sampling_equals_plain_sampling_alone_or_in_a_batch():
    """Random weights (drafts mostly rejected): sampled requests (temperature, top-k, top-p)
    get plain decoding's tokens in a 4-slot tree engine with companions and alone."""
    cfg, params, draft = small_models()
    prompts = _prompts(cfg.vocab_size, (4, 9, 2, 13, 6))
    sp = [SamplingParams(0.9, top_k=20, top_p=0.9, seed=10 + i) for i in range(4)] + [
        SamplingParams(0.0)]
    want, _ = _decode(DecodeEngine(cfg, max_slots=4, max_len=64, chunk=8), params, prompts, 15,
                      sp)
    engine = TreeEngine(cfg, draft, tree=(3, 3, 6), max_slots=4, max_len=64, chunk=8)
    together, _ = _decode(engine, params, prompts, 15, sp)
    alone, _ = _decode(TreeEngine(cfg, draft, tree=(2, 2, 3), max_slots=1, max_len=64,
                                  chunk=8), params, prompts[1:2], 15, sp[1:2])
    assert together == want
    assert alone[0] == want[1]


class _Scripted:
    """A policy stub that cycles through fixed step kinds."""

    def __init__(self, script):
        self.script, self.i = script, 0
        self.chosen, self.recorded, self.paired = {}, [], []

    def choose(self, busy):
        self.i += 1
        return self.script[(self.i - 1) % len(self.script)]

    def record(self, kind, busy, seconds, slowest, paired=None):
        self.recorded.append(kind)
        self.paired.append(paired)


def test_switching_step_kinds_changes_no_token():
    """Plain steps (more in a row than the draft may fall behind: the pending buffer fills and
    is read), chain and tree rounds in any order: greedy and sampled tokens stay plain's."""
    cfg, params, draft = small_models()
    prompts = _prompts(cfg.vocab_size, (5, 8, 3))
    sp = [SamplingParams(0.0), SamplingParams(1.0, seed=1), SamplingParams(0.7, seed=2)]
    want, _ = _decode(DecodeEngine(cfg, max_slots=3, max_len=96, chunk=8), params, prompts, 30,
                      sp)
    engine = TreeEngine(cfg, draft, tree=(3, 2, 4), pending=3, max_slots=3, max_len=96,
                        chunk=8)
    plain = engine.kinds.index(PLAIN)
    assert engine.kinds[1:4] == ((3, 1, 3), (2, 1, 2), (1, 1, 1))  # chains of every length
    engine.policy = _Scripted([plain] * 5 + [0, 1, plain, 0, 3, plain, plain, 1, 2, 2])
    got, _ = _decode(engine, params, prompts, 30, sp)
    assert got == want
    assert {"tree", "plain"} <= set(engine.compilations)


def test_greedy_chain_steps_run_the_chain_round_and_change_no_token():
    """With every row greedy the chain kinds (every length) run the chain engine's causal round
    (no tree masks), interleaved with tree rounds and plain steps: the tokens stay plain
    greedy's."""
    cfg, params, draft = small_models()
    prompts = _prompts(cfg.vocab_size, (4, 9), seed=3)
    sp = [SamplingParams(0.0)] * 2
    want, _ = _decode(DecodeEngine(cfg, max_slots=2, max_len=96, chunk=8), params, prompts, 30,
                      sp)
    engine = TreeEngine(cfg, draft, tree=(3, 2, 4), pending=3, max_slots=2, max_len=96,
                        chunk=8)
    assert engine.kinds[1] == (3, 1, 3)
    plain = engine.kinds.index(PLAIN)
    script = [1, 1, plain, 0, 2, 1, plain, plain, plain, plain, 3, 1, 0]
    engine.policy = _Scripted(script)
    got, _ = _decode(engine, params, prompts, 30, sp)
    assert got == want
    # one causal round per chain length (3, 2 and 1), and the tree
    assert engine.compilations["generate_greedy"] >= 3 and engine.compilations["tree"] >= 1
    # costs come only from a kind's repeated steps (the first after a switch runs cold), so
    # of this script's cycles only its runs of 1, 1 and plain x4 are measured, after compiling
    ran = [script[i % len(script)] for i in range(engine.policy.i)]
    repeats = [k for i, k in enumerate(ran) if i and ran[i - 1] == k]
    assert engine.policy.recorded and set(engine.policy.recorded) <= {1, plain}
    assert len(engine.policy.recorded) <= len(repeats)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sparse_model_speculates_past_dense_len(temperature):
    """InfLLM v2 with dense_len 64: 40- and 57-token prompts cross it while the tree speculates
    (every node decides dense or sparse mode from its own position, as decoding does); greedy
    and seeded sampled tokens equal plain decoding's, with no plain step."""
    cfg = make_cfg(dense_len=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    draft = init_mtp_params(cfg, jax.random.PRNGKey(1))
    prompts = [list(range(5, 45)), list(range(3, 60))]
    sp = [SamplingParams(temperature=temperature, seed=s) for s in (11, 12)]
    want, _ = _decode(DecodeEngine(cfg, max_slots=2, max_len=128, chunk=16), params, prompts,
                      40, sp)
    engine = TreeEngine(cfg, draft, tree=(2, 2, 3), policy="fixed", max_slots=2, max_len=128,
                        chunk=16)
    got, _ = _decode(engine, params, prompts, 40, sp)
    assert got == want
    assert engine.compilations["tree"] >= 1 and engine.compilations.get("plain", 0) == 0


@pytest.mark.parametrize("engine", ["tree", "chain"])
def test_greedy_speculation_crosses_dense_len_as_plain_decoding(engine):
    """Measured tree policy (whose greedy chain kind runs the chain engine's causal round) and
    the chain engine alone on the sparse model: their verification decides dense or sparse mode
    per position (``forward(stepwise=True)``), so rounds that straddle dense_len emit plain
    greedy decoding's tokens."""
    cfg = make_cfg(dense_len=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    draft = init_mtp_params(cfg, jax.random.PRNGKey(1))
    prompts = [list(range(5, 45)), list(range(3, 60))]
    want, _ = _decode(DecodeEngine(cfg, max_slots=2, max_len=128, chunk=16), params, prompts,
                      40, [SamplingParams()] * 2)
    kw = dict(max_slots=2, max_len=128, chunk=16)
    spec = (TreeEngine(cfg, draft, tree=(3, 2, 4), **kw) if engine == "tree"
            else SpeculativeEngine(cfg, draft, k=4, **kw))
    got, _ = _decode(spec, params, prompts, 40, [SamplingParams()] * 2)
    assert got == want


def test_a_tree_too_deep_for_exact_sparse_attention_is_refused():
    cfg = make_cfg(dense_len=64)
    with pytest.raises(ValueError, match="inside its local window"):
        TreeEngine(cfg, init_mtp_params(cfg, jax.random.PRNGKey(1)), tree=(9, 1, 9),
                   max_slots=1, max_len=64)


@pytest.mark.parametrize("kw, match", [
    ({"policy": "always"}, "policy must be one of"), ({"rule": "leviathan"}, "rule must be"),
    ({"pending": 0}, "pending must be"), ({"tree": (0, 1, 0)}, "depth must be >= 1"),
    ({"tree": (2, 2, 9)}, "size must be in")])
def test_bad_engine_settings_are_named(kw, match):
    cfg, _, draft = small_models()
    with pytest.raises(ValueError, match=match):
        TreeEngine(cfg, draft, max_slots=1, max_len=32, **kw)


def test_metrics_name_the_tree_and_count_steps_by_kind():
    """``/metrics`` data: the scheduler reports the engine's speculation (tree shape, policy,
    rule, FR-Spec size) and the steps each kind ran, which add up to the engine's steps; the
    Prometheus exposition carries them as ``decode_steps_by_kind``."""
    from cpmjax.serve.metrics import ServerMetrics

    cfg, params, draft = small_models()
    engine = TreeEngine(cfg, draft, tree=(3, 2, 4), max_slots=2, max_len=64,
                        frspec_ids=np.arange(0, cfg.vocab_size, 2))
    _, sched = _decode(engine, params, _prompts(cfg.vocab_size, (3, 5)), 12,
                       [SamplingParams()] * 2)
    spec = sched.metrics()["speculation"]
    assert spec["method"] == "tree" and spec["tree"] == {"depth": 3, "topk": 2, "size": 4}
    assert spec["policy"] == "measured" and spec["rule"] == "coupled"
    assert spec["frspec_size"] == len(range(0, cfg.vocab_size, 2))
    assert set(spec["steps_by_kind"]) == {"tree", "chain3", "chain2", "chain1", "plain"}
    steps = sum(spec["steps_by_kind"].values())  # the scheduler counts a step per busy slot
    assert 0 < steps <= sched.metrics()["decode_steps"] <= 2 * steps
    text = ServerMetrics(sched).exposition()[0].decode()
    for kind, n in spec["steps_by_kind"].items():
        assert f'cpmjax:decode_steps_by_kind_total{{kind="{kind}"}} {float(n)}' in text
    assert DecodeEngine(cfg, max_slots=1, max_len=32).speculation() is None
