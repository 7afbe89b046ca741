"""Benchmarks: ``python launch/bench.py train|attention|decode|decode_constrained|qat``.

Each suite measures cpmjax and its baseline side by side in one process, prints a table and
appends JSON lines (device, config, metric, value, baseline, ratio) under ``bench/results/``.
"""

from __future__ import annotations

import importlib
import sys

from absl import app

SUITES = {"train": "bench_train", "attention": "bench_attention", "decode": "bench_decode",
          "decode_constrained": "bench_decode", "qat": "bench_qat"}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in SUITES:
        raise app.UsageError(f"usage: python launch/bench.py {{{'|'.join(SUITES)}}}")
    module = importlib.import_module(SUITES[argv[1]])
    (module.run_constrained if argv[1] == "decode_constrained" else module.run)()


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    app.run(main)
