"""Real training subprocesses for the fault tests: ``launch/train.py`` on a 2-layer, width-64
model over a small JSONL corpus with its own 512-token tokenizer, 32-token rows, batch 2, a save
every 2 steps. Runs start in the data folder with relative data paths (as a user's would), and
share a persistent JAX compilation cache so each process compiles once per session, not once per
run (about 1 s instead of 9 s a start on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 14
EVERY = 2


def model_args() -> list[str]:
    return ["--config.model.hidden_size=64", "--config.model.num_hidden_layers=2",
            "--config.model.intermediate_size=128", "--config.model.vocab_size=512"]


def train_args(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "train.py"),
            f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={workdir}", *model_args(),
            f"--config.train.steps={STEPS}", "--config.train.seq_len=32",
            "--config.train.global_batch_size=2", "--config.train.warmup_steps=2",
            "--config.train.log_every=1", "--config.train.eval_every=100",
            "--config.train.eval_batches=1", f"--config.checkpoint.every={EVERY}",
            "--config.checkpoint.keep=8", "--config.data.train_files=train.jsonl",
            "--config.data.valid_file=valid.jsonl", "--config.data.tokenizer=tok", *extra]


def env(cache: Path, fault: str | None = None) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    out.pop("CPMJAX_FAULT", None)
    if fault:
        out["CPMJAX_FAULT"] = fault
    return out


def train(data: Path, cache: Path, workdir: Path, *extra: str, fault: str | None = None,
          wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    """One trainer process to its end (or its kill), in the data folder."""
    return subprocess.run([*(wrap or []), *train_args(workdir, *extra)], cwd=data,
                          env=env(cache, fault), capture_output=True, text=True, timeout=300)


def records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def by_step(workdir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(workdir)}


def same_numbers(a: dict, b: dict) -> bool:
    """Bit-identical loss, gradient norm and (when there) held-out loss."""
    keys = ("loss", "grad_norm", "eval_loss", "nonfinite_steps")
    return all(a.get(k) == b.get(k) for k in keys)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file but the lock, to show that nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "train.lock"}


def write_corpus(folder: Path) -> Path:
    """train.jsonl / valid.jsonl from the interpreter's documentation topics, and a 512-token
    tokenizer trained on them (a second)."""
    import pydoc_data.topics

    from cpmjax.data.tokenizer import save_tokenizer, train_tokenizer

    docs = [v for _, v in sorted(pydoc_data.topics.topics.items())][:40]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:36]))
    (folder / "valid.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[36:]))
    save_tokenizer(train_tokenizer(docs, 512), folder / "tok")
    return folder
