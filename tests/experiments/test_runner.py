"""cpmjax.experiments.runner / study / report: expansion and override checks, skipping finished
runs, retrying crashed ones, refusing a folder of another config, the table, curves and progress
view. The backend here is an in-process stand-in for the worker (the real worker runs in
test_backends.py), so these tests run in seconds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cpmjax.config import ConfigError
from cpmjax.experiments import rundir
from cpmjax.experiments.runner import run_study
from cpmjax.experiments.study import apply_overrides, expand_runs
from tests.experiments.helpers import micro_study

PNG = b"\x89PNG\r\n\x1a\n"


class FakeJob:
    """Finishes on its second poll like a worker would: metrics.jsonl, then result.json (or a
    crash with exit status 1)."""

    def __init__(self, run_dir: Path, crash: bool) -> None:
        self.run_dir, self.crash, self.polls, self.cancelled = run_dir, crash, 0, False

    def poll(self) -> int | None:
        self.polls += 1
        if self.polls < 2:
            return None
        if self.crash:
            (self.run_dir / rundir.LOG).write_text("Traceback\nRuntimeError: boom\n")
            return 1
        spec = rundir.read_spec(self.run_dir)
        lr = spec["config"]["train"]["lr"]
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            for step in (1, 2, 3):
                rec = {"step": step, "loss": 5.0 - step * lr, "lr": lr, "grad_norm": 1.0,
                       "tokens_per_sec": 100.0 * step}
                if step % 2 == 0 or step == 3:
                    rec["eval_loss"] = 6.0 - step * lr
                f.write(json.dumps(rec) + "\n")
            f.write('{"step": 4, "lo')  # a torn line from a killed writer is ignored
        rundir.write_result(self.run_dir, {}, 1.0)
        return 0

    def cancel(self) -> None:
        self.cancelled = True


class FakeBackend:
    evaluates = True

    def __init__(self, slots: int = 2, crash: tuple[str, ...] = ()) -> None:
        self.slots, self.crash, self.started, self.jobs = slots, crash, [], []

    def start(self, run_dir: Path) -> FakeJob:
        self.started.append(run_dir.name)
        job = FakeJob(run_dir, any(run_dir.name.startswith(c) for c in self.crash))
        self.jobs.append(job)
        return job

    def close(self) -> None:
        pass


def _study(**kw):
    return micro_study(variants={"lo": {"train": {"lr": 0.1}}, "hi": {"train": {"lr": 0.5}},
                                 "bad": {}}, seeds=(0, 1), **kw)


def test_expand_runs_applies_overrides_and_refuses_bad_fields():
    study = _study()
    study.overrides = {"train": {"steps": 7}, "model": {"sparse_config": {"topk": 4}}}
    runs = expand_runs(study)
    assert [r.name for r in runs] == ["lo-s0", "lo-s1", "hi-s0", "hi-s1", "bad-s0", "bad-s1"]
    assert [r.config.train.seed for r in runs] == [0, 1] * 3
    assert runs[2].config.train.lr == 0.5 and runs[0].config.train.steps == 7
    assert runs[0].config.model.sparse_config.topk == 4  # new config.json keys are allowed
    assert len({r.config_hash for r in runs}) == 6
    with pytest.raises(ConfigError, match="variant 'x'.*'train.shedule' does not exist"):
        apply_overrides(study.base, {"train": {"shedule": "cosine"}}, "variant 'x'")
    with pytest.raises(ConfigError, match="'train.steps'"):
        apply_overrides(study.base, {"train": {"steps": 1.5}}, "variant 'x'")
    for field, value, msg in (("seeds", [], "seeds"), ("seeds", [0, 0], "repeats"),
                              ("backend", "slurm", "backend"), ("parallel", 0, "parallel"),
                              ("name", "a b", "name")):
        bad = _study()
        bad[field] = value
        with pytest.raises(ConfigError, match=msg):
            expand_runs(bad)
    pod = _study()
    pod.backend = "tpu_pod"
    with pytest.raises(ConfigError, match="tpu.name"):
        expand_runs(pod)


def test_runner_skips_finished_retries_crashes_and_writes_the_table(tmp_path):
    study, out, lines = _study(), tmp_path / "study", []
    (out / "runs" / "lo-s1" / rundir.CKPT_DIR / "2").mkdir(parents=True)  # an interrupted run
    backend = FakeBackend(crash=("bad",))
    rows = run_study(study, out, backend=backend, poll_s=0.0, echo=lines.append)
    # every run started; each crashed run got max_attempts=2 starts; the others were not stopped
    assert sorted(backend.started) == sorted(["lo-s0", "lo-s1", "hi-s0", "hi-s1"]
                                             + ["bad-s0", "bad-s1"] * 2)
    assert any(line.startswith("lo-s1: resuming from step 2") for line in lines)
    assert any("bad-s0: failed (exit 1)" in line and "RuntimeError: boom" in line
               for line in lines)
    status = {r["run"]: r["status"] for r in rows}
    assert status == {"lo-s0": "done", "lo-s1": "done", "hi-s0": "done", "hi-s1": "done",
                      "bad-s0": "failed", "bad-s1": "failed"}
    by_run = {r["run"]: r for r in rows}
    assert by_run["hi-s0"]["final_eval_loss"] == pytest.approx(6.0 - 3 * 0.5)
    assert by_run["hi-s0"]["best_eval_loss"] == pytest.approx(6.0 - 3 * 0.5)
    assert by_run["hi-s0"]["tokens_per_sec"] == 200.0 and by_run["hi-s0"]["steps"] == 3
    with open(out / "summary.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == [r["run"] for r in rows]
    md = (out / "summary.md").read_text()
    assert "| hi | 2/2 | 4.5000 ± 0.0000 |" in md and "| bad | 0/2 | - |" in md
    for metric in ("loss", "eval_loss", "grad_norm", "lr"):
        assert (out / "curves" / f"{metric}.png").read_bytes()[:8] == PNG
    progress = (out / "progress.md").read_text()
    assert progress.startswith("study micro: 4 done, 0 running, 0 queued, 2 failed")
    assert "hi-s1   done     step 3/4  loss 3.5000  eval 4.5000" in progress

    from cpmjax.experiments.runner import study_rows

    on_disk = study_rows(study, out)  # runs nothing
    assert [r["status"] for r in on_disk] == ["done"] * 4 + ["missing"] * 2
    assert on_disk[2]["final_eval_loss"] == rows[2]["final_eval_loss"]

    # a rerun skips the finished runs and retries only the failed ones
    again = FakeBackend(crash=())
    rows2 = run_study(study, out, backend=again, poll_s=0.0, echo=lines.append)
    assert sorted(again.started) == ["bad-s0", "bad-s1"]
    assert [r["status"] for r in rows2] == ["done"] * 6
    assert [r["final_eval_loss"] for r in rows2[:4]] == [r["final_eval_loss"] for r in rows[:4]]


def test_a_folder_of_another_config_is_refused_and_kept(tmp_path):
    study, out = _study(), tmp_path / "study"
    run_study(study, out, backend=FakeBackend(), poll_s=0.0, echo=lambda s: None)
    before = (out / "runs" / "lo-s0" / rundir.RESULT).read_text()
    changed = _study()
    changed.variants.lo.train.lr = 0.2
    with pytest.raises(ConfigError, match="run 'lo-s0'.*holds a run of another config"):
        run_study(changed, out, backend=FakeBackend(), poll_s=0.0, echo=lambda s: None)
    assert (out / "runs" / "lo-s0" / rundir.RESULT).read_text() == before


def test_an_interrupt_cancels_the_running_jobs(tmp_path):
    backend = FakeBackend(slots=2)

    def echo(line: str) -> None:
        if line.startswith("study micro"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(_study(), tmp_path / "s", backend=backend, poll_s=0.0, echo=echo)
    assert len(backend.jobs) == 2 and all(j.cancelled for j in backend.jobs)
    # the config file written for the run loads as a launch/train.py config
    ns: dict = {}
    exec((tmp_path / "s" / "runs" / "lo-s0" / rundir.CONFIG_PY).read_text(), ns)
    assert ns["get_config"]().train.lr == 0.1


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs" /
                                         "ablations").glob("*.py")), ids=lambda p: p.stem)
def test_shipped_studies_expand_to_valid_model_configs(path):
    from cpmjax.config import ModelConfig
    from cpmjax.experiments.study import config_from_file

    runs = expand_runs(config_from_file(path))
    assert len(runs) >= 2
    for r in runs:
        ModelConfig.from_hf_config(r.config.model.to_dict())


def test_sigterm_cancels_the_running_jobs_too(tmp_path):
    import os
    import signal

    backend = FakeBackend(slots=1)

    def echo(line: str) -> None:
        if line.startswith("study micro"):
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="signal"):
        run_study(_study(), tmp_path / "s", backend=backend, poll_s=0.0, echo=echo)
    assert backend.jobs[0].cancelled and signal.getsignal(signal.SIGTERM) is previous
