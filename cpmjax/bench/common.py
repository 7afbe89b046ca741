"""What every benchmark suite shares: where results go, the machine/run metadata of a row,
timing of compiled functions, compiled memory."""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def meta() -> dict[str, Any]:
    """Device, versions, start time and the 1-minute load average (the machine is shared)."""
    dev = jax.devices()[0]
    return dict(device=f"{dev.platform}:{dev.device_kind} x{jax.device_count()} "
                       f"({os.cpu_count()} cpu)", jax=jax.__version__,
                time=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                load_avg_1m=round(os.getloadavg()[0], 2))


def append(rows: list[dict[str, Any]], name: str, per_platform: bool = True) -> Path:
    """Append rows to ``bench/results/<name>_<platform>.jsonl`` (``<name>.jsonl`` without
    ``per_platform``: rows whose platform is a field, e.g. a CPU host's ahead-of-time compiles
    for a TPU); returns the path."""
    path = RESULTS / (f"{name}_{jax.default_backend()}.jsonl" if per_platform else f"{name}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def compiled_gib(compiled: Any) -> float:
    """Arguments + outputs + temporaries of a compiled function, GiB (its peak footprint as the
    compiler plans it; outputs that alias donated arguments counted once)."""
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return round(total / 2**30, 4)


def best_seconds(compiled: Callable[..., Any], *args: Any, repeats: int = 1) -> float:
    """Fastest of ``repeats`` calls of a compiled function (compilation excluded)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return best
