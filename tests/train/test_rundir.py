"""Run directories: one trainer per workdir (a lock that a killed trainer cannot leave behind),
one config per run (a different one is refused before anything is written, unless --new_run,
which moves the old run aside), a run that finds its tokenizer from any working directory, and
workdirs on object stores (gs://) that keep their URL."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cpmjax.train.rundir import (LOCK_FILE, RunDir, RunDirError, config_differences)
from tests.train import runs

EXPERIMENT = {"name": "t", "model": {"hidden_size": 64, "rope_scaling": {"factor": 2.0}},
              "train": {"lr": 0.01, "steps": 10, "seed": 0}, "data": {"tokenizer": ""}}


def _tokenizer(folder: Path, text: str = "{}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(text)
    return folder


def test_second_trainer_on_a_locked_workdir_is_refused(train_data, jax_cache, tmp_path) -> None:
    work = tmp_path / "run"
    with RunDir(work):  # this test process is the first trainer
        done = runs.train(train_data, jax_cache, work)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train: error: {work} is in use by another trainer (pid "
                           f"{os.getpid()} on host {socket.gethostname()}, started "), last
    assert sorted(p.name for p in work.iterdir()) == [LOCK_FILE]  # nothing else written
    assert (work / LOCK_FILE).read_text() == ""  # released cleanly


def test_lock_is_exclusive_and_a_dead_holder_is_stale(tmp_path, capsys) -> None:
    with RunDir(tmp_path):
        with pytest.raises(RunDirError, match=f"in use by another trainer \\(pid {os.getpid()}"):
            RunDir(tmp_path).acquire()
    # a trainer killed while holding the lock leaves its record but no lock (flock dies with it)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "h", "started": "t"}))
    with RunDir(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "previous trainer (pid 999999 on host h, started t) stopped without releasing it" \
        in capsys.readouterr().out


def test_config_differences_name_fields_and_allow_resumable_ones() -> None:
    new = json.loads(json.dumps(EXPERIMENT))
    new["model"]["rope_scaling"]["factor"] = 4.0
    new["train"].update(lr=0.02, steps=20)  # steps may change on resume
    new["train"]["added_field"] = 1  # absent from the stored run: not a difference
    assert config_differences(EXPERIMENT, new) == [
        "model.rope_scaling.factor (run: 2.0, now: 4.0)", "train.lr (run: 0.01, now: 0.02)"]
    assert config_differences(EXPERIMENT, EXPERIMENT) == []


def test_prepare_refuses_before_writing_and_new_run_moves_aside(tmp_path) -> None:
    work, tok = tmp_path / "run", _tokenizer(tmp_path / "tok")
    RunDir(work).prepare(EXPERIMENT, {"hidden_size": 64}, str(tok))
    assert (work / "tokenizer" / "tokenizer.json").read_text() == "{}"
    (work / "metrics.jsonl").write_text('{"step": 1}\n')
    before = runs.snapshot(work)
    other = dict(EXPERIMENT, train={"lr": 0.5, "steps": 10, "seed": 0})
    with pytest.raises(RunDirError, match=r"different config: train.lr \(run: 0.01, now: 0.5\)"
                                          r".*Nothing was written.*--new_run"):
        RunDir(work).prepare(other, {"hidden_size": 64}, str(tok))
    with pytest.raises(RunDirError, match="data.tokenizer.*differs from the tokenizer this run"):
        RunDir(work).prepare(EXPERIMENT, {}, str(_tokenizer(tmp_path / "tok2", '{"x": 1}')))
    assert runs.snapshot(work) == before
    RunDir(work).prepare(other, {"hidden_size": 64}, str(tok), new_run=True)
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.prev-")]
    assert runs.snapshot(old) == before  # moved whole, nothing deleted or rewritten
    assert json.loads((work / "experiment.json").read_text())["train"]["lr"] == 0.5
    assert not (work / "metrics.jsonl").exists()


def test_a_folder_that_is_not_a_run_is_refused(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="holds no cpmjax run .*notes.txt.*Nothing was written"):
        RunDir(tmp_path).prepare(EXPERIMENT, {}, str(_tokenizer(tmp_path.parent / "t")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_supervisors_files_are_not_foreign_and_stay_on_a_new_run(tmp_path) -> None:
    work, tok = tmp_path / "run", str(_tokenizer(tmp_path / "t"))
    work.mkdir()
    (work / "run.json").write_text("{}")  # e.g. the ablation runner's run spec
    RunDir(work, supervisor_files=["run.json"]).prepare(EXPERIMENT, {}, tok)
    RunDir(work, supervisor_files=["run.json"]).prepare(EXPERIMENT, {}, tok, new_run=True)
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.prev-")]
    assert (work / "run.json").read_text() == "{}" and not (old / "run.json").exists()
    assert (old / "experiment.json").is_file()


def test_training_another_config_in_a_run_is_refused_then_new_run(reference_run, train_data,
                                                                   jax_cache, tmp_path) -> None:
    work = tmp_path / "run"
    shutil.copytree(reference_run, work)
    before = runs.snapshot(work)
    done = runs.train(train_data, jax_cache, work, "--config.train.lr=0.02",
                      "--config.model.intermediate_size=96")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert (f"train: error: {work} holds a run with a different config: "
            "model.intermediate_size (run: 128, now: 96); train.lr (run: 0.01, now: 0.02). "
            "Nothing was written.") in last
    assert runs.snapshot(work) == before
    done = runs.train(train_data, jax_cache, work, "--config.train.lr=0.02",
                      "--config.model.intermediate_size=96", "--config.train.steps=2",
                      "--new_run")
    assert done.returncode == 0, done.stderr[-2000:]
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.prev-")]
    assert runs.snapshot(old) == before
    assert f"moved the previous contents of {work} to {old}" in done.stdout
    assert sorted(runs.by_step(work)) == [1, 2]
    assert json.loads((work / "experiment.json").read_text())["train"]["lr"] == 0.02


def test_run_finds_its_tokenizer_from_any_directory(reference_run, tmp_path,
                                                    monkeypatch) -> None:
    """The run was trained with ``data.tokenizer=tok`` relative to its data folder; generating
    from another directory finds the copy the run keeps."""
    import cpmjax

    monkeypatch.chdir(tmp_path)
    assert cpmjax.load(reference_run).tokenizer.get_vocab_size() == 512
    env = {**os.environ, "PYTHONPATH": str(runs.ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(runs.ROOT / "launch" / "generate.py"),
                           f"--checkpoint={reference_run}", "--prompt=The", "--max_new_tokens=3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[3 tokens in" in done.stderr


def test_exports_of_a_run_carry_its_tokenizer(reference_run, tmp_path) -> None:
    import cpmjax
    from cpmjax.train.checkpoint import save_model

    model = cpmjax.load(reference_run)
    hf = cpmjax.save_hf(model, tmp_path / "hf")
    ours = save_model(model.config, model.params, tmp_path / "cpmjax",
                      tokenizer=model.tokenizer_path)
    for out in (hf, ours):
        assert (out / "tokenizer.json").read_bytes() == \
            (reference_run / "tokenizer" / "tokenizer.json").read_bytes()
        assert cpmjax.load(out).tokenizer.get_vocab_size() == 512
    with pytest.raises(FileExistsError, match="contains the source"):
        cpmjax.save_hf(model, reference_run.parent, overwrite=True)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """epath's gs:// backend redirected to tmp_path/bucket, recording the URLs it is given; the
    working directory is tmp_path/cwd, where a path mangled to gs:/bucket would land instead."""
    from etils.epath import testing

    seen: list[str] = []
    root = tmp_path / "bucket"

    def local(arg):
        if not isinstance(arg, (str, os.PathLike)) or not os.fspath(arg).startswith("gs://"):
            return arg
        seen.append(os.fspath(arg))
        return os.fspath(arg).replace("gs://bucket", str(root), 1)

    def redirect(name):
        def fn(original, *args, **kwargs):
            args = [local(a) for a in args]
            if name == "open" and "w" in args[1]:  # an object store has no folders to make
                Path(args[0]).parent.mkdir(parents=True, exist_ok=True)
            if name == "walk":  # answers in URLs, as the real backend does
                return ((os.fspath(d).replace(str(root), "gs://bucket", 1), sub, files)
                        for d, sub, files in original(*args, **kwargs))
            return original(*args, **kwargs)
        return fn

    names = ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rename",
             "replace", "rmtree", "stat", "walk", "glob", "copy")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with testing.mock_epath(**{n: redirect(n) for n in names}):
        yield root, seen
    assert not any(cwd.iterdir()), "a gs:// path was turned into a local one"


def test_gs_workdir_keeps_its_url(fake_gcs, tmp_path, monkeypatch) -> None:
    import tensorboardX

    from cpmjax.train.checkpoint import check_sealed, seal
    from cpmjax.train.metrics import MetricsWriter

    root, seen = fake_gcs
    run = RunDir("gs://bucket/run")
    assert str(run.path) == "gs://bucket/run"
    with run:  # no file lock on an object store; nothing local is created
        run.prepare(EXPERIMENT, {"hidden_size": 64}, str(_tokenizer(tmp_path / "tok")))
    assert json.loads((root / "run" / "experiment.json").read_text()) == EXPERIMENT
    assert (root / "run" / "tokenizer" / "tokenizer.json").is_file()

    monkeypatch.setattr(tensorboardX, "SummaryWriter", lambda *a, **k: _NoTensorBoard(a))
    writer = MetricsWriter("gs://bucket/run", resume_step=0)
    writer.write(1, {"loss": 2.0})
    writer.write(2, {"loss": 1.5})
    writer.close()
    assert writer._tb.args == ("gs://bucket/run/tensorboard",)
    rows = [json.loads(r) for r in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    MetricsWriter("gs://bucket/run", resume_step=1).close()
    assert (root / "run" / "metrics.jsonl").read_text().count("step") == 1

    step = root / "run" / "checkpoints" / "3"
    (step / "state").mkdir(parents=True)
    (step / "state" / "a").write_bytes(b"x" * 100)
    seal("gs://bucket/run/checkpoints/3")
    assert check_sealed("gs://bucket/run/checkpoints/3") is None
    (step / "state" / "a").write_bytes(b"y" * 100)
    assert check_sealed("gs://bucket/run/checkpoints/3")[0] == "damaged"
    assert "gs://bucket/run/checkpoints/3/cpmjax_integrity.json" in seen


class _NoTensorBoard:
    """Stands in for tensorboardX's writer, whose gs:// support needs google-cloud-storage."""

    def __init__(self, args: tuple) -> None:
        self.args = args

    def add_scalar(self, *args) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
