"""Training metrics: FLOP accounting for MFU, metrics.jsonl, TensorBoard and the progress line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

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
    TensorBoard, and prints a progress line."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        Path(workdir).mkdir(parents=True, exist_ok=True)
        self._jsonl = open(Path(workdir) / "metrics.jsonl", "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if v is not None)
        print(shown, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _clean(v: Any) -> Any:
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
