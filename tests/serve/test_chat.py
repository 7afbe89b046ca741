"""The chat template against the official one: OpenBMB/MiniCPM's tool-capable template
(``demo/minicpm3/function_call/minicpm_chat_template_with_tool.jinja`` at commit 0fcc3d08, kept as
``fixtures/minicpm_chat_template_with_tool.jinja``; MiniCPM4's MCP demo renders and parses this
format) rendered with jinja2 as transformers renders chat templates, compared byte for byte; and
``transformers.AutoTokenizer.apply_chat_template`` on an exported tokenizer folder."""

import json
from pathlib import Path

import pytest

from cpmjax.data.tokenizer import save_tokenizer, train_tokenizer
from cpmjax.serve.chat import EMPTY_THINK, apply_chat_template, compile_template

OFFICIAL = compile_template((Path(__file__).parent / "fixtures" /
                             "minicpm_chat_template_with_tool.jinja").read_text())
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "city name"},
            "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
            "days": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
            "opts": {"type": "object", "properties": {"detail": {"type": "boolean"}},
                     "required": ["detail"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "The time."}},
]
CALL = {"id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More, 你好"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [CALL]},
     {"role": "tool", "content": '{"t": 21}'}],
]


def official(messages, tools=None, add_generation_prompt=True):
    msgs = []
    for m in messages:
        m = {**m, "content": m["content"] or ""}
        if m.get("tool_calls"):  # the template iterates the arguments as an object
            m["tool_calls"] = [{"name": c["function"]["name"],
                                "arguments": json.loads(c["function"]["arguments"])}
                               for c in m["tool_calls"]]
        msgs.append(m)
    return OFFICIAL.render(messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_equals_the_official_template(messages, tools):
    want = official(messages, tools)
    assert apply_chat_template(messages, tools=tools) == want  # thinking on: the template as is
    # thinking off: the MiniCPM4.1 switch adds the empty think block after the prompt
    assert apply_chat_template(messages, tools=tools, enable_thinking=False) == want + EMPTY_THINK
    assert apply_chat_template(messages, add_generation_prompt=False, tools=tools) == official(
        messages, tools, add_generation_prompt=False)


def test_transformers_renders_the_exported_tokenizer_the_same(tmp_path):
    from transformers import AutoTokenizer

    folder = save_tokenizer(train_tokenizer(["hello world"] * 10, vocab_size=280), tmp_path / "t")
    hf = AutoTokenizer.from_pretrained(str(folder))
    for messages in CONVERSATIONS:
        for tools in (None, TOOLS):
            for think in (True, False):
                msgs = [{**m, "tool_calls": [{"type": "function", "function": {
                    "name": c["function"]["name"],
                    "arguments": json.loads(c["function"]["arguments"])}}
                    for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
                got = hf.apply_chat_template(msgs, tools=tools, tokenize=False,
                                             add_generation_prompt=True, enable_thinking=think)
                assert got == apply_chat_template(messages, tools=tools, enable_thinking=think)


@pytest.mark.parametrize("msgs, match", [([], "empty"), ([{"role": "bot", "content": "x"}], "role"),
                                         ([{"role": "user", "content": 3}], "content")])
def test_bad_messages(msgs, match):
    with pytest.raises(ValueError, match=match):
        apply_chat_template(msgs)
