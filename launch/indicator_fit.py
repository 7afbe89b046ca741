"""How well the ScalingBench-style indicator predicts task accuracy, across studies' models.

    python launch/indicator_fit.py --studies=runs/ablations/task_mix,runs/sweeps/mup_transfer \\
        --evaluate_missing --out=bench/results/indicator_fit

Fits accuracy = sigmoid(a * x + b) for x = the indicator and for x = held-out LM loss over every
finished run of the studies (runs evaluated without indicator/accuracy are evaluated with
``--evaluate_missing``), and writes ``<out>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from absl import app, flags, logging

from cpmjax.experiments.indicator import study_points, write_predictor_report

_STUDIES = flags.DEFINE_list("studies", None, "study folders (launch/ablate.py or sweep.py --out)")
_ROWS = flags.DEFINE_integer("rows", 64, "held-out problems per model")
_MISSING = flags.DEFINE_bool("evaluate_missing", False, "evaluate runs that lack the numbers")
_OUT = flags.DEFINE_string("out", "bench/results/indicator_fit", "output path, no extension")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    if not _STUDIES.value:
        raise app.UsageError("--studies is required")
    points = study_points(_STUDIES.value, _ROWS.value, _MISSING.value)
    result = write_predictor_report(points, _OUT.value, shlex.join(["python", *sys.argv]))
    print(Path(_OUT.value).with_suffix(".md").read_text())
    print(f"{result['models']} models; plot {Path(_OUT.value).with_suffix('.png')}")


if __name__ == "__main__":
    app.run(main)
