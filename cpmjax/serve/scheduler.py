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

A request can carry a grammar matcher (``cpmjax.serve.grammar.Matcher``: its allowed-token mask is
applied on device every step), ask for per-token log-probabilities (``logprobs``: the number of
top alternatives) and for its prompt's log-probabilities, and ``submit_group`` queues n requests
of one prompt that share a single prefill (OpenAI's ``n``): the prefix is inserted into a slot per
member, each with its own sampling settings and seed.
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
from cpmjax.serve.engine import TOP_LOGPROBS, DecodeEngine, DecodeState
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
    logprobs: int | None = None  # top alternatives to keep per token (None: no log-probabilities)
    prompt_logprobs: bool = False
    grammar: Any = None  # a cpmjax.serve.grammar.Matcher constraining the output
    token_logprobs: list[tuple[float, list[int], list[float]]] = field(default_factory=list)
    prompt_logprob_values: Any = None  # (logprob [n-1], top ids [n-1, K], top [n-1, K])
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
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
                 detokenize: Callable[[list[int]], str] | None = None,
                 observer: Any = None) -> None:
        """``detokenize`` (ids -> text) is needed for ``stop`` strings; ``observer`` (optional)
        gets ``token(req, now)`` for every token and ``finished(req)`` (metrics)."""
        self.engine, self.params, self.max_queue = engine, params, max_queue
        self.detokenize, self.observer = detokenize, observer
        self.state: DecodeState = engine.init_decode_state()
        self.slots: list[Request | None] = [None] * engine.max_slots
        self._pending: collections.deque[list[Request]] = collections.deque()  # groups
        # the group being prefilled chunk by chunk: (its requests, chunk iterator)
        self._prefilling: tuple[list[Request], Iterator[Any]] | None = None
        self._ready: tuple[Any, list[Request]] | None = None  # a prefix still to insert
        self._mask = np.full((engine.max_slots, getattr(engine, "mask_words", 1)), 0xFFFFFFFF,
                             np.uint32)
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
               ignore_eos: bool = False, *, logprobs: int | None = None,
               prompt_logprobs: bool = False, grammar: Any = None) -> Request:
        """Queue a request; raises ``ValueError`` for one that cannot run, ``QueueFull`` when full.

        Generation stops at the config's eos ids (unless ``ignore_eos``, as vLLM's flag, for
        benchmarks), at ``stop_token_ids``, at ``stop`` strings and after ``max_new_tokens``."""
        return self.submit_group(prompt, max_new_tokens, [sampling], stop_token_ids, stop,
                                 on_token, ignore_eos, logprobs=logprobs,
                                 prompt_logprobs=prompt_logprobs,
                                 grammars=None if grammar is None else [grammar])[0]

    def submit_group(self, prompt: Sequence[int], max_new_tokens: int,
                     samplings: Sequence[SamplingParams],
                     stop_token_ids: Sequence[int] | None = None, stop: Sequence[str] = (),
                     on_token: Callable[[Request, int | None], None] | None = None,
                     ignore_eos: bool = False, *, logprobs: int | None = None,
                     prompt_logprobs: bool = False, grammars: Sequence[Any] | None = None
                     ) -> list[Request]:
        """``len(samplings)`` requests of one prompt sharing one prefill (OpenAI's ``n``); each
        takes a queue place. ``grammars``: one matcher per request, or None."""
        prompt = check_token_ids(prompt, self.engine.cfg.vocab_size, "prompt", ndim=1).tolist()
        if len(prompt) >= self.engine.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of "
                             f"{self.engine.max_len} tokens")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not samplings or (grammars is not None and len(grammars) != len(samplings)):
            raise ValueError("give one sampling setting (and grammar) per request")
        if stop and self.detokenize is None:
            raise ValueError("stop strings need a tokenizer to detokenize the output")
        if logprobs is not None and not 0 <= logprobs <= TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {TOP_LOGPROBS}], got {logprobs}")
        for sp in samplings:
            self.engine.check_sampling(sp)
            self._check_speculative(sp, logprobs, prompt_logprobs, grammars)
        stops = set(() if ignore_eos else self.engine.cfg.eos_token_ids) | set(stop_token_ids or ())
        reqs = [Request(prompt, max_new_tokens, sp, frozenset(stops), tuple(stop), on_token,
                        id=next(self._ids), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                        grammar=None if grammars is None else grammars[i],
                        _on_cancel=self._drop_queued) for i, sp in enumerate(samplings)]
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the engine is unusable: {self.error!r}")
            if self.queue_depth + len(reqs) > self.max_queue:
                raise QueueFull(f"request queue is full ({self.max_queue} waiting)")
            self._pending.append(reqs)
        self._wake.set()
        return reqs

    def _check_speculative(self, sp: SamplingParams, logprobs: int | None,
                           prompt_logprobs: bool, grammars: Any) -> None:
        """A speculative round emits a verified chain per step: per-token masks, penalties over
        the chain and per-token log-probabilities are not computed there."""
        if self.engine.speculative_k is None:
            return
        used = [name for name, on in (
            ("logprobs", logprobs is not None or prompt_logprobs),
            ("response_format/guided decoding", grammars is not None),
            ("presence_penalty", sp.presence_penalty != 0),
            ("frequency_penalty", sp.frequency_penalty != 0), ("logit_bias", bool(sp.logit_bias)))
            if on]
        if used:
            raise ValueError(f"speculative decoding does not support {', '.join(used)}")

    def _drop_queued(self, req: Request) -> None:
        """``Request.cancel`` of a queued request: out of the queue now (any thread)."""
        with self._lock:
            for group in self._pending:
                if req in group:
                    group.remove(req)
                    if not group:
                        self._pending.remove(group)
                    break
            else:
                return  # already admitted (or finished): the engine thread frees its slot
            self._finish(None, req, "cancelled")

    @property
    def queue_depth(self) -> int:
        return sum(len(g) for g in self._pending)

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
        req.finished_at = time.monotonic()
        self.requests_finished += 1
        self.finish_reasons[reason] += 1
        if self.observer is not None:
            self.observer.finished(req)
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

    def _emit(self, slot: int, req: Request, token: int, logprobs: Any = None) -> None:
        """Record one generated token and finish the request if a stop condition holds; any
        failure here (grammar, detokenizer, stop strings, the client's callback) fails this
        request. ``logprobs``: this slot's (token, top ids, top) when the request wants them."""
        try:
            self._emit_unchecked(slot, req, token, logprobs)
        except Exception as e:  # noqa: BLE001 - per-request isolation
            self._fail(slot, req, e)

    def _emit_unchecked(self, slot: int, req: Request, token: int, logprobs: Any) -> None:
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
        if self.observer is not None:
            self.observer.token(req, now)
        req.output.append(token)
        if req.logprobs is not None:
            lp, ids, top = logprobs
            n = req.logprobs
            req.token_logprobs.append((float(lp), [int(i) for i in ids[:n]],
                                       [float(v) for v in top[:n]]))
        reason = None
        if token in req.stop_token_ids:
            reason = "stop"
        elif req.grammar is not None:
            req.grammar.advance(token)
        req.events.put(token)
        if req.on_token is not None:
            req.on_token(req, token)
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
            waiting = [r for g in waiting for r in g]
        if self._prefilling is not None:
            waiting.extend(self._prefilling[0])
            self._prefilling = None
        if self._ready is not None:
            waiting.extend(self._ready[1])
            self._ready = None
        for req in waiting:
            req.error = f"the engine is unusable: {type(err).__name__}: {err}"
            self._finish(None, req, "error")

    def _admit(self) -> None:
        """Prefill queued requests into free slots, one fixed-size chunk at a time.

        While any slot is decoding, a step runs at most one prefill chunk, so the chunks of a long
        prompt interleave with decode steps and running streams keep flowing (chunked prefill as
        in vLLM / JetStream). With no slot decoding nothing can stall: admission then runs until
        the free slots are filled. A group's prefix is inserted into a slot per member as slots
        free up, before the next group is prefilled.
        """
        budget = None if self.active == 0 else 1
        while budget is None or budget > 0:
            if self._ready is not None:
                if not self._insert_ready():
                    return
                continue
            if self._prefilling is None:
                if not any(r is None for r in self.slots):
                    return
                with self._lock:
                    group = self._pending.popleft() if self._pending else None
                if group is None:
                    return
                try:
                    chunks = self.engine.prefill_chunks(
                        self.params, group[0].prompt, any(r.prompt_logprobs for r in group))
                except Exception as e:  # noqa: BLE001 - per-request isolation
                    for req in group:
                        self._fail(None, req, e)
                    continue
                now = time.monotonic()
                for req in group:
                    req.admitted_at = now
                self._prefilling = (group, chunks)
            group, chunks = self._prefilling
            live = [r for r in group if not r.cancelled]
            for req in group:
                if req.cancelled:
                    self._finish(None, req, "cancelled")
            if not live:
                self._prefilling = None
                continue
            try:  # the prefill works in its own cache: a failure touches no other request
                prefix = next(chunks)
            except Exception as e:  # noqa: BLE001 - per-request isolation
                self._prefilling = None
                for req in live:
                    self._fail(None, req, e)
                continue
            budget = None if budget is None else budget - 1
            if prefix is None:
                self._prefilling = (live, chunks)
                continue
            self._prefilling = None
            for req in live:
                req.prompt_logprob_values = prefix.prompt_logprobs
            self._ready = (prefix, live)

    def _insert_ready(self) -> bool:
        """Insert members of the prefilled group into free slots; False when none is free."""
        prefix, members = self._ready
        while members:
            req = members[0]
            if req.cancelled:
                members.pop(0)
                self._finish(None, req, "cancelled")
                continue
            slot = next((i for i, r in enumerate(self.slots) if r is None), None)
            if slot is None:
                return False
            members.pop(0)
            self._insert(prefix, slot, req)
        self._ready = None
        return True

    def _insert(self, prefix: Any, slot: int, req: Request) -> None:
        try:
            mask = None
            if req.grammar is not None:
                mask = np.empty((self._mask.shape[1],), np.uint32)
                req.grammar.fill(mask)
            self.state, first = self.engine.insert(self.params, prefix, self.state, slot,
                                                   req.sampling, mask=mask,
                                                   want_logprobs=req.logprobs is not None)
            first = int(first)
            lp = None if req.logprobs is None else jax.device_get(
                jax.tree.map(lambda x: x[slot], self.state.logprobs))
        except Exception as e:  # noqa: BLE001
            lost = self._state_lost()
            self._fail(None, req, e)
            if lost:  # the donated decode state went with it: rebuild it
                self._reset(e)
            return
        self.slots[slot] = req
        self.tokens_generated += 1
        self._token_times.append((time.monotonic(), 1))
        self._emit(slot, req, first, lp)

    def _step_mask(self, busy: list[tuple[int, Request]]) -> Any:
        """The allowed-token masks of the constrained slots (None when no slot is)."""
        constrained = [(i, r) for i, r in busy if r.grammar is not None]
        if not constrained:
            return None
        self._mask.fill(0xFFFFFFFF)
        for i, r in constrained:
            r.grammar.fill(self._mask[i])
        return self._mask

    def step(self) -> bool:
        """Admit, then one decode step over all slots. Returns whether any work was done."""
        for slot, req in enumerate(self.slots):
            if req is not None and req.cancelled:
                self._finish(slot, req, "cancelled")
        self._admit()
        if self.active == 0:
            return False
        busy = [(i, r) for i, r in enumerate(self.slots) if r is not None]
        greedy = all(r.sampling.greedy for _, r in busy)
        context = max(len(r.prompt) + len(r.output) for _, r in busy)
        try:
            mask = self._step_mask(busy)
        except Exception as e:  # noqa: BLE001 - a grammar failure fails its request only
            for i, r in busy:
                if r.grammar is not None:
                    self._fail(i, r, e)
            return True
        try:
            kw = {} if mask is None else {"mask": mask}
            self.state, tokens, counts = self.engine.generate(self.params, self.state, greedy,
                                                              context, **kw)
            tokens, counts = np.asarray(tokens), np.asarray(counts)
            lps = None
            if any(r.logprobs is not None for _, r in busy):
                lps = jax.device_get(self.state.logprobs)
        except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving
            log.error("decode step failed: %r", e, exc_info=e)
            self._reset(e)
            return True
        self._failures_in_row = 0
        n = 0
        for slot, req in busy:
            req.decode_steps += 1
            req.step_tokens += int(counts[slot])
            self.decode_steps += 1
            self.step_tokens += int(counts[slot])
            row = None if lps is None else tuple(x[slot] for x in lps)
            for tok in tokens[slot, :counts[slot]]:
                n += 1
                self._emit(slot, req, int(tok), row)
                if req.done:  # a stop condition inside the accepted chain: drop the rest
                    break
        self.tokens_generated += n
        self._token_times.append((time.monotonic(), n))
        return True

    def run_until_done(self) -> None:
        """Step until the queue and all slots are empty (synchronous use)."""
        while (self.step() or self._pending or self._prefilling is not None
               or self._ready is not None):
            pass

    # ---- background thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set() and self.error is None:
            try:
                worked = self.step()
            except Exception as e:  # noqa: BLE001 - a bug outside the guarded calls: recover
                log.error("scheduler step failed: %r", e, exc_info=e)
                if self._prefilling is not None:
                    group = self._prefilling[0]
                    self._prefilling = None
                    for req in group:
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
                "speculation": self.engine.speculation(),
                "compilations": dict(self.engine.compilations),
                "step_failures": self.step_failures,
                "engine_error": None if self.error is None else repr(self.error)}
