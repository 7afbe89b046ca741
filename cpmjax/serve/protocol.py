"""OpenAI request bodies for the server: every field typed strictly and bounded at the boundary.

Field names, defaults and ranges follow the OpenAI API reference
(platform.openai.com/docs/api-reference/completions and /chat); the extensions vLLM accepts
(``top_k``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``, ``chat_template_kwargs``)
are accepted under vLLM's names. Types are strict (``true`` is not the integer 1, ``"1"`` is not a
number), floats must be finite. Fields that exist in the API but that this server does not honour
are refused by name (``unsupported_fields``), and fields that exist in neither are ignored with a
warning, as vLLM does (its ``_log_unrecognized_fields`` / "The following fields were present in the
request but ignored").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cpmjax.serve.sampling import (MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MAX_TOP_K,
                                   MIN_REPETITION_PENALTY)

MAX_NEW_TOKENS = 1 << 20
MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; vLLM any number)
MAX_STOP_CHARS = 1024
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs limit; vLLM's default)
MAX_MESSAGES = 4096
MAX_TOOLS = 128
MAX_NAME = 256


class _Body(BaseModel):
    """Strict, finite, and unknown keys kept (so they can be reported and ignored)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Common(_Body):
    model: str | None = Field(None, max_length=MAX_NAME)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=MAX_TOP_K)  # vLLM: -1 and 0 both disable it
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = Field(None)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = Field(None, max_length=MAX_NAME)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} strings, got {len(stops)}")
        for s in stops:
            if not 0 < len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"stop strings must have 1 to {MAX_STOP_CHARS} characters")
        return stops


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_NEW_TOKENS)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str = Field(max_length=MAX_NAME)
    arguments: str


class ToolCall(_Body):
    id: str | None = Field(None, max_length=MAX_NAME)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A content part is a dict here (not a model) so that other part types (image_url, ...) can be
    # refused by name instead of failing the union with a vague message.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, max_length=MAX_NAME)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, max_length=MAX_NAME)
    reasoning_content: str | None = None

    def rendered(self, index: int) -> dict[str, Any]:
        """The message as ``cpmjax.serve.chat.apply_chat_template`` takes it (``developer`` is
        OpenAI's newer name for ``system``)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text(index)}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out

    def text(self, index: int) -> str:
        """The content as one string; text parts are joined, other part types refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text":
                raise ValueError(f"messages[{index}].content[{j}]: content parts of type "
                                 f"{part.get('type')!r} are not supported (text only)")
            out.append(TextPart.model_validate(part).text)
        return "".join(out)


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str = Field(max_length=64)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatTemplateKwargs(_Body):
    enable_thinking: bool | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    enable_thinking: bool | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    def thinking(self) -> bool:
        """``chat_template_kwargs.enable_thinking`` (vLLM's way) or ``enable_thinking``; on by
        default, as MiniCPM4's template."""
        kw = self.chat_template_kwargs
        if kw is not None and kw.enable_thinking is not None:
            return kw.enable_thinking
        return True if self.enable_thinking is None else self.enable_thinking


# Fields of the OpenAI API this server does not implement, with the values that are harmless
# (what the field means when absent); anything else is a 400 naming the field.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": (None,), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "web_search_options": (None,), "functions": (None,), "function_call": (None,),
    "reasoning_effort": (None,), "store": (None, False), "metadata": (None,),
    "service_tier": (None, "auto", "default"),
}


def unsupported_fields(body: _Body, raw: dict[str, Any]) -> list[str]:
    """Names of API fields given with a value this server cannot honour."""
    bad = [k for k, ok in _UNSUPPORTED.items() if k in raw and raw[k] not in ok]
    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of != body.n:
        bad.append("best_of")
    return bad


def ignored_fields(body: _Body) -> list[str]:
    """Keys that are no field of the API (top level): ignored with a warning, as vLLM does."""
    return sorted(k for k in (body.model_extra or {}) if k not in _UNSUPPORTED)
