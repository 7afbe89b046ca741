"""Parsing MiniCPM's tool-call output (the format of its chat template) into OpenAI tool calls."""

import json

from cpmjax.serve.tool_calls import parse_calls


def test_calls_thought_and_answer_are_separated():
    text = ('<|thought_start|>\nNeed the weather.\n<|thought_end|>\n<|tool_call_start|>\n'
            '```python\nget_weather(city="Paris",days=2,metric=true)\nnow()\n```\n'
            '<|tool_call_end|>\nLet me check.')
    calls, content = parse_calls(text)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2,
                                                             "metric": True}
    assert json.loads(calls[1]["function"]["arguments"]) == {}
    assert content == "<|thought_start|>\nNeed the weather.\n<|thought_end|>\n\nLet me check."
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)


def test_python_literals_and_unicode_arguments():
    calls, _ = parse_calls('<|tool_call_start|>\n```python\nf(a=True, b=\'x\', c="你好", '
                           'd=[1, {"k": null}])\n```\n<|tool_call_end|>')
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": True, "b": "x", "c": "你好",
                                                             "d": [1, {"k": None}]}


def test_no_block_or_a_broken_one_is_plain_content():
    for text in ("just an answer", "<|tool_call_start|>\nf(x=1", "<|tool_call_start|>\n"
                 "```python\nf(1, 2)\n```\n<|tool_call_end|>", "<|tool_call_start|>import os"
                 "<|tool_call_end|>"):
        assert parse_calls(text) == ([], text)
