"""ModelTunnel v2-style hyperparameter sweeps (MiniCPM4 report, arXiv 2506.07900 §2.3.1): grid or
random search over learning rate, init scale and batch size at small widths under muP, each point
a run of the ablation runner, and the LR-transfer check muP papers show (Tensor Programs V, Yang
et al. 2022, arXiv:2203.03466, Fig. 1): the loss-optimal LR at the base width should stay put as
the width grows under muP and move under the standard parametrization.

Widths keep head_dim, depth and the MLP ratio fixed; heads grow with width. muP: dim_model_base =
the base width, so m = width / base (hidden LR / m, init std / sqrt(m), logits / m;
``cpmjax.train.optimizer``). Standard: the same model with m = 1 at every width (dim_model_base =
width, standard init, one LR for every group); at the base width the two are the same model.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ml_collections

from cpmjax.atomic import write_json, write_text
from cpmjax.config import ConfigError
from cpmjax.experiments.study import study_config
from cpmjax.plotting import pyplot, save_png

PARAMETRIZATIONS = ("mup", "standard")
SWEEP_FILE = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: a model width under a parametrization with its optimizer settings."""

    parametrization: str
    width: int
    lr: float
    init_scale: float
    batch_size: int

    @property
    def name(self) -> str:
        """Variant name (config keys take no dots: 0.0078 -> 0p0078)."""
        f = lambda x: f"{x:.3g}".replace(".", "p").replace("-", "m")
        return (f"{self.parametrization}_w{self.width}_lr{f(self.lr)}_init{f(self.init_scale)}"
                f"_b{self.batch_size}")


def width_overrides(width: int, parametrization: str, base_width: int, head_dim: int,
                    mlp_ratio: int) -> dict[str, Any]:
    """Model fields for ``width`` (muP: m = width / base_width; standard: m = 1)."""
    if width % head_dim:
        raise ConfigError(f"sweep width {width} is not a multiple of head_dim {head_dim}")
    if parametrization not in PARAMETRIZATIONS:
        raise ConfigError(f"sweep parametrization {parametrization!r} is not one of "
                          f"{PARAMETRIZATIONS}")
    heads = width // head_dim
    return {"hidden_size": width, "intermediate_size": mlp_ratio * width,
            "num_attention_heads": heads, "num_key_value_heads": heads,
            "dim_model_base": base_width if parametrization == "mup" else width}


def point_overrides(p: Point, base_width: int, head_dim: int, mlp_ratio: int
                    ) -> dict[str, Any]:
    return {"model": {**width_overrides(p.width, p.parametrization, base_width, head_dim,
                                        mlp_ratio), "initializer_range": p.init_scale},
            "train": {"parametrization": p.parametrization, "lr": p.lr,
                      "global_batch_size": p.batch_size}}


def grid_points(parametrizations: Sequence[str], widths: Sequence[int], lrs: Sequence[float],
                init_scales: Sequence[float], batch_sizes: Sequence[int],
                search: str = "grid", samples: int = 0, seed: int = 0) -> list[Point]:
    """The full grid, or (``search="random"``) ``samples`` of its (lr, init, batch) settings drawn
    without replacement, the same draw at every width and parametrization so they compare."""
    settings = list(itertools.product(lrs, init_scales, batch_sizes))
    if search == "random":
        if not 1 <= samples <= len(settings):
            raise ConfigError(f"sweep samples {samples} must be in [1, {len(settings)}] "
                              "(the grid's settings)")
        pick = np.random.default_rng(seed).choice(len(settings), samples, replace=False)
        settings = [settings[i] for i in sorted(pick)]
    elif search != "grid":
        raise ConfigError(f"sweep search {search!r} is not 'grid' or 'random'")
    # width-major: a partial sweep already compares the parametrizations at its first widths
    return [Point(par, w, float(lr), float(init), int(b)) for w in widths
            for par in parametrizations for lr, init, b in settings]


def sweep_study(base: ml_collections.ConfigDict, name: str, points: Sequence[Point],
                seeds: Sequence[int], base_width: int, head_dim: int = 16, mlp_ratio: int = 3
                ) -> ml_collections.ConfigDict:
    """A study with one variant per point (``sweep`` records each variant's point)."""
    if not points:
        raise ConfigError("sweep has no points")
    variant = {p: shared_base_variant(p, points, base_width) for p in points}
    variants = {variant[p]: point_overrides(p, base_width, head_dim, mlp_ratio)
                for p in points if variant[p] == p.name}
    study = study_config(base, name, variants=variants, seeds=tuple(seeds))
    study.sweep = ml_collections.ConfigDict({"base_width": base_width, "points": [
        dataclasses.asdict(p) | {"variant": variant[p]} for p in points]})
    return study


def shared_base_variant(p: Point, points: Sequence[Point], base_width: int) -> str:
    """The variant that trains ``p``: a standard point at the base width is the muP point with
    the same settings when the sweep has it (m = 1: the same model, trained once for both)."""
    if p.parametrization == "standard" and p.width == base_width:
        twin = dataclasses.replace(p, parametrization="mup")
        if twin in points:
            return twin.name
    return p.name


def _loss(row: dict[str, Any]) -> float:
    """Final held-out loss of a run; a diverged or failed run counts as +inf."""
    v = row.get("final_eval_loss")
    return float(v) if row.get("status") == "done" and isinstance(v, (int, float)) and \
        math.isfinite(v) else math.inf


def fitted_optimum(lrs: Sequence[float], loss: Sequence[float]) -> float | None:
    """The LR at the vertex of the parabola in log2(LR) through the best grid point and its two
    neighbours (a finer optimum than the grid's; how loss-vs-LR optima are usually read off a
    sweep); None when the best point is at the grid's edge or a neighbour has no finite loss."""
    i = int(np.argmin(loss)) if len(loss) else 0
    if not 0 < i < len(loss) - 1 or not all(math.isfinite(v) for v in loss[i - 1:i + 2]):
        return None
    x = np.log2(lrs[i - 1:i + 2])
    a, b, _ = np.polyfit(x, loss[i - 1:i + 2], 2)
    return float(2.0 ** np.clip(-b / (2 * a), x[0], x[-1])) if a > 0 else float(lrs[i])


def analyze(rows: Sequence[dict[str, Any]], points: Sequence[dict[str, Any]],
            base_width: int) -> dict[str, Any]:
    """Per (parametrization, init, batch, width): mean final eval loss per LR over seeds, the
    best LR, and its shift from the base width's best in grid steps (positions in the sorted LR
    grid); ``transfers``: every width's optimum within one grid step of the base width's."""
    by_variant: dict[str, list[float]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(_loss(r))
    curves: dict[tuple, dict[float, dict[str, Any]]] = {}
    for p in points:
        key = (p["parametrization"], p["init_scale"], p["batch_size"], p["width"])
        losses = by_variant.get(p["variant"], [])
        finite = [x for x in losses if math.isfinite(x)]
        complete = len(finite) == len(losses) and finite
        curves.setdefault(key, {})[p["lr"]] = {
            "mean": float(np.mean(finite)) if complete else math.inf,
            "std": float(np.std(finite)) if complete else math.inf,
            "min": min(finite) if finite else math.inf, "max": max(finite) if finite else math.inf,
            "seeds": len(losses)}
    groups: dict[tuple, dict[str, Any]] = {}
    for (par, init, batch, width), per_lr in sorted(curves.items()):
        lrs = sorted(per_lr)
        steps = np.diff(np.log2(lrs)) if len(lrs) > 1 else np.array([1.0])
        best = min(lrs, key=lambda lr: per_lr[lr]["mean"])
        g = groups.setdefault((par, init, batch), {
            "parametrization": par, "init_scale": init, "batch_size": batch,
            "grid_step_log2": float(np.median(steps)), "widths": {}})
        loss = [per_lr[lr]["mean"] for lr in lrs]
        g["widths"][width] = {"best_lr": best, "best_loss": per_lr[best]["mean"],
                              "best_loss_std": per_lr[best]["std"],
                              "fit_best_lr": fitted_optimum(lrs, loss),
                              "at_grid_edge": len(lrs) > 1 and best in (lrs[0], lrs[-1]),
                              "lrs": lrs, "loss": loss,
                              "loss_std": [per_lr[lr]["std"] for lr in lrs],
                              "loss_min": [per_lr[lr]["min"] for lr in lrs],
                              "loss_max": [per_lr[lr]["max"] for lr in lrs]}
    for g in groups.values():
        done = {k: w for k, w in g["widths"].items() if math.isfinite(w["best_loss"])}
        ref = done.get(base_width) or (done[min(done)] if done else None)
        grid = sorted({lr for w in g["widths"].values() for lr in w["lrs"]})
        for w in g["widths"].values():
            # grid steps = positions in the group's LR grid (exact for a grid that is not
            # evenly spaced in log2, e.g. rounded values)
            w["shift_grid_steps"] = (grid.index(w["best_lr"]) - grid.index(ref["best_lr"])
                                     if ref is not None and math.isfinite(w["best_loss"])
                                     else None)
            fits = ref is not None and None not in (w["fit_best_lr"], ref["fit_best_lr"])
            w["fit_shift_grid_steps"] = (math.log2(w["fit_best_lr"] / ref["fit_best_lr"]) /
                                         g["grid_step_log2"] if fits else None)
        shifts = [abs(w["shift_grid_steps"]) for w in done.values()]
        # a verdict needs the base width and another width with finished runs
        g["max_abs_shift"] = max(shifts) if len(shifts) > 1 and base_width in done else None
        g["transfers"] = None if g["max_abs_shift"] is None else g["max_abs_shift"] <= 1.0
    return {"base_width": base_width, "groups": list(groups.values())}


def results_table(analysis: dict[str, Any]) -> str:
    """Markdown: per group and width, the best LR (``edge``: the grid's first or last, so the
    optimum may lie outside it), its loss (mean +- std over seeds), the shift in grid steps, and
    the fitted optimum with its shift."""
    lines = ["| parametrization | init | batch | width | best LR | loss at best | shift "
             "(grid steps) | fitted optimum | fitted shift |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for g in analysis["groups"]:
        for width, w in sorted(g["widths"].items()):
            head = f"| {g['parametrization']} | {g['init_scale']:g} | {g['batch_size']} | {width} |"
            if w["shift_grid_steps"] is None:
                lines.append(head + " - | - | - | - | - |")
                continue
            edge = " (edge)" if w["at_grid_edge"] else ""
            lines.append(f"{head} {w['best_lr']:.4g}{edge} | {w['best_loss']:.4f} ± "
                         f"{w['best_loss_std']:.4f} | {w['shift_grid_steps']:+.2f} | "
                         f"{fmt(w['fit_best_lr'], '.4g')} | "
                         f"{fmt(w['fit_shift_grid_steps'], '+.2f')} |")
    return "\n".join(lines)


def plot_loss_vs_lr(analysis: dict[str, Any], path: Path, title: str = "") -> Path:
    """One panel per parametrization (x init x batch): final eval loss vs LR, a curve per width
    (mean over seeds, error bars = their std), the optimum starred."""
    plt = pyplot()

    groups = analysis["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False,
                             sharey=True)
    for ax, g in zip(axes[0], groups):
        for i, (width, w) in enumerate(sorted(g["widths"].items())):
            ok = [j for j, v in enumerate(w["loss"]) if math.isfinite(v)]
            if not ok:
                continue
            xs = [w["lrs"][j] for j in ok]
            ax.errorbar(xs, [w["loss"][j] for j in ok], yerr=[w["loss_std"][j] for j in ok],
                        marker="o", color=f"C{i}", capsize=3, label=f"width {width}")
            if math.isfinite(w["best_loss"]):
                ax.plot([w["best_lr"]], [w["best_loss"]], marker="*", markersize=14,
                        color=f"C{i}", markeredgecolor="k")
        verdict = ("not enough finished widths" if g["transfers"] is None else
                   f"optimum {'stays' if g['transfers'] else 'moves'}, max shift "
                   f"{g['max_abs_shift']:.0f} grid steps")
        ax.set(xscale="log", xlabel="learning rate", title=f"{g['parametrization']} "
               f"(init {g['init_scale']:g}, batch {g['batch_size']}): {verdict}")
        grid = sorted({lr for w in g["widths"].values() for lr in w["lrs"]})
        ax.set_xticks(grid, [f"{lr:.3g}" for lr in grid])
        ax.minorticks_off()
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0][0].set_ylabel("final held-out loss")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    return path


def write_sweep_results(out_dir: Path, rows: Sequence[dict[str, Any]],
                        study: ml_collections.ConfigDict, results: Path | None = None,
                        command: str = "") -> dict[str, Any]:
    """Analyze a finished sweep; write ``<results>.json``, ``.md`` and ``.png`` (default
    ``<out>/sweep``)."""
    points = [p.to_dict() if hasattr(p, "to_dict") else dict(p) for p in study.sweep.points]
    analysis = analyze(rows, points, study.sweep.base_width)
    base = Path(results) if results else Path(out_dir) / "sweep"
    analysis["command"] = command
    analysis["runs"] = [{k: r.get(k) for k in ("run", "status", "final_eval_loss")}
                        for r in rows]
    write_json(base.with_suffix(".json"), analysis, indent=1)
    md = [f"# Sweep {study.name}", "", f"Command: `{command}`", "", results_table(analysis), "",
          "Shift: how many LR grid points the best LR lies from the base width's; within +-1 = "
          "the optimum transfers.", ""]
    write_text(base.with_suffix(".md"), "\n".join(md))
    seeds = len(study.seeds)
    plot_loss_vs_lr(analysis, base.with_suffix(".png"), title=f"{study.name}: final held-out "
                    f"loss vs LR, {seeds} seed{'s' * (seeds > 1)} (command in {base.name}.md)")
    return analysis
