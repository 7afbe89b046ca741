"""OpenAI-compatible HTTP API over a :class:`Scheduler` running in a background thread.

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (SSE streaming or not), ``/v1/models``,
``/health``, ``/metrics``. Request bodies are pydantic models, so malformed JSON, wrong types and
unknown fields are 422s naming the field; requests that cannot fit the context are 400; a full
queue is 429 at once. A client that disconnects has its request cancelled, which frees its slot.
Field names and response shapes follow the OpenAI API reference (platform.openai.com/docs/api-reference).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator, Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cpmjax.serve.chat import apply_chat_template
from cpmjax.serve.sampling import SamplingParams
from cpmjax.serve.scheduler import QueueFull, Request, Scheduler


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int = Field(16, ge=1, le=1 << 20)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, lt=2**31)
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    enable_thinking: bool = True


def _detokenizer(tokenizer: Any):
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def create_app(scheduler: Scheduler, tokenizer: Any = None, model_name: str = "cpmjax") -> FastAPI:
    """The FastAPI app; ``scheduler`` must be started (``scheduler.start()``) by the caller."""
    app = FastAPI(title="cpmjax")
    max_len = scheduler.engine.max_len

    def encode(text: str) -> list[int]:
        from cpmjax.data.tokenizer import encode as encode_text

        if tokenizer is None:
            raise HTTPException(400, "this server has no tokenizer: send the prompt as token ids")
        return encode_text(tokenizer, text, add_bos=True)

    async def submit(body: _Sampling, prompt: list[int], extra_stops: list[int]
                     ) -> tuple[Request, asyncio.Queue]:
        if scheduler.error is not None:
            raise HTTPException(503, f"engine failed: {scheduler.error!r}")
        if len(prompt) + body.max_tokens > max_len:
            raise HTTPException(400, f"prompt ({len(prompt)} tokens) plus max_tokens "
                                     f"({body.max_tokens}) exceeds the context of {max_len} tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            raise HTTPException(400, "stop strings must be non-empty")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_token(req: Request, tok: int | None) -> None:  # engine thread
            loop.call_soon_threadsafe(events.put_nowait, (tok, req.text, req.finish_reason))

        seed = body.seed if body.seed is not None else uuid.uuid4().int % 2**31
        try:
            sp = SamplingParams(body.temperature, body.top_k, body.top_p,
                                body.repetition_penalty, seed)
            req = scheduler.submit(prompt, body.max_tokens, sp, extra_stops, stops, on_token)
        except QueueFull as e:
            raise HTTPException(429, str(e)) from None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return req, events

    async def stream_events(http: HttpRequest, req: Request, events: asyncio.Queue
                            ) -> AsyncIterator[tuple[int | None, str | None, str | None]]:
        """The request's events; cancels it if the client goes away (or this task is cancelled)."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                yield item
                if item[0] is None:
                    return
        finally:
            if not req.done:
                req.cancel()

    async def respond(http: HttpRequest, body: _Sampling, prompt: list[int], chat: bool,
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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest) -> Any:
        prompt = encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        return await respond(http, body, prompt, chat=False, extra_stops=[])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest) -> Any:
        text = apply_chat_template([m.model_dump() for m in body.messages],
                                   enable_thinking=body.enable_thinking)
        prompt = encode(text)
        im_end = tokenizer.token_to_id("<|im_end|>")
        return await respond(http, body, prompt, chat=True,
                             extra_stops=[] if im_end is None else [im_end])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "owned_by": "cpmjax", "max_model_len": max_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.error is not None:
            return JSONResponse({"status": "error", "error": repr(scheduler.error)}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return scheduler.metrics()

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
