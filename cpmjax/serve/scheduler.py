"""Continuous batching over a :class:`DecodeEngine`: a bounded request queue, slots that requests
join and leave between decode steps, streaming, stop conditions and cancellation.

The same ``Scheduler.step`` drives both the background serving thread (``start``) and the
synchronous ``cpmjax.serve.generate.generate`` (``run_until_done``), so offline generation and the
HTTP server share one code path.

One request never takes the engine down: requests are validated before they are queued; a failure
in one request's own work (its prefill, its insert, detokenizing or streaming its tokens) finishes
that request alone with ``finish_reason="error"`` and ``error`` set; a failed decode step fails the
requests of that step, rebuilds the decode state and serving goes on. Only when the engine cannot
even rebuild its state (or fails ``MAX_CONSECUTIVE_FAILURES`` steps in a row) is it marked unusable
(``error``), which the server reports as 503.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from cpmjax.model.params import Params
from cpmjax.serve.engine import DecodeEngine, DecodeState
from cpmjax.serve.sampling import SamplingParams
from cpmjax.tokens import check_token_ids

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3  # failed steps in a row before the engine is declared unusable


class QueueFull(RuntimeError):
    """The request queue is at its limit; the caller should retry later (HTTP 429)."""


@dataclass
class Request:
    """One generation request and its progress. Tokens stream out through ``events``."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_token_ids: frozenset[int]
    stop: tuple[str, ...] = ()
    on_token: Callable[["Request", int | None], None] | None = None
    id: int = 0
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # why, when finish_reason is "error"
    decode_steps: int = 0  # engine steps that produced tokens for this request
    step_tokens: int = 0  # tokens those steps produced (> decode_steps: accepted drafts)
    text: str | None = None  # detokenized output (cut before a stop string), when a detokenizer is set
    events: "queue.Queue[int | None]" = field(default_factory=queue.Queue)
    submitted_at: float = field(default_factory=time.monotonic)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _on_cancel: Callable[["Request"], None] | None = None

    def cancel(self) -> None:
        """Drop this request: a queued one leaves the queue at once (its place is free for the
        next client), a running one frees its slot at the next step."""
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def mean_accept_length(self) -> float:
        """Tokens per decode step (CPM.cu's "mean accept length"; 1.0 without speculation)."""
        return self.step_tokens / max(self.decode_steps, 1)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def __iter__(self) -> Iterator[int]:
        """Tokens as they are generated; ends when the request finishes."""
        while True:
            tok = self.events.get()
            if tok is None:
                return
            yield tok


class Scheduler:
    """Admits queued requests into free slots and runs decode steps while any slot is busy."""

    def __init__(self, engine: DecodeEngine, params: Params, *, max_queue: int = 64,
                 detokenize: Callable[[list[int]], str] | None = None) -> None:
        self.engine, self.params, self.max_queue = engine, params, max_queue
        self.detokenize = detokenize
        self.state: DecodeState = engine.init_decode_state()
        self.slots: list[Request | None] = [None] * engine.max_slots
        self._pending: collections.deque[Request] = collections.deque()
        # the request being prefilled chunk by chunk: (its reserved slot, request, chunk iterator)
        self._prefilling: tuple[int, Request, Iterator[Any]] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()
        self.tokens_generated = 0
        self.decode_steps = 0  # slot-steps: one per busy slot per engine step
        self.step_tokens = 0  # tokens the engine produced in those slot-steps
        self.requests_finished = 0
        self.finish_reasons: collections.Counter[str] = collections.Counter()
        self.error: BaseException | None = None  # set only when the engine is unusable
        self.step_failures = 0  # decode steps that failed (their requests failed, state rebuilt)
        self._failures_in_row = 0

    # ---- submission ----------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], max_new_tokens: int = 64,
               sampling: SamplingParams = SamplingParams(),
               stop_token_ids: Sequence[int] | None = None, stop: Sequence[str] = (),
               on_token: Callable[[Request, int | None], None] | None = None,
               ignore_eos: bool = False) -> Request:
        """Queue a request; raises ``ValueError`` for one that cannot run, ``QueueFull`` when full.

        Generation stops at the config's eos ids (unless ``ignore_eos``, as vLLM's flag, for
        benchmarks), at ``stop_token_ids``, at ``stop`` strings and after ``max_new_tokens``."""
        prompt = check_token_ids(prompt, self.engine.cfg.vocab_size, "prompt", ndim=1).tolist()
        if len(prompt) >= self.engine.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of "
                             f"{self.engine.max_len} tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop and self.detokenize is None:
            raise ValueError("stop strings need a tokenizer to detokenize the output")
        self.engine.check_sampling(sampling)
        stops = set(() if ignore_eos else self.engine.cfg.eos_token_ids) | set(stop_token_ids or ())
        req = Request(prompt, max_new_tokens, sampling, frozenset(stops), tuple(stop), on_token,
                      id=next(self._ids), _on_cancel=self._drop_queued)
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the engine is unusable: {self.error!r}")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"request queue is full ({self.max_queue} waiting)")
            self._pending.append(req)
        self._wake.set()
        return req

    def _drop_queued(self, req: Request) -> None:
        """``Request.cancel`` of a queued request: out of the queue now (any thread)."""
        with self._lock:
            try:
                self._pending.remove(req)
            except ValueError:
                return  # already admitted (or finished): the engine thread frees its slot
            self._finish(None, req, "cancelled")

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.monotonic()
        while self._token_times and self._token_times[0][0] < now - window:
            self._token_times.popleft()
        return sum(n for _, n in self._token_times) / window

    # ---- the loop ------------------------------------------------------------------------
    def _finish(self, slot: int | None, req: Request, reason: str) -> None:
        if req.done:
            return
        req.finish_reason = reason
        self.requests_finished += 1
        self.finish_reasons[reason] += 1
        if slot is not None:  # counted before the slot shows free, so metrics never lag behind
            self.slots[slot] = None
            self.state = self.engine.release(self.state, slot)
        req._done.set()
        req.events.put(None)
        if req.on_token is not None:
            try:
                req.on_token(req, None)
            except Exception:  # noqa: BLE001 - a broken client callback must not stop the engine
                log.exception("request %d: on_token failed at finish", req.id)

    def _fail(self, slot: int | None, req: Request, err: BaseException) -> None:
        """Finish ``req`` alone with ``finish_reason="error"``; the others keep decoding."""
        log.error("request %d failed: %r", req.id, err, exc_info=err)
        req.error = f"{type(err).__name__}: {err}"
        if slot is not None and self.slots[slot] is req:
            self.slots[slot] = None  # its slot is released with the others' next reset or here
            try:
                self.state = self.engine.release(self.state, slot)
            except Exception as e:  # noqa: BLE001 - the device failed too: rebuild the state
                self._reset(e)
            slot = None
        self._finish(slot, req, "error")

    def _emit(self, slot: int, req: Request, token: int) -> None:
        """Record one generated token and finish the request if a stop condition holds; any
        failure here (detokenizer, stop strings, the client's callback) fails this request."""
        try:
            self._emit_unchecked(slot, req, token)
        except Exception as e:  # noqa: BLE001 - per-request isolation
            self._fail(slot, req, e)

    def _emit_unchecked(self, slot: int, req: Request, token: int) -> None:
        req.output.append(token)
        req.events.put(token)
        if req.on_token is not None:
            req.on_token(req, token)
        reason = None
        if token in req.stop_token_ids:
            reason = "stop"
        if self.detokenize is not None:
            body = req.output[:-1] if reason else req.output
            req.text = self.detokenize(body)
            for s in req.stop:
                cut = req.text.find(s)
                if cut >= 0:
                    req.text, reason = req.text[:cut], "stop"
        if reason is None and (len(req.output) >= req.max_new_tokens or
                               len(req.prompt) + len(req.output) >= self.engine.max_len):
            reason = "length"
        if reason:
            self._finish(slot, req, reason)

    def _state_lost(self) -> bool:
        """Whether a failed donating call consumed the decode state's buffers."""
        try:
            return any(getattr(x, "is_deleted", lambda: False)()
                       for x in jax.tree.leaves(self.state))
        except Exception:  # noqa: BLE001 - cannot even inspect it: treat it as lost
            return True

    def _reset(self, err: BaseException) -> None:
        """A device step failed: fail every request holding a slot, rebuild the decode state.
        If the state cannot be rebuilt the engine is unusable (``error``)."""
        self.step_failures += 1
        self._failures_in_row += 1
        for slot, req in enumerate(self.slots):
            if req is not None:
                self.slots[slot] = None
                req.error = f"the decode step failed: {type(err).__name__}: {err}"
                self._finish(None, req, "error")
        try:
            self.state = self.engine.init_decode_state()
        except Exception as e:  # noqa: BLE001
            self._declare_unusable(e)
            return
        if self._failures_in_row >= MAX_CONSECUTIVE_FAILURES:
            self._declare_unusable(err)

    def _declare_unusable(self, err: BaseException) -> None:
        log.error("engine unusable after %d failed steps in a row: %r", self._failures_in_row,
                  err)
        with self._lock:
            self.error = err
            waiting = list(self._pending)
            self._pending.clear()
        if self._prefilling is not None:
            waiting.append(self._prefilling[1])
            self._prefilling = None
        for req in waiting:
            req.error = f"the engine is unusable: {type(err).__name__}: {err}"
            self._finish(None, req, "error")

    def _admit(self) -> None:
        """Prefill queued requests into free slots, one fixed-size chunk at a time.

        While any slot is decoding, a step runs at most one prefill chunk, so the chunks of a long
        prompt interleave with decode steps and running streams keep flowing (chunked prefill as
        in vLLM / JetStream). With no slot decoding nothing can stall: admission then runs until
        the free slots are filled.
        """
        budget = None if self.active == 0 else 1
        while budget is None or budget > 0:
            if self._prefilling is None:
                slot = next((i for i, r in enumerate(self.slots) if r is None), None)
                if slot is None:
                    return
                with self._lock:
                    req = self._pending.popleft() if self._pending else None
                if req is None:
                    return
                try:
                    chunks = self.engine.prefill_chunks(self.params, req.prompt)
                except Exception as e:  # noqa: BLE001 - per-request isolation
                    self._fail(None, req, e)
                    continue
                self._prefilling = (slot, req, chunks)
            slot, req, chunks = self._prefilling
            if req.cancelled:
                self._prefilling = None
                self._finish(None, req, "cancelled")
                continue
            try:  # the prefill works in its own cache: a failure touches no other request
                prefix = next(chunks)
            except Exception as e:  # noqa: BLE001 - per-request isolation
                self._prefilling = None
                self._fail(None, req, e)
                continue
            budget = None if budget is None else budget - 1
            if prefix is None:
                continue
            self._prefilling = None
            try:
                self.state, first = self.engine.insert(self.params, prefix, self.state, slot,
                                                       req.sampling)
                first = int(first)
            except Exception as e:  # noqa: BLE001
                lost = self._state_lost()
                self._fail(None, req, e)
                if lost:  # the donated decode state went with it: rebuild it
                    self._reset(e)
                continue
            self.slots[slot] = req
            self.tokens_generated += 1
            self._token_times.append((time.monotonic(), 1))
            self._emit(slot, req, first)

    def step(self) -> bool:
        """Admit, then one decode step over all slots. Returns whether any work was done."""
        for slot, req in enumerate(self.slots):
            if req is not None and req.cancelled:
                self._finish(slot, req, "cancelled")
        self._admit()
        if self.active == 0:
            return False
        busy = [r for r in self.slots if r is not None]
        greedy = all(r.sampling.greedy for r in busy)
        context = max(len(r.prompt) + len(r.output) for r in busy)
        try:
            self.state, tokens, counts = self.engine.generate(self.params, self.state, greedy,
                                                              context)
            tokens, counts = np.asarray(tokens), np.asarray(counts)
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving
            log.error("decode step failed: %r", e, exc_info=e)
            self._reset(e)
            return True
        self._failures_in_row = 0
        n = 0
        for slot, req in enumerate(self.slots):
            if req is None:
                continue
            req.decode_steps += 1
            req.step_tokens += int(counts[slot])
            self.decode_steps += 1
            self.step_tokens += int(counts[slot])
            for tok in tokens[slot, :counts[slot]]:
                n += 1
                self._emit(slot, req, int(tok))
                if req.done:  # a stop condition inside the accepted chain: drop the rest
                    break
        self.tokens_generated += n
        self._token_times.append((time.monotonic(), n))
        return True

    def run_until_done(self) -> None:
        """Step until the queue and all slots are empty (synchronous use)."""
        while self.step() or self._pending or self._prefilling is not None:
            pass

    # ---- background thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set() and self.error is None:
            try:
                worked = self.step()
            except Exception as e:  # noqa: BLE001 - a bug outside the guarded calls: recover
                log.error("scheduler step failed: %r", e, exc_info=e)
                if self._prefilling is not None:
                    req = self._prefilling[1]
                    self._prefilling = None
                    self._fail(None, req, e)
                self._reset(e)
                continue
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()

    def start(self) -> None:
        """Run the loop in a daemon thread (the HTTP server's engine thread)."""
        self._thread = threading.Thread(target=self._loop, name="cpmjax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def metrics(self) -> dict[str, Any]:
        return {"queue_depth": self.queue_depth, "active_slots": self.active,
                "max_slots": self.engine.max_slots, "max_queue": self.max_queue,
                "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished,
                "finish_reasons": dict(self.finish_reasons),
                "tokens_per_second": self.tokens_per_second(),
                "decode_steps": self.decode_steps,
                "mean_accept_length": self.step_tokens / max(self.decode_steps, 1),
                "speculative_k": self.engine.speculative_k,
                "compilations": dict(self.engine.compilations),
                "step_failures": self.step_failures,
                "engine_error": None if self.error is None else repr(self.error)}
