"""Continuous batching over a :class:`DecodeEngine`: a bounded request queue, slots that requests
join and leave between decode steps, streaming, stop conditions and cancellation.

The same ``Scheduler.step`` drives both the background serving thread (``start``) and the
synchronous ``cpmjax.serve.generate.generate`` (``run_until_done``), so offline generation and the
HTTP server share one code path.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from cpmjax.model.params import Params
from cpmjax.serve.engine import DecodeEngine, DecodeState
from cpmjax.serve.sampling import SamplingParams
from cpmjax.tokens import check_token_ids


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
    decode_steps: int = 0  # engine steps that produced tokens for this request
    step_tokens: int = 0  # tokens those steps produced (> decode_steps: accepted drafts)
    text: str | None = None  # detokenized output (cut before a stop string), when a detokenizer is set
    events: "queue.Queue[int | None]" = field(default_factory=queue.Queue)
    submitted_at: float = field(default_factory=time.monotonic)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request and free its slot at the next step."""
        self._cancel.set()

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
        self.error: BaseException | None = None

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
                      id=next(self._ids))
        with self._lock:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"request queue is full ({self.max_queue} waiting)")
            self._pending.append(req)
        self._wake.set()
        return req

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
        req.finish_reason = reason
        self.requests_finished += 1
        self.finish_reasons[reason] += 1
        if slot is not None:  # counted before the slot shows free, so metrics never lag behind
            self.state = self.engine.release(self.state, slot)
            self.slots[slot] = None
        req._done.set()
        req.events.put(None)
        if req.on_token is not None:
            req.on_token(req, None)

    def _emit(self, slot: int, req: Request, token: int) -> None:
        """Record one generated token and finish the request if a stop condition holds."""
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
                self._prefilling = (slot, req, self.engine.prefill_chunks(self.params, req.prompt))
            slot, req, chunks = self._prefilling
            if req.cancelled:
                self._prefilling = None
                self._finish(None, req, "cancelled")
                continue
            prefix = next(chunks)
            budget = None if budget is None else budget - 1
            if prefix is None:
                continue
            self._prefilling = None
            self.state, first = self.engine.insert(self.params, prefix, self.state, slot,
                                                   req.sampling)
            self.slots[slot] = req
            self.tokens_generated += 1
            self._token_times.append((time.monotonic(), 1))
            self._emit(slot, req, int(first))

    def step(self) -> bool:
        """Admit, then one decode step over all slots. Returns whether any work was done."""
        for slot, req in enumerate(self.slots):
            if req is not None and req.cancelled:
                self._finish(slot, req, "cancelled")
        self._admit()
        if self.active == 0:
            return False
        busy = [r for r in self.slots if r is not None]
        greedy = all(r.sampling.temperature == 0 for r in busy)
        context = max(len(r.prompt) + len(r.output) for r in busy)
        self.state, tokens, counts = self.engine.generate(self.params, self.state, greedy, context)
        tokens, counts = np.asarray(tokens), np.asarray(counts)
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
        try:
            while not self._stop.is_set():
                if not self.step():
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - fail every waiter loudly rather than hang them
            self.error = e
            with self._lock:
                waiting = list(self._pending)
                self._pending.clear()
            if self._prefilling is not None:
                waiting.append(self._prefilling[1])
                self._prefilling = None
            for slot, req in enumerate(self.slots):
                if req is not None:
                    self.slots[slot] = None
                    self._finish(None, req, "error")
            for req in waiting:
                self._finish(None, req, "error")
            raise

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
                "engine_error": None if self.error is None else repr(self.error)}
