"""Per-request error isolation in the scheduler (and its log-probability modes), tested by causing each fault: a failure in one
request's own work fails that request alone, a failed decode step fails that step's requests and
serving goes on, and only an engine that keeps failing is declared unusable."""

import pytest

from cpmjax.serve.engine import DecodeEngine
from cpmjax.serve.sampling import SamplingParams
from cpmjax.serve.scheduler import MAX_CONSECUTIVE_FAILURES, Scheduler

A, B = [5, 6, 7, 8], [40, 41, 42]


@pytest.fixture(scope="module")
def engine(cfg):
    return DecodeEngine(cfg, max_slots=2, max_len=64, chunk=8)


@pytest.fixture(scope="module")
def reference(engine, params):
    sched = Scheduler(engine, params)
    reqs = [sched.submit(p, 12, stop_token_ids=[], ignore_eos=True) for p in (A, B)]
    sched.run_until_done()
    return [r.output for r in reqs]


def run(sched):
    sched.run_until_done()
    assert sched.active == 0 and sched.queue_depth == 0 and sched.error is None


def test_a_failing_client_callback_fails_only_its_request(engine, params, reference):
    def broken(req, tok):
        if tok is not None and len(req.output) == 3:
            raise ConnectionError("client went away badly")

    sched = Scheduler(engine, params)
    a = sched.submit(A, 12, on_token=broken, ignore_eos=True)
    b = sched.submit(B, 12, ignore_eos=True)
    run(sched)
    assert a.finish_reason == "error" and "client went away" in a.error
    assert b.finish_reason == "length" and b.output == reference[1]


def test_a_failing_prefill_fails_only_its_request(engine, params, reference, monkeypatch):
    sched = Scheduler(engine, params)
    real = engine.prefill_chunks

    def prefill(p, tokens, *a):
        if tokens == A:
            raise MemoryError("injected prefill failure")
        return real(p, tokens, *a)

    monkeypatch.setattr(engine, "prefill_chunks", prefill)
    a, b = (sched.submit(p, 12, ignore_eos=True) for p in (A, B))
    run(sched)
    assert a.finish_reason == "error" and "injected prefill failure" in a.error
    assert b.output == reference[1]


def test_a_failing_insert_fails_only_its_request(engine, params, reference, monkeypatch):
    sched = Scheduler(engine, params)
    real = engine.insert

    def insert(p, prefix, state, slot, sampling, **kw):
        if sampling.seed == 7:
            raise TypeError("injected insert failure before any buffer was donated")
        return real(p, prefix, state, slot, sampling, **kw)

    monkeypatch.setattr(engine, "insert", insert)
    b = sched.submit(B, 12, ignore_eos=True)
    sched.step()  # b is decoding when the failing request arrives
    a = sched.submit(A, 12, SamplingParams(seed=7), ignore_eos=True)
    run(sched)
    assert a.finish_reason == "error" and "injected insert failure" in a.error
    assert b.finish_reason == "length" and b.output == reference[1]


def test_a_failed_decode_step_fails_its_requests_and_the_next_ones_run(engine, params,
                                                                       reference, monkeypatch):
    sched = Scheduler(engine, params)
    real, calls = engine.generate, []

    def generate(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected device failure")
        return real(*a, **kw)

    monkeypatch.setattr(engine, "generate", generate)
    first = [sched.submit(p, 12, ignore_eos=True) for p in (A, B)]
    run(sched)
    assert all(r.finish_reason == "error" and "injected device failure" in r.error
               for r in first)
    assert sched.step_failures == 1
    again = [sched.submit(p, 12, ignore_eos=True) for p in (A, B)]
    run(sched)  # the rebuilt decode state gives the same tokens as a fresh engine
    assert [r.output for r in again] == reference


def test_an_engine_that_keeps_failing_is_declared_unusable(engine, params, monkeypatch):
    sched = Scheduler(engine, params)

    def broken(*a, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "generate", broken)
    reqs = [sched.submit(A, 8) for _ in range(MAX_CONSECUTIVE_FAILURES + 2)]
    for _ in range(20):
        if sched.error is not None:
            break
        sched.step()
    assert sched.error is not None and all(r.finish_reason == "error" for r in reqs)
    assert sched.queue_depth == 0 and sched.active == 0
    with pytest.raises(RuntimeError, match="unusable"):
        sched.submit(A, 8)


def test_cancelling_a_queued_request_frees_its_place_at_once(engine, params):
    sched = Scheduler(engine, params, max_queue=2)
    queued = [sched.submit(A, 4) for _ in range(2)]
    queued[0].cancel()
    assert sched.queue_depth == 1 and queued[0].done and queued[0].finish_reason == "cancelled"
    sched.submit(B, 4)  # the freed place takes a new request (no QueueFull)
    run(sched)


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_logprobs_modes(cfg, params, engine, mode):
    """raw: the model's own log-softmax (vLLM's default); processed: the distribution sampled
    from, here a logit bias of +100 that makes token 77 certain."""
    eng = engine if mode == "raw" else DecodeEngine(cfg, max_slots=2, max_len=64, chunk=8,
                                                    logprobs_mode="processed")
    sched = Scheduler(eng, params)
    r = sched.submit(A, 3, SamplingParams(logit_bias=((77, 100.0),)), logprobs=2,
                     ignore_eos=True)
    run(sched)
    assert r.output == [77, 77, 77] and len(r.token_logprobs) == 3
    lps = [lp for lp, _, _ in r.token_logprobs]
    if mode == "processed":
        assert all(lp == pytest.approx(0.0, abs=1e-5) for lp in lps)
    else:
        assert all(lp < -1.0 for lp in lps)  # the model itself does not favour token 77
