"""Benchmarks: ``python launch/bench.py train|attention|decode|gpu``.

Each suite measures cpmjax and its baseline side by side in one process, prints a table and
appends JSON lines (device, config, metric, value, baseline, ratio) under ``bench/results/``.
``train``, ``attention`` and ``gpu`` live in ``cpmjax.bench``; ``gpu`` needs a CUDA GPU.
"""

from __future__ import annotations

import importlib
import sys

from absl import app

SUITES = {"train": "cpmjax.bench.train", "attention": "cpmjax.bench.attention",
          "gpu": "cpmjax.bench.gpu", "decode": "bench_decode"}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in SUITES:
        raise app.UsageError(f"usage: python launch/bench.py {{{'|'.join(SUITES)}}}")
    if SUITES[argv[1]] == "bench_decode":  # still a script next to this one
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
    importlib.import_module(SUITES[argv[1]]).run()


if __name__ == "__main__":
    app.run(main)
