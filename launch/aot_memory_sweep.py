"""Per-device memory vs sequence length on a TPU topology, dense vs InfLLM v2 sparse, for the
train step and the serving prefill: one ``launch/aot_compile.py`` process per point (each
compile frees its memory), rows appended to ``--out``, then the plot.

    flock /tmp/cpmjax-heavy.lock python launch/aot_memory_sweep.py \\
        --out=bench/results/aot_compile_tpu.jsonl --png=bench/results/aot_memory_vs_length.png

Train: the 0.5B preset, v5p:2x2x1, fsdp 4, one row per chip. Prefill: the last 2048-token
chunk of a prompt of that length through the engine, 8B with the 128K factors, one v5p chip.
Points that do not fit are recorded with ``fits: false`` (the compiler's message). Points that
already have a row with this ``--tag`` in ``--out`` are not compiled again (a stopped sweep
resumes; ``launch/aot_compile.py --tag=memory_vs_length`` rows count).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from absl import app, flags

from cpmjax.parallel.aot_plot import plot_memory, read_rows

_LENGTHS = flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768", "65536", "131072"],
                             "sequence lengths")
_OUT = flags.DEFINE_string("out", "bench/results/aot_compile_tpu.jsonl", "JSON-lines rows")
_PNG = flags.DEFINE_string("png", "bench/results/aot_memory_vs_length.png", "the plot")
_TAG = flags.DEFINE_string("tag", "memory_vs_length", "the rows' 'sweep' field")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "plot the rows already in --out")

TRAIN = dict(step="train", preset="minicpm4_0p5b", topology="v5p:2x2x1", mesh="1,4,1", batch=4)
PREFILL = dict(step="prefill", preset="minicpm4_8b_128k", topology="v5p:2x2x1", chunk=2048)
PANELS = [dict(step="train", preset=TRAIN["preset"], topology=TRAIN["topology"],
               title="0.5B train step, v5p fsdp 4, 1 row/chip"),
          dict(step="prefill", preset=PREFILL["preset"], topology=PREFILL["topology"],
               title="8B (128K factors) prefill chunk, 1 v5p chip")]


def _done(rows: list[dict], spec: dict, seq_len: int, sparse: str) -> bool:
    return any(r.get("sweep") == _TAG.value and r.get("step") == spec["step"]
               and r["preset"] == spec["preset"] and r["topology"] == spec["topology"]
               and r["seq_len"] == seq_len and r["sparse"] == (sparse == "on") for r in rows)


def _point(spec: dict, seq_len: int, sparse: str) -> None:
    args = [sys.executable, str(Path(__file__).with_name("aot_compile.py")),
            f"--seq_len={seq_len}", f"--sparse={sparse}", f"--out={_OUT.value}",
            f"--tag={_TAG.value}", *(f"--{k}={v}" for k, v in spec.items())]
    print(" ".join(args[1:]), flush=True)
    subprocess.run(args, check=False)  # a refusal to fit is a recorded row, not an error


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _PLOT_ONLY.value:
        rows = read_rows(_OUT.value) if Path(_OUT.value).exists() else []
        for spec in (TRAIN, PREFILL):
            for n in _LENGTHS.value:
                for sparse in ("off", "on"):
                    if not _done(rows, spec, int(n), sparse):
                        _point(spec, int(n), sparse)
    plot_memory(read_rows(_OUT.value), PANELS, _PNG.value, tag=_TAG.value)
    print(f"wrote {_PNG.value}")


if __name__ == "__main__":
    app.run(main)
