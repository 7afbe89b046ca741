"""Training metrics: FLOP accounting for MFU, metrics.jsonl, TensorBoard and the progress line."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax

from cpmjax.atomic import is_remote, storage_path, write_text
from cpmjax.config import ModelConfig
from cpmjax.model import count_params

# bf16 dense peaks (DESIGN.md "Performance accounting")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v6e": 918e12, "TPU v6 lite": 918e12}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + causal attention (QK and AV, halved).

    The input embedding is a lookup, not a matmul: it counts only when tied (it is the head).
    """
    n = count_params(cfg)
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    attention = 6 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    return 6.0 * n + attention


def device_peak_flops(override: float | None = None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU): MFU is then not reported."""
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


class MetricsWriter:
    """Writes one JSON object per logged step to metrics.jsonl and the same scalars to
    TensorBoard, and prints a progress line.

    ``resume_step``: the step the run (re)starts from. Rows past it (steps a killed run logged
    after its last checkpoint, which this run computes again) and a torn last line are dropped
    first, in one atomic rewrite, and TensorBoard is told to purge its events past it, so each
    step has one row across resumes. On an object store (``gs://``), where files cannot be
    appended to, the whole file is rewritten at each write (it holds one small row per logged
    step).
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
                 resume_step: int = 0) -> None:
        self.enabled = enabled
        if not enabled:
            return
        work = storage_path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        self.path = work / "metrics.jsonl"
        self._rows = _rows_up_to(self.path, resume_step)
        self._file = None
        if not is_remote(self.path):
            self._file = open(self.path, "a", encoding="utf-8")
        self._tb = _summary_writer()(str(work / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._rows.append(line)
            write_text(self.path, "".join(self._rows))
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if v is not None)
        print(shown, flush=True)

    def close(self) -> None:
        if self.enabled:
            if self._file is not None:
                self._file.close()
            self._tb.close()


def _summary_writer() -> Any:
    """tensorboardX's SummaryWriter class. tensorboardX imports torch at import time when torch
    is installed (only to accept torch tensors, which these scalars never are), which cost every
    trainer start 1.5-5 s on 2 cores; torch is hidden for that one import unless it is loaded."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


def _rows_up_to(path: Any, step: int) -> list[str]:
    """The rows of an existing metrics.jsonl up to ``step``, rewritten atomically if any other
    row was there (each row is a whole line; a kill can tear only the last one)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        write_text(path, "".join(kept))
        print(f"{path}: kept {len(kept)} row(s) up to step {step}, dropped "
              f"{len(lines) - len(kept)} row(s) past it (this run computes those steps again)",
              flush=True)
    return kept


def _clean(v: Any) -> Any:
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
