"""FLOP accounting for MFU and the metrics writer's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpmjax.config import ModelConfig
from cpmjax.train.metrics import MetricsWriter, device_peak_flops, flops_per_token
from tests.conftest import tiny_hf_config


def test_flops_per_token_by_hand() -> None:
    # d=64, I=96, L=3, H=4, KV=2, hd=16, V=97, untied head
    cfg = ModelConfig.from_hf_config(tiny_hf_config())
    per_layer = 64 * 4 * 16 * 2 + 64 * 2 * 16 * 2 + 3 * 64 * 96  # wq+wo, wk+wv, mlp
    norms = 3 * 2 * 64 + 64
    # N = all parameters but the input embedding (a lookup, not a matmul); the head counts
    matmul_params = 3 * per_layer + norms + 64 * 97
    attention = 6 * 3 * 128 * 4 * 16  # 12*L*T*H*hd for QK and AV (fwd+bwd), halved (causal)
    assert flops_per_token(cfg, 128) == 6 * matmul_params + attention
    tied = ModelConfig.from_hf_config(tiny_hf_config(tie_word_embeddings=True))
    assert flops_per_token(tied, 128) == flops_per_token(cfg, 128)  # the head is still counted


def test_peak_flops() -> None:
    assert device_peak_flops(989e12) == 989e12
    assert device_peak_flops() is None  # CPU: no meaningful peak


def test_writer_jsonl_and_tensorboard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    w = MetricsWriter(tmp_path)
    w.write(10, {"loss": 2.5, "lr": 1e-3, "mfu": None, "grad_norm": float("nan")})
    w.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec == {"step": 10, "loss": 2.5, "lr": 1e-3, "mfu": None, "grad_norm": None}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "step=10 loss=2.5" in capsys.readouterr().out
