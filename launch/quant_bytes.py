"""Bytes one decoder layer's decode step reads with bf16, int4, int8 or ternary linears.

``python launch/quant_bytes.py`` compiles the step for this CPU and, with libtpu installed, for
one chip of ``--topology`` (ahead of time, nothing allocated), for each preset and format, and
appends one JSON line per row to ``bench/results/quant_bytes.jsonl``, followed by rows for a
single linear at several row counts (``--linear_m``); ``cpmjax.bench.quant_bytes`` says what is
measured.
"""
from __future__ import annotations

import importlib.util
import json

from absl import app, flags

from cpmjax.bench import quant_bytes
from cpmjax.bench.common import append
from cpmjax.presets import PRESETS

_PRESETS = flags.DEFINE_list("presets", ["minicpm4_0p5b", "minicpm4_8b"], "model presets")
_FORMATS = flags.DEFINE_list("formats", ["bf16", "int4", "int8", "ternary"],
                             f"weight formats among {list(quant_bytes.FORMATS)}")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology (one chip is used); "
                                "empty: this host's backend only")
_CACHE = flags.DEFINE_integer("cache_len", 128, "KV cache positions the decode step attends to")
_LINEAR_M = flags.DEFINE_list("linear_m", ["1", "16", "2048"], "row counts of the single-linear "
                               "rows (one --linear_shape matmul; empty: none)")
_LINEAR_SHAPE = flags.DEFINE_list("linear_shape", ["4096", "16384"], "in,out of that linear "
                                  "(default: the 8B preset's gate projection)")
_UNFUSED = flags.DEFINE_bool("unfused", True, "also rows with the layer dequantized to dense "
                             "before its matmuls, for comparison")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = [p for p in _PRESETS.value if p not in PRESETS]
    unknown += [f for f in _FORMATS.value if f not in quant_bytes.FORMATS]
    if unknown:
        raise app.UsageError(f"unknown presets or formats: {unknown}")
    targets = [None]
    if _TOPOLOGY.value:
        if importlib.util.find_spec("libtpu") is None:
            raise app.UsageError("--topology needs libtpu installed (or pass --topology=)")
        targets.append(_TOPOLOGY.value)
    rows = []
    for topology in targets:
        rows += quant_bytes.rows(tuple(_PRESETS.value), tuple(_FORMATS.value), topology,
                                 _CACHE.value)
        if topology is not None:  # every weight counted once (cpmjax.bench.quant_bytes)
            rows += quant_bytes.rows(tuple(_PRESETS.value), tuple(_FORMATS.value), topology,
                                     _CACHE.value, prefetch=False)
        if _UNFUSED.value:
            packed = tuple(f for f in _FORMATS.value if f != "bf16")
            rows += quant_bytes.rows(tuple(_PRESETS.value), packed, topology, _CACHE.value,
                                     fused=False)
        if _LINEAR_M.value:
            k, n = (int(v) for v in _LINEAR_SHAPE.value)
            rows += quant_bytes.linear_rows(k, n, tuple(int(m) for m in _LINEAR_M.value),
                                            tuple(_FORMATS.value), topology)
    for r in rows:
        print(json.dumps(r))
    print(f"appended {len(rows)} rows to {append(rows, 'quant_bytes', per_platform=False)}")


if __name__ == "__main__":
    app.run(main)
