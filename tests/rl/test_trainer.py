"""The RL loop as a user runs it: ``launch/rl.py`` in a real subprocess, SIGKILLed in the middle
of a step's rollout and restarted, continues with the same replay buffer and gives the same later
steps; the config is validated field by field."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cpmjax.config import ConfigError
from cpmjax.rl.config import check_rl_config
from cpmjax.rl.prompts import run_tokenizer
from cpmjax.rl.trainer import RLTrainer
from cpmjax.train.rundir import RunDir, RunDirError
from tests.rl.helpers import toy_config

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("loss", "pg_loss", "kl", "clip_frac", "reward_mean", "rollout_tokens",
            "staleness_mean", "grad_norm", "buffered_trajectories", "entropy")


def _run(workdir: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch/rl.py", "--config=tests/rl/toy_rl_config.py",
           f"--workdir={workdir}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_sigkill_mid_rollout_resumes_with_the_same_buffer_and_losses(tmp_path):
    work = tmp_path / "run"
    killed = _run(work, CPMJAX_TEST_KILL_METRICS=str(work / "metrics.jsonl"),
                  CPMJAX_TEST_KILL_AFTER="5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    before = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in before] == list(range(6))  # eval at 0, steps 1-5, then killed

    resumed = _run(work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m = re.search(r"resumed from step (\d+) \(policy version (\d+), (\d+) unfinished", 
                  resumed.stdout)
    assert m, resumed.stdout[-2000:]
    start, buffered = int(m.group(1)), int(m.group(3))
    assert 2 <= start <= 4 and buffered > 0  # mid-trajectory state came back from the checkpoint
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(8))  # the recomputed steps logged once
    assert rows[:start + 1] == before[:start + 1]
    after = rows[start + 1:]
    overlap = range(start + 1, 6)
    assert len(overlap) >= 1
    for step in overlap:
        a = next(r for r in before if r["step"] == step)
        b = next(r for r in after if r["step"] == step)
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}, step
    assert any(r.get("staleness_max", 0) > 0 for r in after)  # chunks of older versions
    # tokens of older versions are off-policy: the ratio moves away from 1
    assert all(r["abs_log_ratio"] > 1e-4 for r in after if r.get("staleness_mean", 0) > 0)


@pytest.mark.parametrize("field,value,rule", [
    ("group_size", 1, ">= 2"), ("eps_low", 1.5, "in \\(0, 1\\)"), ("dual_clip", 0.5, "> 1"),
    ("loss_agg", "mean", "not one of"), ("overlong", "cut", "not one of"),
    ("stale_policy", "keep", "not one of"), ("chunk_tokens", 99, "<= rl.max_response"),
    ("minibatches", 3, "must divide"), ("temperature", 0.0, "> 0"),
    ("prompts", "nomodule", "module:factory"),
])
def test_config_errors_name_the_field(field, value, rule):
    cfg = toy_config()
    cfg.rl[field] = value
    with pytest.raises(ConfigError, match=f"rl.{field}'.*{rule}"):
        check_rl_config(cfg)


def test_a_workdir_in_use_or_of_another_config_is_refused_before_anything_runs(tmp_path):
    work = tmp_path / "run"
    with RunDir(work):  # another trainer holds the workdir
        with pytest.raises(RunDirError, match="in use by another trainer"):
            RLTrainer(toy_config(), work)
    RunDir(work).prepare(json.loads(toy_config().to_json_best_effort()), {},
                         run_tokenizer(toy_config()))
    other = toy_config()
    other.rl.eps_high = 0.3
    with pytest.raises(RunDirError, match="rl.eps_high"):
        RLTrainer(other, work)
    assert sorted(p.name for p in work.iterdir()) == ["config.json", "experiment.json",
                                                      "tokenizer", "train.lock"]
