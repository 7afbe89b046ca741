"""cpmjax.experiments.sweep: width overrides under muP and standard, grid and random points,
the analysis of optimum shifts in grid steps, its table and plot."""

from __future__ import annotations

import math

import pytest

from cpmjax.config import ConfigError, ModelConfig
from cpmjax.experiments.study import expand_runs
from cpmjax.experiments.sweep import (Point, analyze, fitted_optimum, grid_points,
                                      results_table, sweep_study, width_overrides,
                                      write_sweep_results)
from tests.experiments.helpers import micro_study

LRS = [0.004, 0.008, 0.016, 0.032]


def test_width_overrides_keep_m_one_under_standard():
    assert width_overrides(256, "mup", 32, 16, 3) == {
        "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 16,
        "num_key_value_heads": 16, "dim_model_base": 32}
    assert width_overrides(256, "standard", 32, 16, 3)["dim_model_base"] == 256
    with pytest.raises(ConfigError, match="multiple of head_dim"):
        width_overrides(40, "mup", 32, 16, 3)
    with pytest.raises(ConfigError, match="parametrization"):
        width_overrides(64, "ntk", 32, 16, 3)


def test_points_and_study():
    grid = grid_points(["mup", "standard"], [32, 64], LRS, [0.1], [8])
    assert len(grid) == 16 and grid[0] == Point("mup", 32, 0.004, 0.1, 8)
    assert [(p.width, p.parametrization) for p in grid[3:5]] == [(32, "mup"), (32, "standard")]
    assert grid[0].name == "mup_w32_lr0p004_init0p1_b8"
    rand = grid_points(["mup"], [32, 64], LRS, [0.05, 0.1], [8, 16], "random", 3, seed=1)
    assert len(rand) == 6 and [p.lr for p in rand[:3]] == [p.lr for p in rand[3:]]
    with pytest.raises(ConfigError, match="samples"):
        grid_points(["mup"], [32], LRS, [0.1], [8], "random", 99)
    study = sweep_study(micro_study().base, "sw", grid, seeds=(0, 1), base_width=32)
    runs = expand_runs(study)
    # the base width is one model under both parametrizations (m = 1): trained once
    assert len(runs) == 24 and not any(r.name.startswith("standard_w32") for r in runs)
    assert [p["variant"] for p in study.sweep.points if p["width"] == 32] == [
        p.name for p in grid[:4]] * 2
    cfg = {r.name: r.config for r in runs}["standard_w64_lr0p016_init0p1_b8-s1"]
    model = ModelConfig.from_hf_config(cfg.model.to_dict())
    assert model.width_multiplier == 1.0 and cfg.train.parametrization == "standard"
    assert cfg.train.lr == 0.016 and cfg.train.global_batch_size == 8 and cfg.train.seed == 1
    mup = {r.name: r.config for r in runs}["mup_w64_lr0p004_init0p1_b8-s0"]
    assert ModelConfig.from_hf_config(mup.model.to_dict()).width_multiplier == 2.0


def _rows(points, loss):
    return [{"run": f"{p.name}-s{s}", "variant": p.name, "seed": s, "status": "done",
             "final_eval_loss": loss(p, s)} for p in points for s in (0, 1)]


def test_fitted_optimum_is_the_parabola_vertex_in_log2_lr():
    lrs = [0.001, 0.002, 0.004, 0.008]
    assert fitted_optimum(lrs, [3.0 + (math.log2(lr) - math.log2(0.003)) ** 2 for lr in lrs]
                          ) == pytest.approx(0.003)
    assert fitted_optimum(lrs, [1.0, 2.0, 3.0, 4.0]) is None  # best at the grid's edge
    assert fitted_optimum(lrs, [2.0, 1.0, math.inf, 4.0]) is None  # a neighbour diverged


def test_analysis_finds_the_optimum_shift_in_grid_steps(tmp_path):
    points = grid_points(["mup", "standard"], [32, 128, 256], LRS, [0.1], [8])
    # muP: optimum at 0.016 for every width; standard: it halves with each width step
    best = {("mup", 32): 0.016, ("mup", 128): 0.016, ("mup", 256): 0.016,
            ("standard", 32): 0.016, ("standard", 128): 0.008, ("standard", 256): 0.004}

    def loss(p, seed):
        if p.parametrization == "standard" and p.width == 256 and p.lr == 0.032:
            return math.nan  # diverged: counts as +inf
        return 3.0 + math.log2(p.lr / best[p.parametrization, p.width]) ** 2 + 0.01 * seed

    study = sweep_study(micro_study().base, "sw", points, seeds=(0, 1), base_width=32)
    pts = [dict(p) for p in study.sweep.points]
    rows = [r for r in _rows(points, loss) if r["variant"] in {p["variant"] for p in pts}]
    res = analyze(rows, pts, base_width=32)
    mup, std = res["groups"]
    assert mup["parametrization"] == "mup" and mup["transfers"] and mup["max_abs_shift"] == 0
    assert std["widths"][32]["loss"] == mup["widths"][32]["loss"]  # the shared base runs
    assert std["widths"][256]["shift_grid_steps"] == -2.0 and not std["transfers"]
    assert std["widths"][256]["loss"][-1] == math.inf
    assert std["widths"][256]["at_grid_edge"] and std["widths"][256]["fit_best_lr"] is None
    assert std["widths"][128]["fit_shift_grid_steps"] == pytest.approx(-1.0)
    assert mup["widths"][128]["best_loss"] == pytest.approx(3.005)
    assert mup["widths"][128]["best_loss_std"] == pytest.approx(0.005)
    table = results_table(res)
    assert "| standard | 0.1 | 8 | 256 | 0.004 (edge) | 3.0050 ± 0.0050 | -2.00 | - | - |" in table
    assert "| standard | 0.1 | 8 | 128 | 0.008 | 3.0050 ± 0.0050 | -1.00 | 0.008 | -1.00 |" in table
    out = write_sweep_results(tmp_path, rows, study, tmp_path / "res", "python launch/sweep.py")
    assert out["groups"][1]["max_abs_shift"] == 2.0
    assert (tmp_path / "res.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "python launch/sweep.py" in (tmp_path / "res.md").read_text()
