"""The record of an RL run: its metrics.jsonl as one JSON file with the starting and final
held-out reward, and a reward-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cpmjax.atomic import atomic_file, write_json


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """Per-step records of a run, one per step (a step recomputed after a restart keeps its
    newest record), in step order."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(Path(workdir) / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Starting policy's (step 0) and final held-out reward, and the reward curve."""
    evals = [r for r in records if r.get("eval_reward") is not None]
    if not evals:
        raise ValueError("the run has no held-out evaluation")
    return {"start_eval_reward": evals[0]["eval_reward"], "start_step": evals[0]["step"],
            "final_eval_reward": evals[-1]["eval_reward"], "final_step": evals[-1]["step"],
            "eval_curve": [(r["step"], r["eval_reward"]) for r in evals],
            "train_reward_curve": [(r["step"], r["reward_mean"]) for r in records
                                   if r.get("reward_mean") is not None]}


def plot_curves(path: str | Path, curves: dict[str, list[tuple[float, float]]], xlabel: str,
                title: str) -> None:
    """One line per named curve of (x, reward) points, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def write_report(workdir: str | Path, out: str | Path, extra: dict[str, Any]) -> dict[str, Any]:
    """``out``.json (summary, ``extra``, every step's metrics) and ``out``.png (train reward per
    step and held-out reward) from the run in ``workdir``."""
    records = read_metrics(workdir)
    summary = {**summarize(records), **extra, "steps": records}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), summary)
    plot_curves(out.with_suffix(".png"),
                {"train reward (rollout samples)": summary["train_reward_curve"],
                 "held-out reward": summary["eval_curve"]},
                "RL step", "RL reward")
    return summary
