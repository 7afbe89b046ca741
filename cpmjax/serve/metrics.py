"""Prometheus metrics of a serving process (``prometheus_client``; text exposition on ``/metrics``).

Names follow vLLM's where one exists (``vllm:time_to_first_token_seconds`` ->
``cpmjax:time_to_first_token_seconds``, ``..._inter_token_latency_seconds``,
``..._e2e_request_latency_seconds``, ``..._request_queue_time_seconds``,
``..._num_requests_running`` / ``_waiting``). Request outcomes are one counter labelled
``outcome``: the finish reasons (``stop``, ``length``, ``cancelled``, ``error``),
``rejected_429``, ``rejected_4xx`` with the error ``code`` or ``type`` as ``reason``, and
``disconnected`` clients. Gauges read the scheduler at scrape time.
Each app has its own registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Observer of a :class:`~cpmjax.serve.scheduler.Scheduler` (``token``, ``finished``) and of
    the HTTP layer (``refused``, ``disconnected``)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.registry = CollectorRegistry()
        p = "cpmjax:"
        self.requests = Counter(p + "requests", "Requests by outcome", ["outcome", "reason"],
                                registry=self.registry)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Submission to first token",
                              buckets=_LATENCY, registry=self.registry)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Between consecutive tokens",
                             buckets=_LATENCY, registry=self.registry)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Submission to finish",
                             buckets=_LATENCY, registry=self.registry)
        self.queue = Histogram(p + "request_queue_time_seconds", "Submission to prefill start",
                               buckets=_LATENCY, registry=self.registry)
        self.registry.register(_SchedulerCollector(scheduler))
        self._last: dict[int, float] = {}

    # scheduler hooks (engine thread)
    def token(self, req: Any, now: float) -> None:
        last = self._last.get(req.id)
        if last is None:
            self.ttft.observe(now - req.submitted_at)
        else:
            self.itl.observe(now - last)
        self._last[req.id] = now

    def finished(self, req: Any) -> None:
        self._last.pop(req.id, None)
        self.requests.labels(req.finish_reason or "unknown", "").inc()
        self.e2e.observe((req.finished_at or time.monotonic()) - req.submitted_at)
        if req.admitted_at is not None:
            self.queue.observe(req.admitted_at - req.submitted_at)

    # HTTP hooks (event loop)
    def refused(self, err: Any) -> None:
        if err.status == 429:
            self.requests.labels("rejected_429", "queue_full").inc()
        elif err.status < 500:
            self.requests.labels("rejected_4xx", str(err.code or err.type)).inc()
        else:
            self.requests.labels("server_error", str(err.code or err.type)).inc()

    def disconnected(self) -> None:
        self.requests.labels("disconnected", "").inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SchedulerCollector:
    """Gauges of the scheduler's state, read when scraped."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def collect(self) -> Any:
        m = self.scheduler.metrics()
        p = "cpmjax:"
        yield GaugeMetricFamily(p + "num_requests_running", "Requests holding a slot",
                                value=m["active_slots"])
        yield GaugeMetricFamily(p + "num_requests_waiting", "Requests queued",
                                value=m["queue_depth"])
        yield GaugeMetricFamily(p + "kv_slots_used_ratio", "Busy decode slots / slots",
                                value=m["active_slots"] / max(m["max_slots"], 1))
        yield GaugeMetricFamily(p + "generation_tokens_per_second",
                                "Generated tokens per second over the last 10 s",
                                value=m["tokens_per_second"])
        yield GaugeMetricFamily(p + "mean_accept_length",
                                "Tokens per decode step per slot (speculative; 1.0 without)",
                                value=m["mean_accept_length"])
        yield CounterMetricFamily(p + "generation_tokens", "Generated tokens",
                                  value=m["tokens_generated"])
        yield CounterMetricFamily(p + "decode_step_failures", "Decode steps that failed",
                                  value=m["step_failures"])
        comp = CounterMetricFamily(p + "compilations", "Jitted-function compilations",
                                   labels=["function"])
        for name, n in sorted(m["compilations"].items()):
            comp.add_metric([name], n)
        yield comp
        kinds = (m["speculation"] or {}).get("steps_by_kind")
        if kinds is not None:
            steps = CounterMetricFamily(p + "decode_steps_by_kind",
                                        "Decode steps by kind (tree engine: tree, chain, plain)",
                                        labels=["kind"])
            for name, n in sorted(kinds.items()):
                steps.add_metric([name], n)
            yield steps
        yield GaugeMetricFamily(p + "engine_healthy", "1 while the engine can serve",
                                value=0.0 if m["engine_error"] else 1.0)
