"""The HTTP server for real: uvicorn on 127.0.0.1 (free port), httpx clients, the engine thread."""

import asyncio
import json
import time

import httpx
import pytest

from cpmjax.data.tokenizer import train_tokenizer
from cpmjax.serve.server import BackgroundServer, create_app, make_scheduler

TEXT = ["The quick brown fox jumps over the lazy dog. " * 3,
        "Continuous batching lets requests join and leave while others decode.",
        "A prompt is prefilled in chunks, then inserted into a decode slot."] * 20


@pytest.fixture(scope="module")
def server(cfg, params):
    tok = train_tokenizer(TEXT, vocab_size=300)
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
    m = httpx.get(srv.url + "/metrics").json()
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
    ("/v1/completions", b"{not json", 422),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 422),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 422),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 422),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 422),
    ("/v1/completions", {"prompt": "hi", "frobnicate": {"a": 1}}, 422),
    ("/v1/completions", {"prompt": 12}, 422),
    ("/v1/completions", {"prompt": []}, 422),
    ("/v1/completions", {"prompt": [5] * 600}, 400),
    ("/v1/completions", {"prompt": [5] * 10, "max_tokens": 510}, 400),
    ("/v1/completions", {"prompt": [999999]}, 400),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 422),
    ("/v1/chat/completions", {"messages": []}, 422),
]


@pytest.mark.parametrize("path, body, status", BAD)
def test_bad_requests_get_4xx_and_server_survives(server, path, body, status):
    srv, _ = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = httpx.post(srv.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    assert r.json()["detail"]  # a message saying what was wrong
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


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
        m = httpx.get(srv.url + "/metrics").json()
        assert m["speculative_k"] == 2 and 1.0 <= m["mean_accept_length"] <= 3.0
        assert m["decode_steps"] > 0
        r = httpx.post(srv.url + "/v1/completions", timeout=30,
                       json={"prompt": [5], "max_tokens": 4, "repetition_penalty": 1.3})
        assert r.status_code == 400 and "repetition_penalty" in r.json()["detail"]
    finally:
        srv.stop()
        sched.stop()
