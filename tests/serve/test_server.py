"""The HTTP server for real: uvicorn on 127.0.0.1 (free port), httpx clients, the engine thread."""

import asyncio
import concurrent.futures
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from cpmjax.data.tokenizer import train_tokenizer
from cpmjax.serve.server import BackgroundServer, create_app, make_scheduler

TEXT = ["The quick brown fox jumps over the lazy dog. " * 3,
        "Continuous batching lets requests join and leave while others decode.",
        "A prompt is prefilled in chunks, then inserted into a decode slot."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def server(cfg, params, tok):
    sched = make_scheduler(cfg, params, tok, max_slots=2, max_len=512, chunk=32, max_queue=2)
    srv = BackgroundServer(create_app(sched, tok, model_name="tiny"))
    yield srv, sched
    srv.stop()
    sched.stop()


def wait_idle(sched, timeout=30.0):
    deadline = time.monotonic() + timeout
    while (sched.active or sched.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched.active == 0 and sched.queue_depth == 0


def test_health_models_metrics(server):
    srv, _ = server
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "tiny"
    m = httpx.get(srv.url + "/metrics.json").json()
    assert {"queue_depth", "tokens_per_second", "compilations", "active_slots"} <= set(m)


def test_completions_text_and_token_ids(server):
    srv, _ = server
    r = httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"prompt": "The quick brown", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] >= 1
    assert len(body["choices"][0]["token_ids"]) == body["usage"]["completion_tokens"] <= 5
    r2 = httpx.post(srv.url + "/v1/completions", timeout=60,
                    json={"prompt": [1, 40, 41, 42], "max_tokens": 4, "temperature": 0.7,
                          "seed": 3, "top_k": 20})
    r3 = httpx.post(srv.url + "/v1/completions", timeout=60,
                    json={"prompt": [1, 40, 41, 42], "max_tokens": 4, "temperature": 0.7,
                          "seed": 3, "top_k": 20})
    assert r2.json()["choices"][0]["token_ids"] == r3.json()["choices"][0]["token_ids"]


def test_chat_stream_equals_non_stream(server):
    srv, _ = server
    req = {"messages": [{"role": "user", "content": "hello fox"}], "max_tokens": 8,
           "temperature": 0, "enable_thinking": False}
    plain = httpx.post(srv.url + "/v1/chat/completions", json=req, timeout=60).json()
    assert plain["object"] == "chat.completion"
    tokens, text, done = [], "", False
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**req, "stream": True},
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            tokens += chunk["choices"][0]["token_ids"]
            text += chunk["choices"][0]["delta"]["content"]
    assert done and tokens == plain["choices"][0]["token_ids"]
    assert text == plain["choices"][0]["message"]["content"]


BAD = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": 12}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": [5] * 600}, 400),
    ("/v1/completions", {"prompt": [5] * 10, "max_tokens": 510}, 400),
    ("/v1/completions", {"prompt": [999999]}, 400),
    ("/v1/completions", {"prompt": [2**70]}, 400),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    # issue 11: each of these killed the engine thread, gave 500, or was taken as another value
    ("/v1/completions", {"prompt": "abc", "top_k": 2147483648}, 400),
    ("/v1/completions", {"prompt": "abc", "seed": 2**64}, 400),
    ("/v1/completions", {"prompt": "abc", "max_tokens": True}, 400),
    ("/v1/completions", {"prompt": "abc", "n": True}, 400),
    ("/v1/completions", {"prompt": "abc", "temperature": "0.5"}, 400),
    ("/v1/completions", b'{"prompt": "abc", "temperature": NaN}', 400),
    ("/v1/completions", b'{"prompt": "abc", "temperature": Infinity}', 400),
    ("/v1/completions", b'{"prompt": "abc", "top_p": -Infinity}', 400),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udfff"}]}', 400),
    ("/v1/completions", b'{"prompt": "abc", "stop": ["\\ud800"]}', 400),
    ("/v1/completions", b'\xff\xfe{', 400),
    ("/v1/completions", b'[1, 2]', 400),
    ("/v1/completions", b'{"prompt": "a"' + b', "x": [' * 200 + b']' * 200 + b'}', 400),
    ("/v1/completions", {"prompt": "abc", "repetition_penalty": 1e-300}, 400),
    ("/v1/completions", {"prompt": "abc", "suffix": "xyz"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "audio": {"voice": "alloy"}}, 400),
    ("/v1/completions", {"prompt": "abc", "model": "gpt-4"}, 404),
]


@pytest.mark.parametrize("path, body, status", BAD)
def test_bad_requests_get_4xx_and_server_survives(server, path, body, status):
    srv, _ = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = httpx.post(srv.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]  # OpenAI's error body, with a message saying what was wrong
    assert err["message"] and err["type"] == "invalid_request_error"
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


def test_errors_name_the_field_and_the_model(server):
    srv, _ = server
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "abc", "top_k": 2**31})
    assert r.json()["error"]["param"] == "top_k"
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "abc", "max_tokens": True})
    assert r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "abc", "model": "gpt-4"})
    assert r.json()["error"] == {"message": "The model `gpt-4` does not exist.",
                                 "type": "invalid_request_error", "param": "model",
                                 "code": "model_not_found"}
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "abc", "suffix": "x"})
    assert "suffix" in r.json()["error"]["message"]


def test_unknown_fields_are_ignored_as_vllm_does(server, caplog):
    srv, _ = server
    r = httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"prompt": [1, 2], "max_tokens": 2, "frobnicate": {"a": 1}})
    assert r.status_code == 200, r.text
    assert "frobnicate" in caplog.text


def test_the_issue_requests_leave_the_engine_serving(server):
    """issue 11: ``top_k: 2**31`` raised OverflowError in the engine thread and every later
    request got 503; now it is refused and the next request is answered."""
    srv, sched = server
    for bad in ({"prompt": "abc", "top_k": 2147483648}, {"prompt": "abc", "max_tokens": True}):
        assert httpx.post(srv.url + "/v1/completions", json=bad).status_code == 400
    r = httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"prompt": "abc", "max_tokens": 3, "top_k": 10**9, "temperature": 0.5})
    assert r.status_code == 200, r.text  # a top_k above the vocabulary means "off"
    assert sched.error is None and httpx.get(srv.url + "/health").status_code == 200


def test_body_limit_and_a_huge_prompt_do_not_stall_health(server, tok):
    """A 16 MB prompt: 413 from the default limit; with the limit raised, a 400 (it cannot fit
    the context) without tokenizing it. /health answers meanwhile."""
    srv, sched = server
    big = json.dumps({"prompt": "ab cd " * ((16 << 20) // 6)}).encode()
    roomy = BackgroundServer(create_app(sched, tok, model_name="tiny", max_body_bytes=64 << 20))
    try:
        for url, status in ((srv.url, 413), (roomy.url, 400)):
            with concurrent.futures.ThreadPoolExecutor(1) as ex:
                t0 = time.monotonic()
                fut = ex.submit(httpx.post, url + "/v1/completions", content=big, timeout=120,
                                headers={"content-type": "application/json"})
                health = []
                while not fut.done():
                    t = time.monotonic()
                    assert httpx.get(url + "/health", timeout=10).status_code == 200
                    health.append(time.monotonic() - t)
                r = fut.result()
            assert r.status_code == status, r.text[:200]
            assert time.monotonic() - t0 < 20
            assert max(health, default=0) < 2.0, health
    finally:
        roomy.stop()


class SlowTokenizer:
    """The test tokenizer, 1.5 s per encode (sleeping, GIL released, as encode_batch does)."""

    def __init__(self, tok):
        self.tok = tok

    def encode_batch(self, *a, **kw):
        time.sleep(1.5)
        return self.tok.encode_batch(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_tokenization_runs_off_the_event_loop(server, tok):
    srv, sched = server
    slow = BackgroundServer(create_app(sched, SlowTokenizer(tok), model_name="tiny"))
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(httpx.post, slow.url + "/v1/completions", timeout=60,
                            json={"prompt": "The quick brown fox", "max_tokens": 2})
            time.sleep(0.3)
            t = time.monotonic()
            assert httpx.get(slow.url + "/health", timeout=10).status_code == 200
            assert time.monotonic() - t < 0.5  # not behind the 1.5 s tokenization
            assert fut.result().status_code == 200
    finally:
        slow.stop()


def slow_steps(monkeypatch, sched, seconds=0.02):
    """Decode steps that take ``seconds`` each, so requests stay in their slots for a while."""
    real = sched.engine.generate

    def slow(*a, **kw):
        time.sleep(seconds)
        return real(*a, **kw)

    monkeypatch.setattr(sched.engine, "generate", slow)


def test_queued_clients_that_disconnect_release_their_place(server, monkeypatch):
    """issue 11: 4 queued clients hung up and the queue stayed full (new clients got 429)."""
    srv, sched = server
    wait_idle(sched)
    slow_steps(monkeypatch, sched)
    long = {"prompt": [1, 2, 3], "max_tokens": 480, "ignore_eos": True, "stream": True}
    streams = [httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=60)
               for _ in range(2)]
    try:
        lines = [s.__enter__().iter_lines() for s in streams]
        for it in lines:
            next(it)  # both slots are busy now
        assert sched.active == 2, dict(sched.finish_reasons)
        for _ in range(2):  # fill the queue (max_queue=2) with clients that give up after 1 s
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + "/v1/completions", timeout=1.0,
                           json={"prompt": [1, 2], "max_tokens": 4})
        deadline = time.monotonic() + 5
        while sched.queue_depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched.queue_depth == 0 and sched.active == 2
        with concurrent.futures.ThreadPoolExecutor(1) as ex:  # a new client gets a place
            fut = ex.submit(httpx.post, srv.url + "/v1/completions", timeout=60,
                            json={"prompt": [1, 2], "max_tokens": 2})
            time.sleep(0.5)
            for s in streams:
                s.__exit__(None, None, None)
            assert fut.result().status_code == 200
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    wait_idle(sched)


def test_a_failed_decode_step_fails_its_requests_and_serving_goes_on(server, monkeypatch):
    srv, sched = server
    wait_idle(sched)
    real = sched.engine.generate
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected device failure")
        return real(*a, **kw)

    monkeypatch.setattr(sched.engine, "generate", flaky)
    r = httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"prompt": [1, 2, 3], "max_tokens": 20})
    assert r.status_code == 500 and "injected device failure" in r.json()["error"]["message"]
    assert httpx.get(srv.url + "/health").status_code == 200
    r = httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert sched.step_failures >= 1 and sched.error is None


def test_queue_full_answers_429_immediately(server):
    srv, sched = server

    async def flood():
        async with httpx.AsyncClient(timeout=120) as c:
            async def one():
                t = time.monotonic()
                r = await c.post(srv.url + "/v1/completions",
                                 json={"prompt": [1, 2, 3], "max_tokens": 200, "temperature": 0})
                return r.status_code, time.monotonic() - t
            return await asyncio.gather(*[one() for _ in range(10)])

    results = asyncio.run(flood())
    codes = [c for c, _ in results]
    # at least the queue (2) gets in; slots may take 2 more if admitted in time
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    assert max(t for c, t in results if c == 429) < min(t for c, t in results if c == 200)
    wait_idle(sched)
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


def test_client_disconnect_frees_the_slot(server):
    srv, sched = server
    wait_idle(sched)
    before = sched.finish_reasons["cancelled"]
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                      json={"prompt": [1, 2, 3], "max_tokens": 500, "temperature": 0,
                            "stream": True}) as r:
        next(r.iter_lines())  # the first token arrived: the request holds a slot
        assert sched.active == 1
    wait_idle(sched)
    assert sched.finish_reasons["cancelled"] == before + 1, (dict(sched.finish_reasons), sched.tokens_generated, sched.error)


def test_speculative_server_is_lossless_and_reports_acceptance(cfg, params):
    """A server with an EAGLE draft (k=2) answers greedy completions exactly as plain generation
    does, reports the mean accept length on /metrics, and refuses what it cannot honour (400)."""
    import jax

    from cpmjax.model.mtp import init_mtp_params
    from cpmjax.serve.generate import Speculative, generate

    draft = init_mtp_params(cfg, jax.random.key(1))
    sched = make_scheduler(cfg, params, None, max_slots=2, max_len=128, chunk=16,
                           speculative=Speculative(draft, k=2))
    srv = BackgroundServer(create_app(sched, None, model_name="tiny"))
    try:
        prompts = [[5, 6, 7, 8], [40, 41]]
        want = generate(cfg, params, prompts, max_new_tokens=10)
        for p, w in zip(prompts, want):
            r = httpx.post(srv.url + "/v1/completions", timeout=120,
                           json={"prompt": p, "max_tokens": 10, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == w
        m = httpx.get(srv.url + "/metrics.json").json()
        assert m["speculative_k"] == 2 and 1.0 <= m["mean_accept_length"] <= 3.0
        assert m["decode_steps"] > 0
        r = httpx.post(srv.url + "/v1/completions", timeout=30,
                       json={"prompt": [5], "max_tokens": 4, "repetition_penalty": 1.3})
        assert r.status_code == 400 and "repetition_penalty" in r.json()["error"]["message"]
    finally:
        srv.stop()
        sched.stop()


_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 8),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["\ud800", "a\udfff", "", "gpt-4", "tiny", "json_object"]))
_JSON = st.recursive(_SCALAR, lambda c: st.lists(c, max_size=3)
                     | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=6)
# Valid values of each field (bounded so that valid requests finish quickly) ...
_VALID = {
    "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 400), "repetition_penalty": st.floats(0.5, 2),
    "seed": st.integers(-(2**63), 2**64 - 1), "stop": st.one_of(
        st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stream": st.booleans(), "user": st.text(max_size=10), "model": st.just("tiny"),
    "ignore_eos": st.booleans(), "stream_options": st.just({"include_usage": True}),
    "unknown_field": _JSON, "n": st.integers(1, 3), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 299).map(str), st.floats(-100, 100),
                                  max_size=3),
}
_COMPLETION = {"prompt": st.one_of(st.text(min_size=1, max_size=40),
                                   st.lists(st.integers(3, 299), min_size=1, max_size=8)),
               "logprobs": st.integers(0, 5), "echo": st.booleans(), **_VALID}
_CHAT = {"messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer"]),
     "content": st.text(max_size=20)}), min_size=1, max_size=3),
    "max_completion_tokens": st.integers(1, 4), "enable_thinking": st.booleans(),
    "logprobs": st.just(True), "top_logprobs": st.integers(0, 5),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "integer"}}}]),
    "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}]),
    "tool_choice": st.sampled_from(["auto", "none", "required"]), **_VALID}
_NAMES = sorted({*_COMPLETION, *_CHAT, "n", "logprobs", "logit_bias", "echo", "suffix",
                 "response_format", "tools", "tool_choice", "presence_penalty",
                 "frequency_penalty", "stop_token_ids", "max_tokens"})


@st.composite
def _request(draw):
    """A body of valid fields (a random subset), then some fields replaced by arbitrary JSON
    (wrong types, NaN, huge numbers, lone surrogates, nesting): valid and invalid requests."""
    chat = draw(st.booleans())
    fields = _CHAT if chat else _COMPLETION
    required = "messages" if chat else "prompt"
    body = {required: draw(fields[required])}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True)):
        body[name] = draw(fields[name])
    if chat and "max_completion_tokens" not in body:
        body.setdefault("max_tokens", draw(st.integers(1, 4)))
    for name in draw(st.lists(st.sampled_from(_NAMES), max_size=2, unique=True)):
        body[name] = draw(_JSON)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


_REQUEST = _request()


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(request=_REQUEST)
def test_property_no_body_gives_5xx_or_hurts_the_engine(server, request):
    """Generated JSON bodies, valid and invalid: never a 5xx, /health stays 200, and every slot
    and queue place is free again afterwards."""
    srv, sched = server
    path, body = request
    data = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity and lone surrogates included
    with httpx.stream("POST", srv.url + path, content=data, timeout=120,
                      headers={"content-type": "application/json"}) as r:
        text = "".join(r.iter_text())
    event(f"{path} {r.status_code}")
    assert r.status_code in (200, 400, 404, 429), (r.status_code, text[:300], body)
    if r.status_code != 200:
        assert json.loads(text)["error"]["message"]
    assert httpx.get(srv.url + "/health").status_code == 200
    wait_idle(sched)
    assert sched.error is None and sched._prefilling is None


def test_prometheus_metrics(server):
    srv, _ = server
    httpx.post(srv.url + "/v1/completions", json={"prompt": "abc", "max_tokens": True})
    assert httpx.post(srv.url + "/v1/completions", timeout=60,
                      json={"prompt": [1, 2, 3], "max_tokens": 3}).status_code == 200
    r = httpx.get(srv.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("cpmjax:time_to_first_token_seconds_bucket", "cpmjax:inter_token_latency_seconds",
                 "cpmjax:e2e_request_latency_seconds_count", "cpmjax:request_queue_time_seconds",
                 "cpmjax:num_requests_running", "cpmjax:num_requests_waiting",
                 "cpmjax:kv_slots_used_ratio", "cpmjax:generation_tokens_per_second",
                 "cpmjax:mean_accept_length", 'cpmjax:compilations_total{function="generate"}',
                 'outcome="rejected_4xx"', 'outcome="length"'):
        assert name in text, name
