"""Bounded load test of the HTTP server on loopback.

    python launch/load_test.py --random_preset tiny --clients 32 --requests 256 --time_limit 240

Starts the server in-process on 127.0.0.1 (free port) unless --url is given, runs ``--clients``
concurrent clients until ``--requests`` finish or ``--time_limit`` passes, and writes a JSON report:
requests ok/failed/lost, p50/p99 of time to first token and inter-token latency (streaming
clients, measured at the client) and of end-to-end latency, generated tokens per second. Every
``--disconnect_every``-th request is a streaming client that hangs up after its first token; the
report counts them and the server's queue and slots must be free afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import httpx
import numpy as np
from absl import app, flags

from cpmjax.atomic import write_text
import model_flags

_URL = flags.DEFINE_string("url", None, "server to test (default: start one in-process)")
_CLIENTS = flags.DEFINE_integer("clients", 32, "concurrent clients")
_REQUESTS = flags.DEFINE_integer("requests", 256, "total requests")
_LIMIT = flags.DEFINE_float("time_limit", 240.0, "hard limit in seconds")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 16, "tokens per request")
_OUT = flags.DEFINE_string("out", None, "write the JSON report here")
_DISCONNECT = flags.DEFINE_integer("disconnect_every", 8,
                                   "every N-th request disconnects after its first token (0: none)")


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def run_load(url: str, clients: int, requests: int, time_limit: float, max_tokens: int,
                   vocab: int, disconnect_every: int = 0) -> dict[str, Any]:
    """Fire ``requests`` completions from ``clients`` workers; every request is accounted for."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, int(rng.integers(4, 64))).tolist() for _ in range(requests)]
    todo = asyncio.Queue()
    for i, p in enumerate(prompts):
        todo.put_nowait((i, p))
    lat, ttft, itl, tokens, failures, hung_up = [], [], [], 0, [], 0
    t0 = time.monotonic()

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal tokens, hung_up
        while not todo.empty() and time.monotonic() - t0 < time_limit:
            i, p = todo.get_nowait()
            leave = disconnect_every > 0 and i % disconnect_every == disconnect_every - 1
            body = {"prompt": p, "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
                    "stream": leave or i % 2 == 1}
            t = time.monotonic()
            try:
                if body["stream"]:
                    n, last = 0, None
                    async with c.stream("POST", url + "/v1/completions", json=body) as r:
                        r.raise_for_status()
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            k = len(json.loads(line[6:])["choices"][0]["token_ids"])
                            if k:
                                now = time.monotonic()
                                if last is None:
                                    ttft.append(now - t)
                                else:
                                    itl.append((now - last) / k)
                                last, n = now, n + k
                            if leave and n:
                                break  # hang up mid-stream
                    if leave:
                        hung_up += 1
                        continue
                else:
                    r = await c.post(url + "/v1/completions", json=body)
                    r.raise_for_status()
                    n = r.json()["usage"]["completion_tokens"]
                if n < 1:
                    raise ValueError("no tokens")
                lat.append(time.monotonic() - t)
                tokens += n
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                failures.append(f"request {i}: {e!r}")

    async with httpx.AsyncClient(timeout=time_limit) as c:
        await asyncio.wait_for(asyncio.gather(*[worker(c) for _ in range(clients)]),
                               time_limit + 30)
    wall = time.monotonic() - t0
    return {"clients": clients, "requests": requests, "ok": len(lat), "failed": len(failures),
            "disconnected": hung_up, "lost": requests - len(lat) - len(failures) - hung_up,
            "failures": failures[:10],
            "p50_ttft_s": _pct(ttft, 50), "p99_ttft_s": _pct(ttft, 99),
            "p50_itl_s": _pct(itl, 50), "p99_itl_s": _pct(itl, 99),
            "p50_latency_s": _pct(lat, 50), "p99_latency_s": _pct(lat, 99),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "requests_per_s": len(lat) / wall}


def main(argv: list[str]) -> None:
    del argv
    import jax

    from cpmjax.serve.server import BackgroundServer, create_app, make_scheduler

    srv = sched = None
    if _URL.value is None:
        cfg, params, tok = model_flags.load_model()
        sched = make_scheduler(cfg, params, tok, max_slots=8, max_len=256, chunk=64,
                               max_queue=max(64, _CLIENTS.value))
        srv = BackgroundServer(create_app(sched, tok))
        url, vocab = srv.url, cfg.vocab_size
    else:
        url, vocab = _URL.value, 256
    try:
        report = asyncio.run(run_load(url, _CLIENTS.value, _REQUESTS.value, _LIMIT.value,
                                      _MAX_TOKENS.value, vocab, _DISCONNECT.value))
        time.sleep(1.0)  # the server notices the last hang-ups within its half-second check
        report["server_metrics"] = httpx.get(url + "/metrics.json").json()
    finally:
        if srv is not None:
            srv.stop()
            sched.stop()
    report.update(device=jax.devices()[0].device_kind, preset=model_flags.PRESET.value,
                  checkpoint=model_flags.CHECKPOINT.value, cpu_count=os.cpu_count())
    text = json.dumps(report, indent=2)
    print(text)
    if _OUT.value:
        write_text(_OUT.value, text + "\n")


if __name__ == "__main__":
    app.run(main)
