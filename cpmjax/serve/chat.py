"""MiniCPM4 chat prompt format (ChatML turns, tool signatures, tool calls), rendered with jinja2.

The format is the ``chat_template`` of MiniCPM's tool-capable tokenizer config (OpenBMB/MiniCPM,
``demo/minicpm3/function_call/minicpm_chat_template_with_tool.jinja``; MiniCPM4's MCP demo,
``demo/minicpm4/MCP/generate_example.py``, renders with the tokenizer's template and parses exactly
this ``<|tool_call_start|>`` python-call format): every message is
``<|im_start|>{role}\\n{content}<|im_end|>\\n``; a system turn is written only when there is a
system message or tools; tools become Python signatures in the system turn; an assistant turn
with ``tool_calls`` writes them as python calls with JSON-literal arguments. For generation,
``<|im_start|>assistant\\n`` is appended, and ``enable_thinking=False`` adds the empty
``<think>\\n\\n</think>\\n\\n`` block of the MiniCPM4.1 / Qwen3 templates (not part of the MiniCPM4
template, which has no thinking switch).

The project's own template (``minicpm4_chat_template.jinja``, package data) is rendered in a
jinja2 sandbox configured as ``transformers`` configures it for ``apply_chat_template``
(``trim_blocks``, ``lstrip_blocks``, ``tojson`` without ASCII escaping or key sorting), and it is
written into exported tokenizer configs, so ``transformers`` renders the same text; the tests
compare it with the official template byte for byte.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
EMPTY_THINK = "<think>\n\n</think>\n\n"
TEMPLATE_FILE = "minicpm4_chat_template.jinja"


def chat_template_text() -> str:
    """The template source (what exported ``tokenizer_config.json`` files carry)."""
    return resources.files("cpmjax.serve").joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=4)
def compile_template(source: str) -> jinja2.Template:
    """``source`` compiled as transformers compiles chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def apply_chat_template(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                        enable_thinking: bool = True,
                        tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The prompt text for ``messages`` (each ``{"role", "content"}``; assistant turns may carry
    ``tool_calls`` as in the OpenAI API, their ``arguments`` a JSON string or an object) and the
    OpenAI-style ``tools`` (``{"type": "function", "function": {name, description, parameters}}``).
    """
    if not messages:
        raise ValueError("messages must not be empty")
    rendered = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
        calls = m.get("tool_calls")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        out: dict[str, Any] = {"role": role, "content": content}
        if calls:
            out["tool_calls"] = [_call(i, c) for c in calls]
        rendered.append(out)
    try:
        return compile_template(chat_template_text()).render(
            messages=rendered, tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template failed on these messages: {e}") from None


def _call(i: int, call: Mapping[str, Any]) -> dict[str, Any]:
    """A tool call with its arguments as an object (the template writes them as keywords)."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"messages[{i}].tool_calls: arguments are not JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"messages[{i}].tool_calls: arguments must be a JSON object")
    return {"name": fn.get("name"), "arguments": args}
