"""Peak memory of GPTQ calibration: ``python launch/bench.py gptq_memory``.

P-GPTQ of the ``small`` preset on the same calibration rows, fed as one batch (every layer then
holds all rows' linear inputs at once, as calibration did before it streamed) and as batches of
a few rows (``cpmjax.quant.gptq.accumulate_hessians``), each in a fresh interpreter so its peak
resident set (``VmHWM``) is its own. The codes agree up to float summation order (the Hessian
sums and the layer outputs are computed in other batch shapes, and GPTQ's error feedback turns a
last-bit difference into another rounding now and then); the share of equal codes is recorded.
Next to it, the resident estimate of ``cpmjax.quant.gptq.calibration_bytes`` for small and for
MiniCPM4-8B at 128 rows of 2048 tokens. Rows go to ``bench/results/gptq_memory.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from cpmjax.atomic import write_json
from cpmjax.bench.common import RESULTS
from cpmjax.quant.gptq import LINEAR_INPUTS
from cpmjax.quant.packing import unpack_int4

ROWS, SEQ_LEN = 64, 256


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(batch_rows: int, codes_out: str) -> None:
    """Quantize the small preset with batches of ``batch_rows``, save its codes to
    ``codes_out`` (.npz) and print one JSON line."""
    import jax
    import jax.numpy as jnp

    from cpmjax import presets
    from cpmjax.config import ModelConfig
    from cpmjax.model import init_params
    from cpmjax.quant import quantize_params

    cfg = ModelConfig.from_hf_config(presets.small())
    params = init_params(cfg, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (ROWS, SEQ_LEN), 0,
                                           cfg.vocab_size))
    positions = np.broadcast_to(np.arange(SEQ_LEN), (ROWS, SEQ_LEN))
    batches = [{"inputs": jnp.asarray(tokens[i:i + batch_rows]),
                "positions": jnp.asarray(positions[i:i + batch_rows])}
               for i in range(0, ROWS, batch_rows)]
    before = _peak_rss_bytes()
    start = time.perf_counter()
    q = quantize_params(cfg, params, "pgptq", bits=4, calibration=batches)
    seconds = time.perf_counter() - start
    np.savez(codes_out, **{name: np.asarray(q["layers"][name]["qweight"])
                           for name in LINEAR_INPUTS})
    print(json.dumps({"batch_rows": batch_rows, "peak_rss_bytes": _peak_rss_bytes(),
                      "peak_rss_before_bytes": before, "seconds": seconds}), flush=True)


def _measure(batch_rows: int, codes_out: str) -> dict[str, Any]:
    code = f"from cpmjax.bench.gptq_memory import child; child({batch_rows}, {codes_out!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"GPTQ child failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def run(write: bool = True) -> dict[str, Any]:
    from cpmjax import presets
    from cpmjax.config import ModelConfig
    from cpmjax.quant.gptq import calibration_bytes

    with tempfile.TemporaryDirectory() as tmp:
        one = _measure(ROWS, f"{tmp}/one.npz")
        streamed = _measure(4, f"{tmp}/streamed.npz")
        a, b = np.load(f"{tmp}/one.npz"), np.load(f"{tmp}/streamed.npz")
        equal = {name: float(np.mean(np.asarray(unpack_int4(a[name]))
                                     == np.asarray(unpack_int4(b[name]))))
                 for name in LINEAR_INPUTS}
    small = ModelConfig.from_hf_config(presets.small())
    big = ModelConfig.from_hf_config(presets.minicpm4_8b())
    out = {"setting": {"bench": "gptq_memory", "preset": "small", "method": "pgptq", "bits": 4,
                       "rows": ROWS, "seq_len": SEQ_LEN, "cpu_count": os.cpu_count(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
           "one_batch": one, "streamed_4_rows": streamed, "equal_codes": equal,
           "peak_rss_ratio": streamed["peak_rss_bytes"] / one["peak_rss_bytes"],
           "estimate_small": calibration_bytes(small, ROWS, SEQ_LEN, 4),
           "estimate_8b_128x2048": calibration_bytes(big, 128, 2048, 4)}
    print(json.dumps(out, indent=2), flush=True)
    if write:
        write_json(RESULTS / "gptq_memory.json", out)
    return out
