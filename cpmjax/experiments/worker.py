"""One run of a study, in its own process: ``python -m cpmjax.experiments.worker RUN_DIR``.

Trains through the project's training entry point (``cpmjax.train.loop.train``, which resumes from
the newest good checkpoint in the folder), then runs the post-training evaluations that
``run.json`` asks for and writes ``result.json`` (``cpmjax.experiments.rundir``). A process per
run keeps one run's crash, memory and compilation caches away from the others.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from cpmjax.experiments import rundir


def evaluate_run(cfg: ml_collections.ConfigDict, run_dir: Path,
                 evaluate: dict[str, Any]) -> dict[str, Any]:
    """Post-training evaluations of the run's final checkpoint (empty when none is asked)."""
    if not evaluate.get("enabled"):
        return {}
    from cpmjax.experiments.indicator import evaluate_checkpoint

    return evaluate_checkpoint(str(run_dir), rows=int(evaluate.get("rows", 64)),
                               accuracy=bool(evaluate.get("accuracy")),
                               cache_dir=cfg.data.cache_dir)


def finish(run_dir: Path, wall_s: float | None = None) -> dict[str, Any]:
    """Evaluate a trained run and write its ``result.json`` (also used for runs trained
    elsewhere, e.g. on a pod, whose folder is reachable from here)."""
    spec = rundir.read_spec(run_dir)
    cfg = ml_collections.ConfigDict(spec["config"])
    return rundir.write_result(run_dir, evaluate_run(cfg, run_dir, spec.get("evaluate", {})),
                               wall_s)


def run(run_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``, evaluate it, write its result."""
    from cpmjax.train.loop import train

    run_dir = Path(run_dir)
    spec = rundir.read_spec(run_dir)
    t0 = time.time()
    train(ml_collections.ConfigDict(spec["config"]), str(run_dir),
          supervisor_files=rundir.SUPERVISOR_FILES)
    return finish(run_dir, time.time() - t0)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m cpmjax.experiments.worker RUN_DIR", file=sys.stderr)
        return 2
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file at INFO
    result = run(argv[1])
    print(f"result: {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
