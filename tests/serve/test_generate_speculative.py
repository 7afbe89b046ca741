"""Speculative decoding through the serving path (``SpeculativeEngine`` under the scheduler, and
``Model.generate(speculative=...)``): lossless with continuous batching, stops inside an accepted
chain, bounded compilations, and clear refusals."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import cpmjax
from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.model.mtp import init_mtp_params
from cpmjax.serve.engine import DecodeEngine
from cpmjax.serve.generate import Speculative
from cpmjax.serve.sampling import SamplingParams
from cpmjax.serve.scheduler import Scheduler
from cpmjax.serve.spec_engine import SpeculativeEngine
from tests.conftest import tiny_hf_config

PROMPTS = [[5], [11, 12, 13, 14, 15], list(range(60, 83)), [7, 3] * 20, [9, 9, 9]]
NEW = [3, 14, 6, 12, 9]


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.from_hf_config(tiny_hf_config(eos_token_id=[2]))
    params = init_params(cfg, jax.random.key(0))
    draft = init_mtp_params(cfg, jax.random.key(1))
    return cfg, params, draft


def _run(engine, params, prompts=PROMPTS, new=NEW, **submit):
    sched = Scheduler(engine, params)
    reqs = [sched.submit(p, n, **submit) for p, n in zip(prompts, new)]
    joined_late = False
    while sched.step() or sched.queue_depth:
        joined_late |= reqs[-1].output != [] and reqs[0].done
    assert joined_late, "the last request must join while others decode"
    return sched, reqs


def test_engine_with_joins_equals_plain_greedy_and_compiles_once(setup):
    """2 slots, 5 requests of different lengths and budgets joining as others leave: every output
    equals the plain engine's greedy output, and the decode step compiled once."""
    cfg, params, draft = setup
    plain = DecodeEngine(cfg, max_slots=2, max_len=96, chunk=8)
    _, want = _run(plain, params, stop_token_ids=[])
    for k in (1, 3):
        spec = SpeculativeEngine(cfg, draft, k=k, max_slots=2, max_len=96, chunk=8)
        sched, got = _run(spec, params, stop_token_ids=[])
        for w, g in zip(want, got):
            assert g.output == w.output and g.finish_reason == w.finish_reason
        assert spec.compilations["generate_greedy"] == 1 and spec.compilations["prefill"] == 1
        assert spec.compilations["generate"] == 0  # all greedy: the sampling round never ran
        m = sched.metrics()
        assert m["speculative_k"] == k and 1.0 <= m["mean_accept_length"] <= k + 1
        assert m["decode_steps"] == sum(r.decode_steps for r in got)


def test_rounds_read_only_the_cache_span_in_use(setup):
    """With 16-position span buckets the round's target and draft attention read 16..64 of 96
    cache positions (the span covers the k positions a round writes past the longest row) and
    the outputs still equal plain greedy decoding."""
    cfg, params, draft = setup
    _, want = _run(DecodeEngine(cfg, max_slots=2, max_len=96, chunk=8), params, stop_token_ids=[])
    spec = SpeculativeEngine(cfg, draft, k=3, max_slots=2, max_len=96, chunk=8, kv_bucket=16)
    assert [spec.kv_span(c) for c in (13, 14, 30, 94)] == [16, 32, 64, 96]
    _, got = _run(spec, params, stop_token_ids=[])
    assert [g.output for g in got] == [w.output for w in want]
    assert spec.compilations["generate_greedy"] == 3


def test_a_stop_token_inside_an_accepted_chain_ends_the_request_there(setup):
    """A step can produce tokens past a stop token; the scheduler emits up to the stop token and
    drops the rest, so the outputs equal plain decoding with the same stop."""
    cfg, params, draft = setup
    plain = DecodeEngine(cfg, max_slots=2, max_len=96, chunk=8)
    _, base = _run(plain, params, stop_token_ids=[])
    stop = base[1].output[5]  # a token the second request produces mid-stream
    _, want = _run(plain, params, stop_token_ids=[stop])
    spec = SpeculativeEngine(cfg, draft, k=3, max_slots=2, max_len=96, chunk=8)
    _, got = _run(spec, params, stop_token_ids=[stop])
    assert [r.output for r in got] == [r.output for r in want]
    assert got[1].output[-1] == stop and got[1].finish_reason == "stop"


def test_sampling_settings_per_slot(setup):
    """top_k=1 at temperature 1 is greedy whatever the seed (the target distribution is one-hot
    after top-k), mixed in one batch with a greedy row and a sampled row."""
    cfg, params, draft = setup
    spec = SpeculativeEngine(cfg, draft, k=2, max_slots=3, max_len=96, chunk=8)
    sched = Scheduler(spec, params)
    greedy = sched.submit(PROMPTS[1], 10, stop_token_ids=[])
    top1 = sched.submit(PROMPTS[1], 10, SamplingParams(1.0, top_k=1, seed=7), stop_token_ids=[])
    hot = sched.submit(PROMPTS[1], 10, SamplingParams(5.0, seed=3), stop_token_ids=[])
    sched.run_until_done()
    assert top1.output == greedy.output
    assert hot.output != greedy.output  # T=5 over a 97-token vocabulary: a greedy copy is ~impossible


def test_generate_speculative_equals_plain_generate(setup):
    cfg, params, draft = setup
    model = cpmjax.Model(cfg, params)
    prompts = [[1, 7, 9, 11], [1, 30, 31], [1, 4, 50, 60, 70, 80]]
    plain = model.generate(prompts, max_new_tokens=12)
    spec = model.generate(prompts, max_new_tokens=12, speculative=Speculative(draft, k=3))
    assert spec == plain
    ids = np.arange(0, cfg.vocab_size, 3)  # FR-Spec subset: verification keeps the full vocab
    assert model.generate(prompts, max_new_tokens=12,
                          speculative=Speculative(draft, k=2, frspec_ids=ids)) == plain


def test_speculative_refuses_what_it_cannot_honour(setup):
    cfg, params, draft = setup
    model = cpmjax.Model(cfg, params)
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate([[1, 2]], max_new_tokens=4, speculative=Speculative(draft),
                       repetition_penalty=1.2)
    with pytest.raises(TypeError, match="Speculative"):
        model.generate([[1, 2]], max_new_tokens=4, speculative={"k": 3})
    with pytest.raises(ValueError, match="draft length k"):
        SpeculativeEngine(cfg, draft, k=0)
    with pytest.raises(ValueError, match="frspec_ids.*vocabulary"):
        SpeculativeEngine(cfg, draft, frspec_ids=[0, 1, cfg.vocab_size + 5])
