"""Engine and scheduler: cached decoding equals full recomputation, bounded compilations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.model import forward
from cpmjax.serve.engine import DecodeEngine
from cpmjax.serve.generate import generate
from cpmjax.serve.sampling import SamplingParams
from cpmjax.serve.scheduler import QueueFull, Scheduler

PAD = 96  # the naive oracle recomputes a [1, PAD] window every token


def naive_greedy(cfg, params, prompt, n):
    """Argmax decoding with no cache: the full sequence through ``forward`` for every token."""
    @functools.partial(jax.jit)
    def last_logits(p, toks, idx):
        return forward(p, cfg, toks).logits[0, idx]

    seq = list(prompt)
    for _ in range(n):
        toks = np.zeros((1, PAD), np.int32)
        toks[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(last_logits(params, toks, len(seq) - 1))))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def engine(cfg):
    return DecodeEngine(cfg, max_slots=2, max_len=128, chunk=8)


PROMPTS = [[5], [11, 12, 13, 14, 15], list(range(100, 123)), [7, 3] * 20]
NEW = [3, 9, 5, 12]


def test_greedy_equals_full_recompute_with_joins_and_leaves(cfg, params, engine):
    # 4 requests, 2 slots, different lengths and budgets: requests join as others leave.
    sched = Scheduler(engine, params)
    reqs = [sched.submit(p, n, stop_token_ids=[]) for p, n in zip(PROMPTS, NEW)]
    sched.submit([1, 2, 3], 4)  # occupies a slot then leaves; must not disturb the others
    joined_late = False
    while sched.step():
        joined_late |= reqs[3].output != [] and reqs[0].done
    assert joined_late
    for p, n, r in zip(PROMPTS, NEW, reqs):
        want = naive_greedy(cfg, params, p, n)
        assert len(set(want)) > 1, "oracle output is degenerate; the comparison would be weak"
        assert r.output == want and r.finish_reason == "length"


def test_chunked_prefill_equals_unchunked(cfg, params):
    prompt = list(range(200, 237))  # 37 tokens: 5 chunks of 8 with a padded tail
    small = DecodeEngine(cfg, max_slots=1, max_len=64, chunk=8).prefill(params, prompt)
    whole = DecodeEngine(cfg, max_slots=1, max_len=64, chunk=64).prefill(params, prompt)
    # Different chunk shapes sum in a different order (float32 round-off, amplified by the x3
    # weights). Yardstick: the model's own no-cache forward differs from the unchunked prefill by
    # the same ~2e-5; chunking must not add more than that.
    ref = jax.jit(lambda p, t: forward(p, cfg, t).logits)(params, np.array([prompt]))[0, -1]
    yardstick = float(np.abs(whole.logits - ref).max())
    assert float(np.abs(small.logits - whole.logits).max()) <= 2 * yardstick + 1e-6
    assert int(np.argmax(small.logits)) == int(np.argmax(whole.logits))
    for k in ("k", "v"):
        for layer in range(cfg.num_hidden_layers):
            got, want = small.cache[k][layer, :, :37], whole.cache[k][layer, :, :37]
            scale = float(np.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=0, atol=5e-5 * scale)
        assert not np.any(small.cache[k][:, :, 37:])  # padding positions were not written
    assert np.array_equal(np.flatnonzero(small.seen), sorted(set(prompt)))


def test_compilations_stay_fixed_across_many_requests(cfg, params, engine):
    rng = np.random.default_rng(0)
    sched = Scheduler(engine, params)
    for i in range(12):
        n = int(rng.integers(1, 60))
        sched.submit(rng.integers(3, cfg.vocab_size, n).tolist(), int(rng.integers(1, 6)),
                     SamplingParams(temperature=float(i % 2), top_k=i, seed=i))
    sched.run_until_done()
    assert sched.requests_finished == 12
    assert dict(engine.compilations) == {"prefill": 1, "insert": 1, "generate": 1, "release": 1}


def test_decode_reads_only_the_cache_span_in_use(cfg, params, engine):
    # kv_bucket=16 in a 128-token engine: decode steps read 16, 32 or 64 cache positions as the
    # longest slot grows, prefill chunks as much as the prompt so far needs, one compilation per
    # span, and every output equals the whole-cache engine's.
    spans = DecodeEngine(cfg, max_slots=2, max_len=128, chunk=8, kv_bucket=16)
    assert [spans.kv_span(c) for c in (None, 1, 16, 17, 33, 64, 65, 500)] == \
        [128, 16, 16, 32, 64, 64, 128, 128]
    assert DecodeEngine(cfg, max_len=128, kv_bucket=None).kv_span(5) == 128
    outputs = []
    for eng in (engine, spans):
        sched = Scheduler(eng, params)
        reqs = [sched.submit(p, n, stop_token_ids=[]) for p, n in zip(PROMPTS, NEW)]
        sched.run_until_done()
        outputs.append([r.output for r in reqs])
    assert outputs[0] == outputs[1]
    assert spans.compilations["generate"] == 3  # spans 16, 32, 64 (the longest row ends at 52)
    assert spans.compilations["prefill"] == 3  # chunks ending by 16, 32 and 40 positions
    with pytest.raises(ValueError, match="kv_bucket"):
        DecodeEngine(cfg, max_len=128, kv_bucket=0)


def test_seeded_sampling_does_not_depend_on_batch_companions(cfg, params, engine):
    sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=7)
    alone = Scheduler(engine, params)
    a = alone.submit([9, 8, 7], 10, sp, stop_token_ids=[])
    alone.run_until_done()
    crowd = Scheduler(engine, params)
    crowd.submit([4] * 30, 6, SamplingParams(temperature=1.0, seed=1), stop_token_ids=[])
    b = crowd.submit([9, 8, 7], 10, sp, stop_token_ids=[])
    crowd.run_until_done()
    assert a.output == b.output
    other = Scheduler(engine, params)
    c = other.submit([9, 8, 7], 10, SamplingParams(0.9, 40, 0.95, 1.2, seed=8), stop_token_ids=[])
    other.run_until_done()
    assert c.output != a.output


def test_stop_token_and_stop_string(cfg, params, engine):
    ref = naive_greedy(cfg, params, [11, 12, 13], 6)
    sched = Scheduler(engine, params, detokenize=lambda ids: "".join(f"<{t}>" for t in ids))
    by_id = sched.submit([11, 12, 13], 20, stop_token_ids=[ref[2]])
    by_text = sched.submit([11, 12, 13], 20, stop=[f"<{ref[3]}>"], stop_token_ids=[])
    sched.run_until_done()
    first = ref.index(ref[2])
    assert by_id.output == ref[:first + 1] and by_id.finish_reason == "stop"
    cut = ref.index(ref[3])
    assert by_text.output == ref[:cut + 1] and by_text.finish_reason == "stop"
    assert by_text.text == "".join(f"<{t}>" for t in ref[:cut])


def test_cancel_frees_slot_and_queue_limit(cfg, params, engine):
    sched = Scheduler(engine, params, max_queue=2)
    long_req = sched.submit([1, 2, 3], 100, stop_token_ids=[])
    queued = sched.submit([4, 5], 100, stop_token_ids=[])
    with pytest.raises(QueueFull):
        sched.submit([6], 5)
    sched.step()
    assert sched.active == 2
    long_req.cancel()
    sched.step()
    assert long_req.finish_reason == "cancelled" and sched.active == 1
    assert sched.slots.count(None) == 1
    queued.cancel()
    sched.step()
    assert sched.active == 0 and list(long_req)[:1] == long_req.output[:1]


@pytest.mark.parametrize("bad, match", [([], "at least one"), ([10**6], "outside the vocabulary"),
                                        (list(range(3, 131)), "does not fit")])
def test_bad_prompts_are_refused(params, engine, bad, match):
    with pytest.raises(ValueError, match=match):
        Scheduler(engine, params).submit(bad, 4)


def test_generate_api_matches_oracle(cfg, params):
    out = generate(cfg, params, [PROMPTS[1], PROMPTS[2]], max_new_tokens=6, stop_token_ids=[])
    assert out == [naive_greedy(cfg, params, PROMPTS[1], 6), naive_greedy(cfg, params, PROMPTS[2], 6)]


def test_long_prefill_interleaves_with_running_decode(cfg, params, engine):
    # While a 40-token prompt is prefilled (5 chunks of 8), the running request gets a token after
    # every chunk instead of waiting for the whole prefill; both outputs stay exact.
    events = []
    sched = Scheduler(engine, params)
    running = sched.submit([11, 12, 13], 12, stop_token_ids=[],
                           on_token=lambda r, t: events.append(("running", t)))
    sched.step()
    long_prompt = [7, 3] * 20
    late = sched.submit(long_prompt, 4, stop_token_ids=[],
                        on_token=lambda r, t: events.append(("long", t)))
    events.append(("submitted", None))
    sched.run_until_done()
    start, first_long = events.index(("submitted", None)), events.index(("long", late.output[0]))
    between = [e for e in events[start:first_long] if e[0] == "running"]
    assert len(between) >= 4  # one decode step per non-final chunk
    assert running.output == naive_greedy(cfg, params, [11, 12, 13], 12)
    assert late.output == naive_greedy(cfg, params, long_prompt, 4)


def test_quantized_params_decode_through_the_engine(cfg, params):
    """int4 RTN params run in the engine (layers dequantized on the fly) and give the greedy
    output of the quantized model recomputed in full; plain and speculative decoding agree."""
    from cpmjax.model.mtp import init_mtp_params
    from cpmjax.quant import qforward, quantize_params
    from cpmjax.quant.qforward import quantize_draft
    from cpmjax.serve.generate import Speculative

    qparams = quantize_params(cfg, params, "rtn", bits=4)
    prompt, n = [11, 12, 13, 14, 15], 8
    seq = list(prompt)
    step = jax.jit(lambda p, t: qforward(p, cfg, t).logits[0])
    for _ in range(n):
        toks = np.zeros((1, 32), np.int32)
        toks[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(step(qparams, toks)[len(seq) - 1])))
    want = seq[len(prompt):]
    assert generate(cfg, qparams, [prompt], n, stop_token_ids=[]) == [want]
    assert want != generate(cfg, params, [prompt], n, stop_token_ids=[])[0], \
        "int4 output equals fp output: the comparison cannot tell the paths apart"
    draft = quantize_draft(cfg, init_mtp_params(cfg, jax.random.key(1)))
    assert generate(cfg, qparams, [prompt], n, stop_token_ids=[],
                    speculative=Speculative(draft, k=2)) == [want]
