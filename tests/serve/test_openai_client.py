"""The official ``openai`` client against the server (uvicorn on 127.0.0.1): each API feature as a
client calls it, with results checked against the model itself (log-probabilities against a full
forward pass, constrained JSON against its schema, forced tool calls against the function's)."""

import json

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import openai
import pytest

from cpmjax.data.tokenizer import train_tokenizer
from cpmjax.model import forward
from cpmjax.serve.chat import apply_chat_template
from cpmjax.serve.server import BackgroundServer, create_app, make_scheduler

TEXT = ["The quick brown fox jumps over the lazy dog. " * 3, '{"name": "fox", "age": 3}',
        "Weather in Paris: 21 degrees, sunny. 你好世界"] * 20


@pytest.fixture(scope="module")
def tok():
    # the tool-use system prompt is part of the training text, so prompts with tools stay short
    tools = apply_chat_template([{"role": "user", "content": "x"}], tools=[WEATHER, TIME])
    return train_tokenizer(TEXT + [tools] * 20, vocab_size=600)


@pytest.fixture(scope="module")
def served(cfg, params, tok):
    sched = make_scheduler(cfg, params, tok, max_slots=4, max_len=1024, chunk=128,
                           max_queue=16)
    srv = BackgroundServer(create_app(sched, tok, model_name="tiny"))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
    yield client, sched
    srv.stop()
    sched.stop()


def raw_logprobs(cfg, params, ids):
    """log_softmax of the model's logits at every position of ``ids`` (no cache)."""
    logits = forward(params, cfg, jnp.asarray([ids], jnp.int32)).logits[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))


def test_models_and_unknown_model(served):
    client, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


def test_unsupported_fields_are_refused_by_name(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="tiny", prompt="hi", suffix="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="audio"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       audio={"voice": "alloy", "format": "wav"}, max_tokens=1)


def test_completions_n_seed_stop_and_usage(served, monkeypatch):
    client, sched = served
    prefills = []
    real = sched.engine.prefill_chunks
    monkeypatch.setattr(sched.engine, "prefill_chunks",
                        lambda *a: prefills.append(1) or real(*a))
    kw = dict(model="tiny", prompt="The quick brown", max_tokens=8, temperature=1.0, seed=5,
              n=3, user="u1")
    a = client.completions.create(**kw)
    assert len(prefills) == 1  # n choices share one prefill
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    ids = [c.model_extra["token_ids"] for c in a.choices]
    assert len({tuple(i) for i in ids}) > 1  # independent samples
    b = client.completions.create(**kw)
    assert ids == [c.model_extra["token_ids"] for c in b.choices]  # the seed reproduces
    assert a.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in a.choices)
    # the tiny model's 4096 ids outnumber this tokenizer's 600: bias sampling towards text
    kw = dict(model="tiny", prompt="The quick brown", max_tokens=16, temperature=1.0, seed=9,
              extra_body={"ignore_eos": True}, logit_bias={str(i): 30 for i in range(40, 120)})
    text = client.completions.create(**kw).choices[0].text
    assert len(text) >= 6, text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(**kw, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logit_bias_and_penalties(served, tok):
    client, _ = served
    kw = dict(model="tiny", prompt="The quick brown", max_tokens=6, temperature=0)
    plain = client.completions.create(**kw).choices[0].model_extra["token_ids"]
    forced = client.completions.create(**kw, logit_bias={"77": 100}).choices[0]
    assert forced.model_extra["token_ids"] == [77] * 6
    banned = client.completions.create(**kw, logit_bias={str(plain[0]): -100}).choices[0]
    assert banned.model_extra["token_ids"][0] != plain[0]
    # with +20 on token 77 greedy decoding falls into repeating one token; a frequency penalty
    # of 2 per occurrence (plus a presence penalty of 1) breaks the repetition
    kw = dict(model="tiny", prompt=[5, 5, 5], max_tokens=24, temperature=0,
              logit_bias={"77": 20}, extra_body={"ignore_eos": True})
    rep = client.completions.create(**kw).choices[0].model_extra["token_ids"]
    pen = client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=1.0
                                    ).choices[0].model_extra["token_ids"]
    top = max(rep.count(t) for t in rep)
    assert top >= 12, rep
    assert max(pen.count(t) for t in pen) < top / 2, pen


def test_stream_with_usage_chunk(served):
    client, _ = served
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello fox"}], max_tokens=6,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    plain = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello fox"}], max_tokens=6,
        temperature=0)
    assert text == plain.choices[0].message.content


def test_completion_logprobs_with_echo_are_the_models_own(served, cfg, params):
    """What lm-eval's loglikelihood reads: echo + logprobs gives every prompt token's
    log-probability (the first: None), equal to the model's log-softmax from a full forward."""
    client, _ = served
    prompt = [1, 40, 41, 42, 43, 44]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, logprobs=3,
                                  echo=True, temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(prompt) + 1
    gen = r.choices[0].model_extra["token_ids"][0]
    ref = raw_logprobs(cfg, params, prompt + [gen])
    want = [ref[i - 1, t] for i, t in enumerate(prompt + [gen]) if i > 0]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=2e-4)
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])
    # greedy: the generated token is the top alternative, with the same value
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())


def test_chat_logprobs_tokens_bytes_and_alternatives(served, cfg, params, tok):
    client, _ = served
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_completion_tokens=5, logprobs=True, top_logprobs=2, temperature=0)
    content = r.choices[0].logprobs.content
    ids = r.choices[0].model_extra["token_ids"]
    assert len(content) == len(ids)
    from cpmjax.data.tokenizer import encode
    prompt = encode(tok, apply_chat_template([{"role": "user", "content": "Weather in Paris?"}]))
    ref = raw_logprobs(cfg, params, prompt + ids)
    for j, (entry, t) in enumerate(zip(content, ids)):
        assert entry.logprob == pytest.approx(ref[len(prompt) - 1 + j, t], abs=2e-4)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert content[0].logprob == content[0].top_logprobs[0].logprob  # greedy


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog", "fox"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "size": {"type": "number"},
        "owner": {"type": "object", "properties": {"id": {"type": "integer"},
                                                   "ok": {"type": "boolean"}},
                  "required": ["id"]}},
     "required": ["kind", "owner"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_output_always_validates(served, schema):
    client, _ = served
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Give JSON."}], max_tokens=160,
        temperature=1.0, seed=3, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), schema)


def test_json_object_output_parses(served, tok):
    client, _ = served
    # a random model rarely closes an unbounded string: nudge it towards '"' and '}' (the
    # grammar still decides what is allowed)
    bias = {str(tok.token_to_id(c)): 10.0 for c in ('"', "}")}
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "JSON please"}], max_tokens=300,
        temperature=1.0, seed=1, n=2, response_format={"type": "json_object"}, logit_bias=bias)
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        assert isinstance(json.loads(c.message.content), dict)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Lyon"]}, "days": {"type": "integer", "maxDigits": 2},
        "metric": {"type": "boolean"}}, "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time now.",
                                         "parameters": {"type": "object", "properties": {}}}}


def test_forced_tool_calls_follow_the_schema(served):
    client, _ = served
    msgs = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
    r = client.chat.completions.create(
        model="tiny", messages=msgs, tools=[WEATHER, TIME], max_tokens=80, temperature=1.0,
        seed=2, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    req = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, TIME],
                                         max_tokens=80, tool_choice="required", seed=4)
    assert req.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    # the call and the tool's answer go back into the conversation
    follow = msgs + [c.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"t": 21}'}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER],
                                        max_tokens=4, tool_choice="none")
    assert r2.choices[0].message.tool_calls is None


def test_forced_tool_call_streams_as_tool_call_deltas(served):
    client, _ = served
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
        max_tokens=80, seed=2, stream=True, tool_choice="required"))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks).strip()


def test_bad_tool_choice_is_a_400(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}}, max_tokens=2)
