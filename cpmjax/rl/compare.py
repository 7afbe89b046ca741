"""RL configs trained side by side in one process, step for step, and compared: step time,
rollout throughput and reward per generated token (``launch/bench.py rl``: chunk-wise vs vanilla
rollout, the comparison of MiniCPM4 report arXiv 2506.07900 §3.2's ablation table).

The runs alternate single steps, so load from other jobs on a shared machine falls on both
alike and their ratios stay meaningful where absolute times do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from cpmjax.rl.trainer import RLTrainer


def run_side_by_side(configs: dict[str, ml_collections.ConfigDict], workroot: str | Path,
                     steps: int) -> dict[str, list[dict[str, Any]]]:
    """Per run: its starting held-out evaluation (step 0) and the metrics of ``steps`` steps,
    the runs taking turns; each run's checkpoints go under ``workroot/<name>``."""
    trainers = {name: RLTrainer(cfg, Path(workroot) / name, write_metrics=False)
                for name, cfg in configs.items()}
    try:
        history = {name: [{"step": 0, "generated_tokens": 0, **t.evaluate()}]
                   for name, t in trainers.items()}
        for _ in range(steps):
            for name, t in trainers.items():
                history[name].append({"step": t.done + 1, **t.step()})
    finally:
        for t in trainers.values():
            t.close()
    return history


def _curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(generated tokens so far, held-out reward) at every evaluation."""
    return [(r["generated_tokens"], r["eval_reward"]) for r in records
            if r.get("eval_reward") is not None]


def _mean_of(steps: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in steps if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def summarize_run(records: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Timing over the steps after the first ``warmup`` (compilation), and the reward curve."""
    steps = [r for r in records if r["step"] > warmup]
    if not steps:
        raise ValueError(f"no steps after the {warmup} warm-up steps")
    rollout_s = sum(r["rollout_time"] for r in steps)
    lengths = [r["response_length_mean"] for r in steps if r.get("response_length_mean")]
    return {"steps_timed": len(steps),
            "step_time_mean": float(np.mean([r["step_time"] for r in steps])),
            "step_time_median": float(np.median([r["step_time"] for r in steps])),
            "rollout_time_mean": rollout_s / len(steps),
            "train_time_mean": float(np.mean([r.get("train_time", 0.0) for r in steps])),
            "rollout_tokens_per_sec": sum(r["rollout_tokens"] for r in steps) / rollout_s,
            "generated_tokens": records[-1]["generated_tokens"],
            "trained_response_length_mean": float(np.mean(lengths)) if lengths else None,
            "trained_response_length_p50_mean": _mean_of(steps, "response_length_p50"),
            "trained_response_length_p90_mean": _mean_of(steps, "response_length_p90"),
            "trained_response_length_max_mean": _mean_of(steps, "response_length_max"),
            "rounds_mean": float(np.mean([r["rounds"] for r in steps])),
            "staleness_mean": float(np.mean([r.get("staleness_mean", 0.0) for r in steps])),
            "eval_curve": _curve(records),
            "train_reward_curve": [(r["generated_tokens"], r["reward_mean"]) for r in records
                                   if r.get("reward_mean") is not None]}


def reward_at_matched_tokens(curve: list[tuple[int, float]], baseline: list[tuple[int, float]]
                             ) -> float:
    """Mean of (curve - baseline) held-out reward at the curve's evaluation points inside the
    baseline's token range, the baseline interpolated linearly in generated tokens: >= 0 means
    no worse per generated token."""
    bx, by = (np.asarray(v, float) for v in zip(*baseline))
    points = [(x, y) for x, y in curve if bx[0] <= x <= bx[-1]]
    if not points:
        raise ValueError("the curves share no range of generated tokens")
    return float(np.mean([y - np.interp(x, bx, by) for x, y in points]))
