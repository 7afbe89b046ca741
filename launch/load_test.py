"""Bounded load test of the HTTP server on loopback.

    python launch/load_test.py --random_preset tiny --clients 32 --requests 256 --time_limit 240

Starts the server in-process on 127.0.0.1 (free port) unless --url is given, runs ``--clients``
concurrent clients until ``--requests`` finish or ``--time_limit`` passes, and writes a JSON report:
requests ok/failed/lost, p50/p99 latency, generated tokens per second.
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
from cpmjax.serve import cli

_URL = flags.DEFINE_string("url", None, "server to test (default: start one in-process)")
_CLIENTS = flags.DEFINE_integer("clients", 32, "concurrent clients")
_REQUESTS = flags.DEFINE_integer("requests", 256, "total requests")
_LIMIT = flags.DEFINE_float("time_limit", 240.0, "hard limit in seconds")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 16, "tokens per request")
_OUT = flags.DEFINE_string("out", None, "write the JSON report here")


async def run_load(url: str, clients: int, requests: int, time_limit: float, max_tokens: int,
                   vocab: int) -> dict[str, Any]:
    """Fire ``requests`` completions from ``clients`` workers; every request is accounted for."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, int(rng.integers(4, 64))).tolist() for _ in range(requests)]
    todo = asyncio.Queue()
    for i, p in enumerate(prompts):
        todo.put_nowait((i, p))
    lat, tokens, failures = [], 0, []
    t0 = time.monotonic()

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not todo.empty() and time.monotonic() - t0 < time_limit:
            i, p = todo.get_nowait()
            body = {"prompt": p, "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
                    "stream": i % 2 == 1}
            t = time.monotonic()
            try:
                if body["stream"]:
                    n = 0
                    async with c.stream("POST", url + "/v1/completions", json=body) as r:
                        r.raise_for_status()
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                n += len(json.loads(line[6:])["choices"][0]["token_ids"])
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
            "lost": requests - len(lat) - len(failures), "failures": failures[:10],
            "p50_latency_s": float(np.percentile(lat, 50)) if lat else None,
            "p99_latency_s": float(np.percentile(lat, 99)) if lat else None,
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "requests_per_s": len(lat) / wall}


def main(argv: list[str]) -> None:
    del argv
    import jax

    from cpmjax.serve.server import BackgroundServer, create_app, make_scheduler

    srv = sched = None
    if _URL.value is None:
        cfg, params, tok = cli.load_model()
        sched = make_scheduler(cfg, params, tok, max_slots=8, max_len=256, chunk=64,
                               max_queue=max(64, _CLIENTS.value))
        srv = BackgroundServer(create_app(sched, tok))
        url, vocab = srv.url, cfg.vocab_size
    else:
        url, vocab = _URL.value, 256
    try:
        report = asyncio.run(run_load(url, _CLIENTS.value, _REQUESTS.value, _LIMIT.value,
                                      _MAX_TOKENS.value, vocab))
        report["server_metrics"] = httpx.get(url + "/metrics").json()
    finally:
        if srv is not None:
            srv.stop()
            sched.stop()
    report.update(device=jax.devices()[0].device_kind, preset=cli.PRESET.value,
                  checkpoint=cli.CHECKPOINT.value, cpu_count=os.cpu_count())
    text = json.dumps(report, indent=2)
    print(text)
    if _OUT.value:
        write_text(_OUT.value, text + "\n")


if __name__ == "__main__":
    app.run(main)
