"""A study's runs on disk, one folder each (``<out>/runs/<name>/``):

- ``run.json``: the run's name, variant, seed, resolved config and its hash, and what is
  evaluated after training (written before the run starts);
- ``config.py``: the same config as a config file, so the run can be repeated or resumed by hand
  (``python launch/train.py --config=<dir>/config.py --workdir=<dir>``) or on a pod
  (``launch/tpu_pod.sh``);
- the training run's own files (``metrics.jsonl``, ``checkpoints/``, TensorBoard events);
- ``log.txt``: the worker's output, every attempt appended;
- ``result.json``: written last, atomically, once training and evaluation finished; its presence
  (with the same config hash) is what makes a rerun skip the run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from cpmjax.atomic import write_json, write_text
from cpmjax.config import ConfigError
from cpmjax.experiments.study import Run

RUN_SPEC, RESULT, LOG, CONFIG_PY = "run.json", "result.json", "log.txt", "config.py"
CKPT_DIR = "checkpoints"
# the runner's own files in a run folder; the training loop's RunDir leaves them alone
SUPERVISOR_FILES = (RUN_SPEC, RESULT, LOG, CONFIG_PY)

_CONFIG_PY = '''"""Run {name!s} of study {study!s} (written by cpmjax.experiments): its config.

    python launch/train.py --config={path!s} --workdir={workdir!s}
"""
import json

import ml_collections

_CONFIG = json.loads({text!r})


def get_config():
    return ml_collections.ConfigDict(_CONFIG)
'''


def prepare(run: Run, run_dir: Path, study: str, evaluate: dict[str, Any]) -> None:
    """Write ``run.json`` and ``config.py``; a folder holding a run of another config is refused
    (nothing the user had is overwritten)."""
    spec_file = run_dir / RUN_SPEC
    if spec_file.is_file():
        old = json.loads(spec_file.read_text())
        if old.get("config_hash") != run.config_hash:
            raise ConfigError(f"run {run.name!r}: {run_dir} holds a run of another config "
                              f"(hash {old.get('config_hash')} vs {run.config_hash}); remove that "
                              "folder or use another output folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(spec_file, {"name": run.name, "variant": run.variant, "seed": run.seed,
                           "study": study, "config_hash": run.config_hash,
                           "config": run.config.to_dict(), "evaluate": evaluate})
    text = json.dumps(run.config.to_dict(), sort_keys=True)
    write_text(run_dir / CONFIG_PY, _CONFIG_PY.format(name=run.name, study=study, text=text,
                                                      path=run_dir / CONFIG_PY, workdir=run_dir))


def read_spec(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / RUN_SPEC).read_text())


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """The finished run's result, or None (not finished, or finished under another config)."""
    try:
        result = json.loads((run_dir / RESULT).read_text())
        spec = read_spec(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return result if result.get("config_hash") == spec.get("config_hash") else None


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Training-checkpoint steps present in the run (what an interrupted run resumes from)."""
    d = run_dir / CKPT_DIR
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def read_metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The last record per step of ``metrics.jsonl`` (a resumed run logs repeated steps again);
    a torn last line (a killed writer) is ignored."""
    path = run_dir / "metrics.jsonl"
    records: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            records[r["step"]] = r
    return dict(sorted(records.items()))


def summarize_metrics(records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Final and best held-out loss, final train loss, median tokens/s, last step."""
    evals = [r["eval_loss"] for r in records.values() if r.get("eval_loss") is not None]
    tps = [r["tokens_per_sec"] for r in records.values() if r.get("tokens_per_sec")]
    last = records[max(records)] if records else {}
    return {"steps": max(records) if records else 0,
            "final_eval_loss": evals[-1] if evals else None,
            "best_eval_loss": min(evals) if evals else None,
            "final_loss": last.get("loss"),
            "tokens_per_sec": statistics.median(tps) if tps else None}


def write_result(run_dir: Path, evaluations: dict[str, Any], wall_s: float | None) -> dict:
    """``result.json`` from the run's metrics plus the post-training ``evaluations``."""
    spec = read_spec(run_dir)
    result = {"name": spec["name"], "variant": spec["variant"], "seed": spec["seed"],
              "config_hash": spec["config_hash"], **summarize_metrics(read_metrics(run_dir)),
              **evaluations, "wall_s": None if wall_s is None else round(wall_s, 1)}
    write_json(run_dir / RESULT, result)
    return result
