"""Chunk-wise rollout on the serving engine: continuing by re-prefill equals uninterrupted
decoding, every token carries its behaviour log-probability and policy version, and a parameter
swap recompiles nothing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cpmjax.config import ModelConfig
from cpmjax.model import init_params
from cpmjax.rl.buffer import RolloutState
from cpmjax.rl.loss import target_logprobs
from cpmjax.rl.rollout import ChunkedRollout, RolloutSettings
from cpmjax.serve.engine import DecodeEngine
from cpmjax.serve.sampling import SamplingParams
from cpmjax.serve.scheduler import Scheduler
from tests.conftest import tiny_hf_config
from tests.rl.helpers import EvenTokens

CFG = ModelConfig.from_hf_config(tiny_hf_config(num_hidden_layers=2))


def _params(seed: int):
    # x3 on "standard" init: a random tiny model would otherwise repeat one token forever
    p = init_params(CFG, jax.random.key(seed), parametrization="standard")
    return jax.tree.map(lambda x: x * 3, p)


@pytest.fixture(scope="module")
def engine():
    return DecodeEngine(CFG, max_slots=8, max_len=64, chunk=16, logprobs_mode="processed")


def test_continuing_by_prefill_equals_uninterrupted_decoding(engine):
    """What chunk-wise rollout relies on: stopping at a budget and continuing from the tokens
    (a fresh prefill) gives the tokens decoding would have given without stopping."""
    params = _params(0)
    sched = Scheduler(engine, params)
    prompts = [[7, 8, 9], [20, 21, 22, 23, 24, 25]]
    whole = [sched.submit(p, 12, ignore_eos=True) for p in prompts]
    sched.run_until_done()
    for p, w in zip(prompts, whole):
        out = []
        for budget in (5, 4, 3):
            r = sched.submit(p + out, budget, ignore_eos=True)
            sched.run_until_done()
            out += r.output
        assert out == w.output and len(set(out)) > 1


TEMPERATURE = 0.7


def _rollout(engine, params, **kw) -> ChunkedRollout:
    settings = RolloutSettings(group_size=2, rollout_batch=6, chunk_tokens=3, max_response=8,
                               stop_token_ids=(2, 5), temperature=TEMPERATURE, overlong="none",
                               seed=1, **kw)
    return ChunkedRollout(engine, params, EvenTokens(CFG.vocab_size, 16, 4, 0), settings)


def test_rounds_record_versions_and_behaviour_logprobs(engine):
    params = _params(0)
    ro = _rollout(engine, params)
    state = RolloutState()
    first = ro.generate(state)
    assert first["requests"] == 6 and len(state.in_flight) + len(state.ready) == 3
    state.version = 1  # as after an update
    ro.generate(state)
    trajs = [m for g in state.in_flight + state.ready for m in g.members]
    assert any(0 in m.versions and 1 in m.versions for m in trajs)  # chunks of two versions
    for m in trajs:
        assert len(m.response) == len(m.logprobs) == len(m.versions) <= 8
        assert m.versions == sorted(m.versions)
        if m.done:
            assert m.finish == ("stop" if m.response[-1] in (2, 5) else "length")
    # the engine's log-probs (cached decode, chunk by chunk, re-prefilled) are the policy's at
    # the sampling temperature: the training forward over the whole trajectory
    for m in sorted(trajs, key=lambda m: -len(m.response))[:3]:
        toks = np.asarray([m.prompt + m.response], np.int32)
        n = toks.shape[1] - 1
        batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
                 "positions": np.arange(n, dtype=np.int32)[None],
                 "segment_ids": np.ones((1, n), np.int32)}
        want = np.asarray(target_logprobs(params, CFG, batch, TEMPERATURE)[0])[0]
        np.testing.assert_allclose(m.logprobs, want[len(m.prompt) - 1:], atol=2e-4)
    assert state.counters["generated_tokens"] == sum(len(t.response) for t in trajs)


def test_parameter_swap_recompiles_nothing(engine):
    ro = _rollout(engine, _params(0))
    a = RolloutState()
    ro.generate(a)
    compiled = dict(engine.compilations)
    ro.set_params(_params(1))
    b = RolloutState()
    ro.generate(b)
    assert dict(engine.compilations) == compiled
    responses = lambda s: [m.response for g in s.in_flight + s.ready for m in g.members]
    assert responses(a) != responses(b)  # the new weights were used


def test_new_groups_fill_the_batch_behind_unfinished_ones(engine):
    ro = _rollout(engine, _params(0))
    state = RolloutState()
    ro.generate(state)
    carried = len(state.unfinished())
    ro.generate(state)
    assert state.prompts_drawn == 3 + (6 - carried) // 2
