"""ModelTunnel v2-style sweep: ``python launch/sweep.py --widths=32,128,256 --lrs=...``.

Grid (or ``--search=random --samples=N``) over learning rate, init scale and batch size at each
width and parametrization; every point is a run of the ablation runner (``--out``, resumable),
then the loss-vs-LR table and plot (``--results``: ``.json``, ``.md``, ``.png``). The base model
is ``--config`` (an experiment config file) with its depth, head_dim and vocabulary.

    python launch/sweep.py --config=configs/tiny.py --widths=32,128,256 \\
        --lrs=0.002,0.0039,0.0078,0.0156,0.0313,0.0625,0.125 --parametrizations=mup,standard
"""

from __future__ import annotations

import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cpmjax.experiments.runner import run_study, study_rows
from cpmjax.experiments.sweep import grid_points, sweep_study, write_sweep_results

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "base experiment config",
                                          lock_config=False)
_NAME = flags.DEFINE_string("name", "sweep", "study name")
_WIDTHS = flags.DEFINE_list("widths", ["32", "128", "256"], "hidden sizes")
_BASE_WIDTH = flags.DEFINE_integer("base_width", None, "muP base width (default: the smallest)")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 16, "head dimension (heads = width / head_dim)")
_MLP_RATIO = flags.DEFINE_integer("mlp_ratio", 3, "intermediate_size / hidden_size")
_LRS = flags.DEFINE_list("lrs", ["0.0039", "0.0078", "0.0156", "0.0313", "0.0625"], "peak LRs")
_INITS = flags.DEFINE_list("init_scales", ["0.1"], "initializer_range values")
_BATCHES = flags.DEFINE_list("batch_sizes", None, "global batch sizes (default: the config's)")
_PARAMS = flags.DEFINE_list("parametrizations", ["mup", "standard"], "mup and/or standard")
_SEARCH = flags.DEFINE_enum("search", "grid", ["grid", "random"], "grid or random search")
_SAMPLES = flags.DEFINE_integer("samples", 0, "random search: settings drawn per width")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "training seeds of every point")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "runs at once")
_BACKEND = flags.DEFINE_enum("backend", "local", ["local", "ray", "tpu_pod"], "where runs go")
_LOCK = flags.DEFINE_string("lock_file", "", "flock each run holds while it trains")
_NICE = flags.DEFINE_integer("nice", 0, "niceness of the run processes")
_OUT = flags.DEFINE_string("out", None, "study folder (default runs/sweeps/<name>)")
_ANALYZE_ONLY = flags.DEFINE_bool("analyze_only", False, "analyse the runs finished so far "
                                   "(another process may still be running the sweep)")
_RESULTS = flags.DEFINE_string("results", None, "results path without extension "
                               "(default <out>/sweep)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    base = _CONFIG.value
    widths = [int(w) for w in _WIDTHS.value]
    batches = [int(b) for b in _BATCHES.value] if _BATCHES.value else [
        base.train.global_batch_size]
    points = grid_points(_PARAMS.value, widths, [float(x) for x in _LRS.value],
                         [float(x) for x in _INITS.value], batches, _SEARCH.value,
                         _SAMPLES.value)
    base_width = _BASE_WIDTH.value or min(widths)
    study = sweep_study(base, _NAME.value, points, [int(s) for s in _SEEDS.value], base_width,
                        _HEAD_DIM.value, _MLP_RATIO.value)
    study.parallel, study.backend = _PARALLEL.value, _BACKEND.value
    study.lock_file, study.nice = _LOCK.value, _NICE.value
    out = _OUT.value or f"runs/sweeps/{_NAME.value}"
    command = shlex.join(["python", *sys.argv])
    rows = study_rows(study, out) if _ANALYZE_ONLY.value else run_study(study, out,
                                                                        command=command)
    analysis = write_sweep_results(out, rows, study, _RESULTS.value, command)
    for g in analysis["groups"]:
        best = ", ".join(f"w{w}: {v['best_lr']:.4g} ({v['shift_grid_steps']:+.1f})"
                         for w, v in sorted(g["widths"].items())
                         if v["shift_grid_steps"] is not None)
        print(f"{g['parametrization']} init {g['init_scale']:g} batch {g['batch_size']}: best LR "
              f"{best}; transfers within one grid step: {g['transfers']}")


if __name__ == "__main__":
    app.run(main)
