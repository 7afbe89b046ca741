"""Reading and checking HTTP request bodies, and OpenAI-style error responses.

Everything a client sends is refused here with a 4xx that says why before any of it reaches the
engine: bodies over the size limit (413, counted while reading, so a huge body is never held whole),
invalid JSON (``NaN``/``Infinity`` included: they are not JSON, RFC 8259 section 6), lone UTF-16
surrogates (``"\\ud800"`` decodes to a Python string no UTF-8 encoder or tokenizer accepts), and
field errors from the pydantic models, each naming the field (``param``). The error body is
OpenAI's: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import Request as HttpRequest

M = TypeVar("M", bound=BaseModel)

DEFAULT_MAX_BODY_BYTES = 4 << 20
MAX_JSON_DEPTH = 64


class ApiError(Exception):
    """An error response: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | int | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            self.status)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


async def read_json(http: HttpRequest, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read with at most ``limit`` bytes held."""
    declared = http.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of "
                                    f"{limit} bytes", code="body_too_large")
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
    buf = bytearray()
    async for chunk in http.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes",
                           code="body_too_large")
    try:
        obj = json.loads(bytes(buf), parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"invalid JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(obj).__name__}")
    check_json_text(obj)
    return obj


def check_json_text(obj: Any) -> None:
    """Refuse lone surrogates in any string (key or value) and nesting deeper than
    ``MAX_JSON_DEPTH``, naming where."""
    stack: list[tuple[Any, str, int]] = [(obj, "body", 0)]
    while stack:
        x, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(x, str):
            _check_utf8(x, path)
        elif isinstance(x, dict):
            for k, v in x.items():
                _check_utf8(k, f"{path} key")
                stack.append((v, f"{path}.{k}", depth + 1))
        elif isinstance(x, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(x))


def _check_utf8(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{path}: contains a lone UTF-16 surrogate "
                            f"({s[e.start:e.end].encode('unicode_escape').decode()}); text must "
                            f"be valid Unicode", param=path.removeprefix("body.")) from None


def validate(model: type[M], raw: dict[str, Any]) -> M:
    """``model`` from ``raw``, or a 400 naming the first bad field (without echoing its value,
    which may be huge)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        errs = e.errors(include_input=False, include_url=False)
        first = errs[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        more = f" (and {len(errs) - 1} more errors)" if len(errs) > 1 else ""
        raise ApiError(400, f"{param}: {first['msg']}{more}", param=param) from None
