"""Run an ablation study: ``python launch/ablate.py --study=configs/ablations/schedule.py``.

Any study field can be overridden (``--study.seeds=0,1 --study.parallel=2
--study.base.train.steps=100 --study.backend=ray``). Runs go to ``--out`` (default
``runs/ablations/<study name>``); rerunning skips finished runs and resumes interrupted ones.
``--status`` prints the progress view of a study running elsewhere.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from cpmjax.experiments.runner import run_study

_STUDY = config_flags.DEFINE_config_file("study", None, "study config file", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "output folder (default runs/ablations/<study name>)")
_STATUS = flags.DEFINE_bool("status", False, "print the progress of the study in --out and exit")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    study = _STUDY.value
    if study is None:
        raise app.UsageError("--study is required, e.g. --study=configs/ablations/schedule.py")
    out = Path(_OUT.value or f"runs/ablations/{study.name}")
    if _STATUS.value:
        progress = out / "progress.md"
        print(progress.read_text() if progress.is_file() else f"no progress file in {out}")
        return
    logging.set_verbosity(logging.WARNING)
    run_study(study, out, command=shlex.join(["python", *sys.argv]))


if __name__ == "__main__":
    app.run(main)
