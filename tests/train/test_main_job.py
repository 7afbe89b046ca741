"""The main job end to end (launch/train.py in subprocesses on the tiny preset, few short steps):
metrics.jsonl and TensorBoard output, a loadable final checkpoint, and exact resume after SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpmjax.train.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60
FIELDS = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time", "mfu"}


def _cmd(workdir: Path) -> list[str]:
    return [sys.executable, "launch/train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.train.steps={STEPS}", "--config.train.seq_len=128",
            "--config.train.global_batch_size=8", "--config.train.warmup_steps=5",
            "--config.train.log_every=1", "--config.train.eval_every=20",
            "--config.train.eval_batches=1", "--config.checkpoint.every=4",
            f"--config.data.cache_dir={ROOT / '.cache' / 'cpmjax'}"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _records(workdir: Path) -> dict[int, dict]:
    """Last record per step (a resumed run appends the steps it repeats)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("full")
    proc = subprocess.run(_cmd(work), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unigram baseline" in proc.stdout
    return work


def test_metrics_and_outputs(full_run: Path) -> None:
    recs = _records(full_run)
    assert sorted(recs) == list(range(1, STEPS + 1))
    for r in recs.values():
        assert FIELDS <= r.keys(), r
        assert r["mfu"] is None  # CPU: no meaningful peak unless train.peak_flops is set
        assert r["lr"] > 0
    assert recs[1]["step_time"] is None  # the first step (compilation) is not a throughput
    for r in list(recs.values())[1:]:
        assert r["tokens_per_sec"] > 0 and r["step_time"] > 0
    assert {s for s, r in recs.items() if "eval_loss" in r} == {20, 40, 60}
    assert recs[STEPS]["loss"] < recs[1]["loss"] - 0.5
    assert list((full_run / "tensorboard").glob("events.out.tfevents.*"))
    cfg, params = load_model(full_run)  # the run's workdir is a loadable model checkpoint
    assert cfg.hidden_size == 128 and params["embed"].shape == (4096, 128)
    import cpmjax  # a run loads with the tokenizer it trained with, so text prompts work

    model = cpmjax.load(full_run / "checkpoints")
    assert model.tokenizer is not None and model.tokenizer.get_vocab_size() == 4096


def test_sigkill_resume_is_bit_exact(full_run: Path, tmp_path: Path) -> None:
    work = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(work), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (work / "metrics.jsonl").is_file() and max(_records(work), default=0) >= 14:
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_records(work))
    assert killed_at < STEPS

    resumed = subprocess.run(_cmd(work), cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(resumed.stdout.split("resumed from step ")[1].split()[0])
    assert 4 <= start <= killed_at and start % 4 == 0
    want, got = _records(full_run), _records(work)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(start + 1, STEPS + 1):
        assert (got[step]["loss"], got[step]["grad_norm"]) == \
            (want[step]["loss"], want[step]["grad_norm"]), step
        assert got[step].get("eval_loss") == want[step].get("eval_loss")


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_nonfinite_policy_end_to_end(tmp_path: Path, mode: str) -> None:
    """A huge learning rate makes the first update overflow; every later step is non-finite."""
    cmd = [c for c in _cmd(tmp_path) if "train.steps" not in c] + [
        "--config.train.steps=4", "--config.train.lr=1e30", "--config.train.warmup_steps=0",
        f"--config.train.on_nonfinite={mode}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if mode == "stop":
        assert proc.returncode != 0
        assert "non-finite loss or gradient at step 2" in proc.stderr
        assert not (tmp_path / "checkpoints" / "4").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        recs = _records(tmp_path)
        assert [recs[s]["nonfinite_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 3]
        assert "updates were skipped" in proc.stderr


def _draft_cmd(workdir: Path, target: Path, *extra: str) -> list[str]:
    return [sys.executable, "launch/train.py", "--config=configs/tiny_draft.py",
            f"--workdir={workdir}", f"--config.train.freeze_target={target}",
            "--config.train.steps=40", "--config.train.seq_len=128",
            "--config.train.global_batch_size=8", "--config.train.warmup_steps=4",
            "--config.train.log_every=1", "--config.train.eval_every=40",
            "--config.train.eval_batches=1", "--config.checkpoint.every=40",
            f"--config.data.cache_dir={ROOT / '.cache' / 'cpmjax'}",
            "--config.data.train_files=", "--config.data.weights=", "--config.data.valid_file=",
            *extra]


def test_draft_training_on_a_frozen_target(full_run: Path, tmp_path: Path) -> None:
    """configs/tiny_draft.py trains only the draft head: the target's weights stay bit-identical,
    the MTP loss falls, the EAGLE-layout file loads, and the trained draft is accepted more often
    than an untrained one under speculative decoding; a target of another shape is refused."""
    import jax
    import numpy as np

    from cpmjax.model.mtp import init_mtp_params, load_mtp
    from cpmjax.serve.generate import speculative_generate

    work = tmp_path / "draft"
    proc = subprocess.run(_draft_cmd(work, full_run), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(work)
    assert recs[40]["mtp_loss"] < recs[1]["mtp_loss"] - 0.5, (recs[1], recs[40])
    cfg, target = load_model(full_run)
    _, kept = load_model(work)
    for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(a, b)
    draft = load_mtp(cfg, work / "draft.safetensors")
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, size=(4, 8)).tolist()
    _, before = speculative_generate(cfg, target, init_mtp_params(cfg, jax.random.key(5)),
                                     prompts, 24, k=3)
    _, after = speculative_generate(cfg, target, draft, prompts, 24, k=3)
    assert after["mean_accept_length"] > before["mean_accept_length"], (before, after)

    bad = subprocess.run(_draft_cmd(tmp_path / "bad", full_run, "--config.model.hidden_size=64"),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "differs" in bad.stderr and "hidden_size" in bad.stderr
