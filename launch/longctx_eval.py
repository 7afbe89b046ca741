"""Long-context evaluation: ``python launch/longctx_eval.py --checkpoint=DIR``.

RULER/NIAH-style tasks and a positional-bias sweep at several lengths (those that fit the
checkpoint's context) and depths, dense and InfLLM v2 sparse on the same weights, greedy answers
through the serving engine; writes ``<out_dir>/<name>.json``, ``.md`` and heatmap PNGs.

    python launch/longctx_eval.py --checkpoint=runs/tiny --lengths=256,512,896 --samples=4 \\
        --sparse_config='{"block_size": 64, "kernel_size": 32, "kernel_stride": 16, \\
        "window_size": 128, "topk": 2, "init_blocks": 1, "use_nope": false, "dense_len": 0}'
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from absl import app, flags, logging

import cpmjax
from cpmjax.eval.longctx import DEFAULT_DEPTHS, DEFAULT_LENGTHS, MODES, evaluate, write_outputs
from cpmjax.eval.longctx_tasks import TASKS

_CKPT = flags.DEFINE_string("checkpoint", None, "HF folder, cpmjax checkpoint or run dir")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), "tasks")
_LENGTHS = flags.DEFINE_list("lengths", [str(n) for n in DEFAULT_LENGTHS], "prompt lengths")
_DEPTHS = flags.DEFINE_list("depths", [str(d) for d in DEFAULT_DEPTHS], "answer depths in [0, 1]")
_SAMPLES = flags.DEFINE_integer("samples", 4, "samples per task, length and depth")
_MODES = flags.DEFINE_list("modes", list(MODES), "dense and/or sparse")
_SPARSE = flags.DEFINE_string("sparse_config", "", "JSON sparse_config of the sparse mode "
                              "(default: the checkpoint's, else MiniCPM4's)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the generated samples")
_SLOTS = flags.DEFINE_integer("max_slots", 8, "engine decode slots")
_CACHE = flags.DEFINE_string("cache_dir", ".cache/cpmjax", "corpus/tokenizer cache (filler)")
_OUT = flags.DEFINE_string("out_dir", "bench/results", "output folder")
_NAME = flags.DEFINE_string("name", None, "output name (default longctx_<checkpoint folder>)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    if not _CKPT.value:
        raise app.UsageError("--checkpoint is required")
    try:
        sparse = json.loads(_SPARSE.value) if _SPARSE.value else None
    except json.JSONDecodeError as e:
        raise app.UsageError(f"--sparse_config is not valid JSON: {e}") from e
    model = cpmjax.load(_CKPT.value)
    result = evaluate(model, tasks=_TASKS.value, lengths=[int(n) for n in _LENGTHS.value],
                      depths=[float(d) for d in _DEPTHS.value], samples=_SAMPLES.value,
                      modes=_MODES.value, sparse=sparse, cache_dir=_CACHE.value,
                      seed=_SEED.value, max_slots=_SLOTS.value)
    name = _NAME.value or f"longctx_{Path(_CKPT.value).resolve().name}"
    out = write_outputs(result, _OUT.value, name, shlex.join(["python", *sys.argv]))
    print((Path(_OUT.value) / f"{name}.md").read_text())
    print("plots:", *out["plots"], sep="\n  ")


if __name__ == "__main__":
    app.run(main)
