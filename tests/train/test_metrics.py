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


def test_resume_keeps_one_row_per_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A killed run logged steps 1-7 (the last line torn) but its checkpoint is step 4: the
    resumed writer keeps rows 1-4 (one atomic rewrite) and appends from step 5."""
    rows = "".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 8))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 8, "lo')
    w = MetricsWriter(tmp_path, resume_step=4)
    assert "kept 4 row(s) up to step 4, dropped 4 row(s)" in capsys.readouterr().out
    for s in (5, 6):
        w.write(s, {"loss": 10.0 + s})
    w.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert got[4]["loss"] == 15.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".metrics")] == []
