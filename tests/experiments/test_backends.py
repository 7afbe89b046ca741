"""Backends of the ablation runner: a real run as a Ray task on a local Ray cluster (1 CPU) that
the test starts, through the real worker, training loop and indicator evaluation; and the
TPU-pod backend's call of launch/tpu_pod.sh (gcloud replaced by a script on PATH that records
its arguments and plays the pod's part by writing the run's metrics)."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest

from cpmjax.experiments import rundir
from cpmjax.experiments.backends import RayBackend, TpuPodBackend
from cpmjax.experiments.runner import run_study
from tests.experiments.helpers import micro_study


def test_ray_backend_runs_the_worker_as_a_ray_task(tmp_path):
    ray = pytest.importorskip("ray")
    study = micro_study(name="rayed")
    study.backend = "ray"
    study.indicator.update(enabled=True, rows=8, accuracy=True)
    out = tmp_path / "study"
    backend = RayBackend(1, {"num_cpus": 1.0}, num_cpus=1)
    try:
        assert ray.cluster_resources().get("CPU") == 1.0
        rows = run_study(study, out, backend=backend, poll_s=0.5, echo=lambda s: None)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    (row,) = rows
    log = (out / "runs" / "wsd-s0" / rundir.LOG).read_text()
    assert row["status"] == "done", log[-2000:]
    assert "(ray task)" in log and "training rayed/wsd-s0: 4 steps" in log
    assert row["steps"] == 4 and math.isfinite(row["final_eval_loss"])
    # the worker evaluated the trained run: indicator and greedy accuracy in the table
    assert math.isfinite(row["indicator"]) and 0.0 <= row["accuracy"] <= 1.0
    assert rundir.checkpoint_steps(out / "runs" / "wsd-s0") == [2, 4]
    # a rerun finds the run finished and starts nothing (no backend is even created)
    assert run_study(study, out, echo=lambda s: None) == rows


def test_tpu_pod_backend_calls_the_pod_script_and_evaluates_here(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    # the pod's part: record the call; the command's --workdir gets two metrics records
    gcloud.write_text("#!/usr/bin/env bash\n"
                      f"printf '%s\\n' \"$@\" > {tmp_path}/gcloud_args\n"
                      "workdir=$(printf '%s\\n' \"$@\" | grep -o -- '--workdir=[^ ]*' "
                      "| sed 's/--workdir=//')\n"
                      "printf '{\"step\": 1, \"loss\": 3.0}\\n{\"step\": 2, \"loss\": 2.5, "
                      "\"eval_loss\": 2.75}\\n' > $workdir/metrics.jsonl\n")
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    study = micro_study(name="pod")
    study.backend, study.tpu.name, study.tpu.zone = "tpu_pod", "my-v5p-64", "us-east5-a"
    out = tmp_path / "study"
    (row,) = run_study(study, out, backend=TpuPodBackend("my-v5p-64", "us-east5-a"),
                       poll_s=0.1, echo=lambda s: None)
    args = (tmp_path / "gcloud_args").read_text().splitlines()
    assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5p-64"]
    assert "--zone=us-east5-a" in args and "--worker=all" in args
    command = args[-1].split("--command=", 1)[-1]
    run_dir = out / "runs" / "wsd-s0"
    assert f"launch/train.py --config={run_dir / rundir.CONFIG_PY}" in command
    assert f"--workdir={run_dir}" in command
    assert row["status"] == "done" and row["final_eval_loss"] == 2.75 and row["steps"] == 2
    assert json.loads((run_dir / rundir.RESULT).read_text())["final_loss"] == 2.5
