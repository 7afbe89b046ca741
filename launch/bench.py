"""Benchmarks: ``python launch/bench.py SUITE``, SUITE one of train, attention, decode,
decode_constrained, decode_quant, decode_tree, qat, rl, gptq_memory, gpu.

Each suite measures cpmjax and its baseline side by side in one process, prints a table and
appends JSON lines (device, config, metric, value, baseline, ratio) under ``bench/results/``.
Every suite lives in ``cpmjax.bench`` (``decode_constrained``, ``decode_quant`` and
``decode_tree`` are ``cpmjax.bench.decode``'s grammar-constrained, quantized-weight and
tree-speculation variants); ``gpu`` needs a
CUDA GPU.
"""

from __future__ import annotations

import importlib

from absl import app

SUITES = {"train": "cpmjax.bench.train", "attention": "cpmjax.bench.attention",
          "gpu": "cpmjax.bench.gpu", "decode": "cpmjax.bench.decode",
          "decode_constrained": "cpmjax.bench.decode", "decode_quant": "cpmjax.bench.decode",
          "decode_tree": "cpmjax.bench.decode", "qat": "cpmjax.bench.qat",
          "rl": "cpmjax.bench.rl", "gptq_memory": "cpmjax.bench.gptq_memory"}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in SUITES:
        raise app.UsageError(f"usage: python launch/bench.py {{{'|'.join(SUITES)}}}")
    module = importlib.import_module(SUITES[argv[1]])
    variants = {"decode_constrained": "run_constrained", "decode_quant": "run_quantized",
                "decode_tree": "run_tree"}
    getattr(module, variants.get(argv[1], "run"))()


if __name__ == "__main__":
    app.run(main)
