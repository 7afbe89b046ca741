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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request as HttpRequest

from cpmjax.serve.chat import apply_chat_template
from cpmjax.serve.choices import Choice, TokenText, completion_logprobs, prompt_entries
from cpmjax.serve.detokenize import token_table
from cpmjax.serve.grammar import JSON_OBJECT_SCHEMA, GrammarError, Grammars
from cpmjax.serve.http_errors import (DEFAULT_MAX_BODY_BYTES, ApiError, error_body, read_json,
                                      validate)
from cpmjax.serve.metrics import ServerMetrics
from cpmjax.serve.protocol import (MAX_N, ChatRequest, CompletionRequest, _Common,
                                   ignored_fields, unsupported_fields)
from cpmjax.serve.sampling import MAX_SEED, SamplingParams
from cpmjax.serve.scheduler import QueueFull, Request, Scheduler
from cpmjax.serve.tool_calls import ToolCalls

log = logging.getLogger(__name__)

BOS_ID = 1  # MiniCPM's <s>, put before every text prompt (cpmjax.data.tokenizer.encode does too)


def _max_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry in characters: a token never covers more text than that
    (byte-level and metaspace entries have one character per text character or byte), so a text
    longer than ``max_len`` times it (with a margin for normalizers) cannot fit the context and is
    refused without tokenizing it."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1)


class _Run:
    """The requests of one HTTP call (prompts x n choices) and their event queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.events = loop, asyncio.Queue()
        self.reqs: list[Request] = []
        self.choices: list[Choice] = []
        self.index: dict[int, int] = {}  # request id -> choice index

    def on_token(self, req: Request, tok: int | None) -> None:  # engine thread
        lp = req.token_logprobs[-1] if tok is not None and req.logprobs is not None else None
        self.loop.call_soon_threadsafe(self.events.put_nowait,
                                       (req.id, tok, lp, req.finish_reason))

    def cancel(self) -> None:
        for r in self.reqs:
            if not r.done:
                r.cancel()


def create_app(scheduler: Scheduler, tokenizer: Any = None, model_name: str = "cpmjax", *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, tokenize_threads: int = 2
               ) -> FastAPI:
    """The FastAPI app; ``scheduler`` must be started (``scheduler.start()``) by the caller.

    ``max_body_bytes``: larger bodies get 413. ``tokenize_threads``: the tokenizer pool."""
    if max_body_bytes < 1 or tokenize_threads < 1:
        raise ValueError("max_body_bytes and tokenize_threads must be >= 1")
    app = FastAPI(title="cpmjax")
    engine = scheduler.engine
    max_len, vocab = engine.max_len, engine.cfg.vocab_size
    pool = concurrent.futures.ThreadPoolExecutor(tokenize_threads, "cpmjax-tokenize")
    table = None if tokenizer is None else token_table(tokenizer)
    names = TokenText(table, tokenizer)
    max_chars = None if tokenizer is None else 4 * max_len * _max_token_chars(tokenizer)
    im_end = None if tokenizer is None else tokenizer.token_to_id("<|im_end|>")
    eos = engine.cfg.eos_token_ids[0]
    grammars = None if table is None else Grammars(table, vocab)
    metrics = ServerMetrics(scheduler)
    scheduler.observer = metrics

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        metrics.refused(e)
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
            raise ApiError(400, f"unsupported field(s): {', '.join(bad)}", param=bad[0],
                           code="unsupported_field")
        extra = ignored_fields(body)
        if extra:  # as vLLM: unknown fields are ignored, with a warning in the log
            log.warning("fields present in the request but ignored: %s", extra)
        if body.model is not None and body.model != model_name:
            raise ApiError(404, f"The model `{body.model}` does not exist.", param="model",
                           code="model_not_found")
        if scheduler.error is not None:
            raise ApiError(503, f"the engine is unusable: {scheduler.error!r}")
        return body

    async def in_pool(fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def encode(text: str, param: str, bos: bool = True) -> list[int]:
        if tokenizer is None:
            raise ApiError(400, "this server has no tokenizer: send the prompt as token ids",
                           param=param)
        if len(text) > max_chars:
            raise ApiError(400, f"{param}: a text of {len(text)} characters cannot fit the "
                                f"context of {max_len} tokens", param=param)
        enc = await in_pool(lambda: tokenizer.encode_batch([text], add_special_tokens=False)[0])
        return ([BOS_ID] if bos else []) + enc.ids

    def sampling(body: _Common, prompt_len: int, n: int) -> tuple[list[SamplingParams], int]:
        max_tokens = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if max_tokens is None:  # chat without a limit: the rest of the context (as vLLM)
            max_tokens = max_len - prompt_len
        if prompt_len + max_tokens > max_len:
            raise ApiError(400, f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) "
                                f"exceeds the context of {max_len} tokens", param="max_tokens")
        bias = []
        for key, value in (body.logit_bias or {}).items():
            try:
                tok = int(key)
            except ValueError:
                raise ApiError(400, f"logit_bias keys must be token ids, got {key!r}",
                               param="logit_bias") from None
            if not 0 <= tok < vocab:
                raise ApiError(400, f"logit_bias: token id {tok} is outside the vocabulary "
                                    f"[0, {vocab})", param="logit_bias")
            bias.append((tok, value))
        seed = body.seed if body.seed is not None else uuid.uuid4().int
        try:  # choice i samples with seed + i, so n choices differ and a seed reproduces them
            return [SamplingParams(body.temperature, max(body.top_k, 0), body.top_p,
                                   body.repetition_penalty, (seed + i) % MAX_SEED,
                                   body.presence_penalty, body.frequency_penalty, tuple(bias))
                    for i in range(n)], max_tokens
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def start(run: _Run, body: _Common, prompts: list[list[int]], stop_ids: list[int],
                    logprobs: int | None, prompt_logprobs: bool, grammar: Any) -> None:
        """Submit every prompt's group of n choices; all or nothing (429 cancels the rest)."""
        try:
            stops = body.stop_strings()
        except ValueError as e:
            raise ApiError(400, str(e), param="stop") from None
        stop_ids = stop_ids + list(body.stop_token_ids or [])
        try:
            for prompt in prompts:
                samplings, max_tokens = sampling(body, len(prompt), body.n)
                first = len(run.choices)
                matchers = None if grammar is None else [grammars.matcher(grammar)
                                                         for _ in samplings]
                reqs = scheduler.submit_group(prompt, max_tokens, samplings, stop_ids, (),
                                              run.on_token, body.ignore_eos, logprobs=logprobs,
                                              prompt_logprobs=prompt_logprobs,
                                              grammars=matchers)
                for j, req in enumerate(reqs):
                    run.index[req.id] = first + j
                    run.reqs.append(req)
                    run.choices.append(Choice(first + j, table, stops))
        except QueueFull as e:
            run.cancel()
            raise ApiError(429, str(e), code="rate_limit_exceeded", type_="rate_limit_error"
                           ) from None
        except ValueError as e:
            run.cancel()
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:  # the engine became unusable meanwhile
            run.cancel()
            raise ApiError(503, str(e)) from None
        except BaseException:
            run.cancel()
            raise
    
    async def events(http: HttpRequest, run: _Run) -> AsyncIterator[tuple[int, int | None]]:
        """(choice, token or None at its end) as they come; cancels the run if the client goes
        away (or this task is cancelled). The connection is checked every half second."""
        open_choices = len(run.reqs)
        try:
            checked = time.monotonic()
            while open_choices:
                try:
                    rid, tok, lp, reason = await asyncio.wait_for(run.events.get(), 0.5)
                    index = run.index[rid]
                except asyncio.TimeoutError:
                    index = None
                if index is None or time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        metrics.disconnected()
                        return
                if index is None:
                    continue
                choice, req = run.choices[index], run.reqs[index]
                if tok is None:
                    choice.finish(reason)
                    open_choices -= 1
                else:
                    choice.add(tok, lp)
                    if choice.stopped and not req.done:
                        req.cancel()  # a stop string: free the slot now
                yield index, tok
        finally:
            run.cancel()

    def failure(run: _Run) -> str | None:
        errs = [r.error for r in run.reqs if r.finish_reason == "error"]
        return errs[0] if errs else None

    def usage(prompts: list[list[int]], run: _Run) -> dict[str, int]:
        done = sum(len(c.tokens) for c in run.choices)
        given = sum(len(p) for p in prompts)
        return {"prompt_tokens": given, "completion_tokens": done, "total_tokens": given + done}

    async def respond(http: HttpRequest, body: _Common, prompts: list[list[int]], chat: bool,
                      stop_ids: list[int], logprobs: int | None = None, echo: bool = False,
                      grammar: Any = None, tools: Any = None) -> Any:
        run = _Run(asyncio.get_running_loop())
        await start(run, body, prompts, stop_ids, logprobs, echo and logprobs is not None,
                    grammar)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        obj = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        per = body.n
        head = {"id": rid, "object": obj + (".chunk" if chat and body.stream else ""),
                "created": created, "model": model_name}

        def prompt_of(index: int) -> list[int]:
            return prompts[index // per]

        def echo_part(index: int) -> tuple[str, Any]:
            """(prompt text, its logprobs) for ``echo``."""
            p = prompt_of(index)
            text = "" if table is None else table.text(p)
            if logprobs is None:
                return text, None
            req = run.reqs[index]
            return text, completion_logprobs(names, p, prompt_entries(
                req.prompt_logprob_values, len(p), logprobs))

        def finish_reason(c: Choice) -> str | None:
            if tools is not None and tools.calls(c):
                return "tool_calls"
            return c.finish_reason

        if not body.stream:
            async for _ in events(http, run):
                pass
            err = failure(run)
            if err is not None:
                raise ApiError(500, f"generation failed: {err}")
            out = []
            for c in run.choices:
                choice: dict[str, Any] = {"index": c.index, "finish_reason": finish_reason(c),
                                          "token_ids": c.tokens}
                if chat:
                    msg = {"role": "assistant", "content": c.text}
                    if tools is not None:
                        msg = tools.message(c)
                    choice["message"] = msg
                    choice["logprobs"] = None if logprobs is None else {
                        "content": c.chat_logprobs(names), "refusal": None}
                else:
                    text, lp = c.text, None
                    if logprobs is not None:
                        lp = completion_logprobs(names, c.tokens, c.logprobs)
                    if echo:
                        ptext, plp = echo_part(c.index)
                        text = ptext + text
                        if lp is not None:
                            lp = {k: plp[k] + (lp[k] if k != "text_offset" else
                                               [o + len(ptext) for o in lp[k]]) for k in lp}
                    choice.update(text=text, logprobs=lp)
                out.append(choice)
            return {**head, "choices": out, "usage": usage(prompts, run)}

        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def sse() -> AsyncIterator[str]:
            sent = [0] * len(run.choices)  # tokens of each choice already in a chunk
            if chat:
                for c in run.choices:
                    yield _chunk(head, {"index": c.index, "delta": {"role": "assistant",
                                                                    "content": ""},
                                        "logprobs": None, "finish_reason": None,
                                        "token_ids": []}, include_usage)
            elif echo:
                for c in run.choices:
                    ptext, plp = echo_part(c.index)
                    yield _chunk(head, {"index": c.index, "text": ptext, "logprobs": plp,
                                        "finish_reason": None, "token_ids": []}, include_usage)
            async for index, tok in events(http, run):
                c = run.choices[index]
                final = tok is None
                if final and c.finish_reason == "error":  # as vLLM: an error event, then end
                    err = error_body(f"generation failed: {run.reqs[index].error}",
                                     "server_error")
                    yield f"data: {json.dumps(err)}\n\n"
                    continue
                text = c.delta(final)
                start_tok = sent[index]
                fresh = len(c.tokens) > start_tok
                if not (text or final or (fresh and (logprobs is not None or table is None))):
                    continue  # nothing to show yet: these tokens go with the next chunk
                sent[index] = len(c.tokens)
                reason = finish_reason(c) if final else None
                choice: dict[str, Any] = {"index": index, "finish_reason": reason,
                                          "token_ids": c.tokens[start_tok:]}
                if chat:
                    delta: dict[str, Any] = {"content": text}
                    if tools is not None:
                        delta = tools.stream_delta(c, final)
                    choice["delta"] = delta
                    choice["logprobs"] = None if logprobs is None else {
                        "content": c.chat_logprobs(names, start_tok), "refusal": None}
                else:
                    choice["text"] = text
                    choice["logprobs"] = None if logprobs is None else completion_logprobs(
                        names, c.tokens[start_tok:], c.logprobs[start_tok:])
                yield _chunk(head, choice, include_usage)
            if include_usage:
                last = {**head, "choices": [], "usage": usage(prompts, run)}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def prompts_of(body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        items = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        out = []
        for i, item in enumerate(items):
            ids = await encode(item, "prompt") if isinstance(item, str) else item
            if not ids:
                raise ApiError(400, f"prompt[{i}] must not be empty", param="prompt")
            out.append(ids)
        if not out or len(out) * body.n > MAX_N:
            raise ApiError(400, f"prompt: 1 to {MAX_N} prompts x n choices per request",
                           param="prompt")
        return out

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Any:
        body: CompletionRequest = await parse(http, CompletionRequest)
        prompts = await prompts_of(body)
        return await respond(http, body, prompts, chat=False, stop_ids=[],
                             logprobs=body.logprobs, echo=body.echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Any:
        body: ChatRequest = await parse(http, ChatRequest)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if tokenizer is None:
            raise ApiError(400, "this server has no tokenizer: chat needs one", param="messages")
        try:
            tools = ToolCalls.from_request(body)
        except ValueError as e:
            raise ApiError(400, str(e), param="tool_choice") from None
        try:
            messages = [m.rendered(i) for i, m in enumerate(body.messages)]
            text = apply_chat_template(messages, enable_thinking=body.thinking(),
                                       tools=tools.rendered_tools if tools else None)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        stop = im_end if im_end is not None else eos
        grammar, pattern = None, None
        try:
            pattern = None if tools is None else tools.forced_regex()
            if pattern is not None:
                grammar = await in_pool(grammars.regex, pattern, stop)
            elif body.response_format is not None and body.response_format.type != "text":
                schema = JSON_OBJECT_SCHEMA
                if body.response_format.type == "json_schema":
                    js = body.response_format.json_schema
                    if js is None or js.schema_ is None:
                        raise ApiError(400, "response_format.json_schema.schema is required",
                                       param="response_format")
                    schema = js.schema_
                grammar = await in_pool(grammars.json_schema, schema, stop)
        except GrammarError as e:
            raise ApiError(400, str(e), param="response_format" if pattern is None else "tools"
                           ) from None
        prompt = await encode(text, "messages")
        k = None if not body.logprobs else (body.top_logprobs or 0)
        return await respond(http, body, [prompt], chat=True,
                             stop_ids=[] if im_end is None else [im_end], logprobs=k,
                             grammar=grammar, tools=tools)

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
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/metrics.json")
    async def metrics_json() -> dict[str, Any]:
        return scheduler.metrics()

    app.router.on_shutdown.append(lambda: pool.shutdown(wait=False))
    return app


def _chunk(head: dict[str, Any], choice: dict[str, Any], include_usage: bool) -> str:
    chunk = {**head, "choices": [choice]}
    if include_usage:
        chunk["usage"] = None
    return f"data: {json.dumps(chunk)}\n\n"


def make_scheduler(cfg: Any, params: Any, tokenizer: Any = None, *, max_slots: int = 8,
                   max_len: int | None = None, chunk: int = 64, max_queue: int = 64,
                   dtype: Any = None, speculative: Any = None,
                   logprobs_mode: str = "raw") -> Scheduler:
    """A started scheduler (engine thread running) for ``create_app``; with ``speculative`` (a
    ``cpmjax.serve.generate.Speculative``) every decode step drafts and verifies k tokens.
    ``logprobs_mode``: ``raw`` (the model's log-softmax, vLLM's default) or ``processed`` (the
    distribution sampled from)."""
    import jax.numpy as jnp

    from cpmjax.serve.spec_engine import make_engine

    kw = dict(max_slots=max_slots, max_len=max_len, chunk=chunk, dtype=dtype or jnp.float32,
              logprobs_mode=logprobs_mode)
    engine = make_engine(cfg, speculative, **kw)
    sched = Scheduler(engine, params, max_queue=max_queue)
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
