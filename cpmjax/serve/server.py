"""OpenAI-compatible HTTP API over a :class:`Scheduler` running in a background thread.

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (SSE streaming or not), ``/v1/models``,
``/health``, ``/metrics``. Field names and response shapes follow the OpenAI API reference
(platform.openai.com/docs/api-reference); errors are OpenAI's ``{"error": {...}}`` bodies. Bodies
are read with a size limit (413) and checked (``cpmjax.serve.http_errors``) and typed strictly
(``cpmjax.serve.protocol``) before anything is queued: bad input is a 400 naming the field, a
request naming another model a 404, a full queue a 429 at once. Text is tokenized in a thread pool
(``Tokenizer.encode_batch`` releases the GIL; ``encode`` does not), so a long prompt never stalls
the event loop, ``/health`` or other clients. A client that disconnects has its request
cancelled, which frees its slot or, while it is still queued, its queue place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request as HttpRequest

from cpmjax.serve.chat import apply_chat_template
from cpmjax.serve.http_errors import (DEFAULT_MAX_BODY_BYTES, ApiError, error_body, read_json,
                                      validate)
from cpmjax.serve.protocol import (ChatRequest, CompletionRequest, _Common, ignored_fields,
                                   unsupported_fields)
from cpmjax.serve.sampling import MAX_SEED, SamplingParams
from cpmjax.serve.scheduler import QueueFull, Request, Scheduler

log = logging.getLogger(__name__)

BOS_ID = 1  # MiniCPM's <s>, put before every text prompt (cpmjax.data.tokenizer.encode does too)


def _detokenizer(tokenizer: Any):
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _max_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry in characters: a token never covers more text than that
    (byte-level and metaspace entries have one character per text character or byte), so a text
    longer than ``max_len`` times it (with a margin for normalizers) cannot fit the context and is
    refused without tokenizing it."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1)


def create_app(scheduler: Scheduler, tokenizer: Any = None, model_name: str = "cpmjax", *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, tokenize_threads: int = 2
               ) -> FastAPI:
    """The FastAPI app; ``scheduler`` must be started (``scheduler.start()``) by the caller.

    ``max_body_bytes``: larger bodies get 413. ``tokenize_threads``: the tokenizer pool."""
    if max_body_bytes < 1 or tokenize_threads < 1:
        raise ValueError("max_body_bytes and tokenize_threads must be >= 1")
    app = FastAPI(title="cpmjax")
    max_len = scheduler.engine.max_len
    pool = concurrent.futures.ThreadPoolExecutor(tokenize_threads, "cpmjax-tokenize")
    max_chars = None if tokenizer is None else 4 * max_len * _max_token_chars(tokenizer)
    im_end = None if tokenizer is None else tokenizer.token_to_id("<|im_end|>")

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(Exception)
    async def internal_error(_: HttpRequest, e: Exception) -> JSONResponse:
        log.exception("unhandled error in a request handler")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), 500)

    async def parse(http: HttpRequest, model: type[_Common]) -> Any:
        raw = await read_json(http, max_body_bytes)
        body = validate(model, raw)
        bad = unsupported_fields(body, raw)
        if bad:
            raise ApiError(400, f"unsupported field(s): {', '.join(bad)}", param=bad[0])
        extra = ignored_fields(body)
        if extra:  # as vLLM: unknown fields are ignored, with a warning in the log
            log.warning("fields present in the request but ignored: %s", extra)
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"The model `{body.model}` does not exist.", param="model",
                           code="model_not_found")
        if scheduler.error is not None:
            raise ApiError(503, f"the engine is unusable: {scheduler.error!r}")
        return body

    async def encode(text: str, param: str) -> list[int]:
        if tokenizer is None:
            raise ApiError(400, "this server has no tokenizer: send the prompt as token ids",
                           param=param)
        if len(text) > max_chars:
            raise ApiError(400, f"{param}: a text of {len(text)} characters cannot fit the "
                                f"context of {max_len} tokens", param=param)
        loop = asyncio.get_running_loop()
        enc = await loop.run_in_executor(
            pool, lambda: tokenizer.encode_batch([text], add_special_tokens=False)[0])
        return [BOS_ID] + enc.ids

    def sampling(body: _Common, prompt_len: int) -> tuple[SamplingParams, int]:
        seed = body.seed if body.seed is not None else uuid.uuid4().int
        max_tokens = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if max_tokens is None:  # chat without a limit: the rest of the context (as vLLM)
            max_tokens = max_len - prompt_len
        if prompt_len + max_tokens > max_len:
            raise ApiError(400, f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) "
                                f"exceeds the context of {max_len} tokens", param="max_tokens")
        try:
            sp = SamplingParams(body.temperature, max(body.top_k, 0), body.top_p,
                                body.repetition_penalty, seed % MAX_SEED)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return sp, max_tokens

    async def submit(body: _Common, prompt: list[int], extra_stops: list[int]
                     ) -> tuple[Request, asyncio.Queue]:
        try:
            stops = body.stop_strings()
        except ValueError as e:
            raise ApiError(400, str(e), param="stop") from None
        sp, max_tokens = sampling(body, len(prompt))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_token(req: Request, tok: int | None) -> None:  # engine thread
            loop.call_soon_threadsafe(events.put_nowait, (tok, req.text, req.finish_reason))

        try:
            req = scheduler.submit(prompt, max_tokens, sp,
                                   extra_stops + list(body.stop_token_ids or []), stops, on_token,
                                   ignore_eos=body.ignore_eos)
        except QueueFull as e:
            raise ApiError(429, str(e), code="rate_limit_exceeded", type_="rate_limit_error"
                           ) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:  # the engine became unusable meanwhile
            raise ApiError(503, str(e)) from None
        return req, events

    async def stream_events(http: HttpRequest, req: Request, events: asyncio.Queue
                            ) -> AsyncIterator[tuple[int | None, str | None, str | None]]:
        """The request's events; cancels it if the client goes away (or this task is
        cancelled). The connection is checked every half second, tokens flowing or not."""
        try:
            checked = time.monotonic()
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    item = None
                if time.monotonic() - checked >= 0.5 or item is None:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                if item is None:
                    continue
                yield item
                if item[0] is None:
                    return
        finally:
            if not req.done:
                req.cancel()

    async def respond(http: HttpRequest, body: _Common, prompt: list[int], chat: bool,
                      extra_stops: list[int]) -> Any:
        req, events = await submit(body, prompt, extra_stops)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        obj = "chat.completion" if chat else "text_completion"
        created = int(time.time())

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(prompt), "completion_tokens": len(req.output),
                    "total_tokens": len(prompt) + len(req.output)}

        if not body.stream:
            async for _ in stream_events(http, req, events):
                pass
            if req.finish_reason == "error":
                raise ApiError(500, f"generation failed: {req.error}")
            text = req.text or ""
            choice: dict[str, Any] = {"index": 0, "finish_reason": req.finish_reason,
                                      "token_ids": req.output}
            choice.update({"message": {"role": "assistant", "content": text}} if chat
                          else {"text": text})
            return {"id": rid, "object": obj, "created": created, "model": model_name,
                    "choices": [choice], "usage": usage()}

        async def sse() -> AsyncIterator[str]:
            sent = ""
            async for tok, text, reason in stream_events(http, req, events):
                if reason == "error":  # as vLLM: an error event, then the end of the stream
                    err = error_body(f"generation failed: {req.error}", "server_error")
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                text = text or ""
                delta = text[len(sent):] if text.startswith(sent) else ""
                sent = text if text.startswith(sent) else sent
                choice: dict[str, Any] = {"index": 0, "finish_reason": reason,
                                          "token_ids": [] if tok is None else [tok]}
                choice.update({"delta": {"content": delta}} if chat else {"text": delta})
                chunk = {"id": rid, "object": obj + (".chunk" if chat else ""),
                         "created": created, "model": model_name, "choices": [choice]}
                if tok is None:
                    chunk["usage"] = usage()
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    def _penalties(body: _Common) -> dict[str, bool]:
        return {"logit_bias": bool(body.logit_bias), "presence_penalty": body.presence_penalty != 0,
                "frequency_penalty": body.frequency_penalty != 0}

    def not_yet(body: _Common, fields: dict[str, bool]) -> None:
        bad = [k for k, used in fields.items() if used]
        if bad:
            raise ApiError(400, f"unsupported field(s): {', '.join(bad)}", param=bad[0])

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        body: CompletionRequest = await parse(http, CompletionRequest)
        not_yet(body, {"n": body.n > 1, "logprobs": body.logprobs is not None,
                       "echo": body.echo, **_penalties(body)})
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, "prompt: one prompt per request", param="prompt")
            p = p[0]
        if isinstance(p, str):
            prompt = await encode(p, "prompt")
        else:
            prompt = p
            if not prompt:
                raise ApiError(400, "prompt must not be empty", param="prompt")
        return await respond(http, body, prompt, chat=False, extra_stops=[])

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        body: ChatRequest = await parse(http, ChatRequest)
        not_yet(body, {"n": body.n > 1, "logprobs": body.logprobs,
                       "response_format": body.response_format is not None
                       and body.response_format.type != "text",
                       "tools": bool(body.tools), "top_logprobs": bool(body.top_logprobs),
                       **_penalties(body)})
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role,
                         "content": m.text(i)} for i, m in enumerate(body.messages)]
            text = apply_chat_template(messages, enable_thinking=body.thinking())
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        prompt = await encode(text, "messages")
        return await respond(http, body, prompt, chat=True,
                             extra_stops=[] if im_end is None else [im_end])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "cpmjax",
                                            "max_model_len": max_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.error is not None:
            return JSONResponse({"status": "error", "error": repr(scheduler.error)}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return scheduler.metrics()

    app.router.on_shutdown.append(lambda: pool.shutdown(wait=False))
    return app


def make_scheduler(cfg: Any, params: Any, tokenizer: Any = None, *, max_slots: int = 8,
                   max_len: int | None = None, chunk: int = 64, max_queue: int = 64,
                   dtype: Any = None, speculative: Any = None) -> Scheduler:
    """A started scheduler (engine thread running) for ``create_app``; with ``speculative`` (a
    ``cpmjax.serve.generate.Speculative``) every decode step drafts and verifies k tokens."""
    import jax.numpy as jnp

    from cpmjax.serve.engine import DecodeEngine
    from cpmjax.serve.spec_engine import SpeculativeEngine

    kw = dict(max_slots=max_slots, max_len=max_len, chunk=chunk, dtype=dtype or jnp.float32)
    engine = (DecodeEngine(cfg, **kw) if speculative is None else
              SpeculativeEngine(cfg, speculative.draft_params, k=speculative.k,
                                frspec_ids=speculative.frspec_ids, **kw))
    sched = Scheduler(engine, params, max_queue=max_queue, detokenize=_detokenizer(tokenizer))
    sched.start()
    return sched


class BackgroundServer:
    """uvicorn in a thread on ``host`` and a free port (tests, load tests); ``stop()`` ends it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.host = host
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
