"""Tool calls in MiniCPM4's format: parsing the model's output into OpenAI ``tool_calls`` (streaming
too) and the grammar that forces a call (``tool_choice`` ``required`` or a named function).

The model calls tools as the chat template instructs (``cpmjax.serve.chat``)::

    <|tool_call_start|>
    ```python
    get_weather(city="Paris",days=2)
    ```
    <|tool_call_end|>

one call per line, keyword arguments with JSON-literal values (the template writes
``name=value|tojson``; MiniCPM's own parser, ``parse_tool_for_minicpm3`` in OpenBMB/MiniCPM
``demo/minicpm4/MCP/generate_example.py``, reads them with Python's ``ast``, as here). Text outside
the block is the message content. A forced call is constrained by a regex over that format whose
argument values are the outlines-core regexes of each parameter's JSON schema, every parameter
given in schema order, so the arguments always validate against the function's schema.
"""

from __future__ import annotations

import ast
import json
import uuid
from typing import Any

from cpmjax.serve.grammar import schema_regex

START, END = "<|tool_call_start|>", "<|tool_call_end|>"
_META = set("\\.^$|?*+()[]{}")


def _literal(text: str) -> str:
    """``text`` as a regex matching itself (outlines-core's Rust regex dialect)."""
    return "".join("\\n" if c == "\n" else ("\\" + c if c in _META else c) for c in text)


def parse_calls(text: str) -> tuple[list[dict[str, Any]], str]:
    """(OpenAI tool calls, remaining content) from a complete model output; no calls when the
    block is missing or does not parse (the text is then all content, as MiniCPM's parser)."""
    start = text.find(START)
    end = text.find(END, start + len(START)) if start >= 0 else -1
    if start < 0 or end < 0:
        return [], text
    code = text[start + len(START):end].strip()
    if code.startswith("```"):
        code = code[3:].removeprefix("python").strip()
    code = code.removesuffix("```").strip()
    try:
        calls = [_call(node, code) for node in ast.parse(code).body]
    except (SyntaxError, ValueError):
        return [], text
    content = (text[:start] + text[end + len(END):]).strip()
    return calls, content


def _call(statement: Any, code: str) -> dict[str, Any]:
    node = statement.value if isinstance(statement, ast.Expr) else None
    if not isinstance(node, ast.Call) or node.args:
        raise ValueError("not a keyword-argument call")
    name = ast.get_source_segment(code, node.func)
    args = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError("**kwargs in a tool call")
        src = ast.get_source_segment(code, kw.value)
        try:
            args[kw.arg] = json.loads(src)
        except json.JSONDecodeError:
            args[kw.arg] = ast.literal_eval(kw.value)  # a Python literal (True, 'text', ...)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


class ToolCalls:
    """The tools of one chat request: what the template renders, the forcing grammar, and the
    parsed calls of each choice."""

    def __init__(self, tools: list[dict[str, Any]], choice: Any) -> None:
        self.rendered_tools = tools
        self.choice = choice  # "auto" | "required" | a function name
        self._parsed: dict[int, tuple[list[dict[str, Any]], str]] = {}
        self._streamed: dict[int, int] = {}  # characters of content streamed per choice

    @classmethod
    def from_request(cls, body: Any) -> "ToolCalls | None":
        """None without tools or with ``tool_choice: "none"`` (tools are then not rendered)."""
        choice = body.tool_choice
        if choice is None:
            choice = "auto"
        if not body.tools:
            if choice not in ("auto", "none"):
                raise ValueError("tool_choice needs tools")
            return None
        if choice == "none":
            return None
        tools = [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools]
        names = [t["function"]["name"] for t in tools]
        if not isinstance(choice, str):
            if choice.function.name not in names:
                raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in "
                                 f"tools ({names})")
            choice = choice.function.name
        return cls(tools, choice)

    def forced_regex(self) -> str | None:
        """The regex of an output that is exactly one call (``required``: of any tool)."""
        if self.choice == "auto":
            return None
        fns = [t["function"] for t in self.rendered_tools
               if self.choice == "required" or t["function"]["name"] == self.choice]
        calls = "|".join(f"({self._call_regex(fn)})" for fn in fns)
        return _literal(START + "\n```python\n") + f"({calls})" + _literal("\n```\n" + END)

    @staticmethod
    def _call_regex(fn: dict[str, Any]) -> str:
        props = (fn.get("parameters") or {}).get("properties") or {}
        args = ",".join(_literal(name + "=") + f"({schema_regex(spec)})"
                        for name, spec in props.items())
        return _literal(fn["name"] + "(") + args + _literal(")")

    def _result(self, c: Any) -> tuple[list[dict[str, Any]], str]:
        if c.index not in self._parsed and c.finish_reason is not None:
            self._parsed[c.index] = parse_calls(c.text)
        return self._parsed.get(c.index, ([], c.text))

    def calls(self, c: Any) -> list[dict[str, Any]]:
        return self._result(c)[0]

    def message(self, c: Any) -> dict[str, Any]:
        calls, content = self._result(c)
        if not calls:
            return {"role": "assistant", "content": c.text}
        return {"role": "assistant", "content": content or None, "tool_calls": calls}

    def stream_delta(self, c: Any, final: bool) -> dict[str, Any]:
        """The delta of choice ``c``'s newly streamable text: content up to the start of a
        tool-call block (held back while it may be one), then, at the end, the parsed calls (or
        the held text, if none)."""
        sent = self._streamed.get(c.index, 0)
        full = c.text[:c.sent]
        if not final:
            cut = full.find(START)
            limit = cut if cut >= 0 else _safe_prefix(full)
            delta = full[sent:max(limit, sent)]
            self._streamed[c.index] = max(limit, sent)
            return {"content": delta}
        calls, content = self._result(c)
        if not calls:
            self._streamed[c.index] = len(c.text)
            return {"content": c.text[sent:]}
        rest = content[sent:] if content.startswith(c.text[:sent]) else ""
        delta: dict[str, Any] = {"tool_calls": [{"index": i, **call}
                                                for i, call in enumerate(calls)]}
        if rest:
            delta["content"] = rest
        return delta


def _safe_prefix(text: str) -> int:
    """Length of ``text`` that cannot be the beginning of a tool-call block."""
    for k in range(min(len(START) - 1, len(text)), 0, -1):
        if START.startswith(text[-k:]):
            return len(text) - k
    return len(text)
