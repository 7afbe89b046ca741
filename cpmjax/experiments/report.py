"""A study's comparison: one table (markdown and CSV, per run and per variant over seeds) and one
PNG per metric with every run's curve."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from cpmjax.atomic import write_json, write_text
from cpmjax.experiments import rundir
from cpmjax.plotting import pyplot, save_png

COLUMNS = ("run", "variant", "seed", "status", "steps", "final_eval_loss", "best_eval_loss",
           "final_loss", "indicator", "accuracy", "tokens_per_sec", "wall_s")
AGGREGATED = ("final_eval_loss", "best_eval_loss", "indicator", "accuracy", "tokens_per_sec")
CURVES = ("loss", "eval_loss", "grad_norm", "lr")


def run_row(name: str, variant: str, seed: int, status: str, run_dir: Path) -> dict[str, Any]:
    """A table row: the finished result, or what the metrics say so far."""
    result = rundir.read_result(run_dir) or rundir.summarize_metrics(rundir.read_metrics(run_dir))
    row = {k: result.get(k) for k in COLUMNS}
    row.update(run=name, variant=variant, seed=seed, status=status)
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"
    return str(v)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def variant_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Per variant: finished seeds, and mean ± std over them of the aggregated columns."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant and r["status"] == "done"]
        agg = {"variant": variant, "seeds_done": f"{len(mine)}/"
               f"{sum(r['variant'] == variant for r in rows)}"}
        for k in AGGREGATED:
            vals = [r[k] for r in mine if isinstance(r.get(k), (int, float)) and
                    math.isfinite(r[k])]
            agg[k] = _mean_std(vals) if k != "tokens_per_sec" or not vals else _fmt(
                statistics.median(vals))
        out.append(agg)
    return out


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) if not isinstance(r.get(c), str) else r[c]
                                for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, study: str, rows: list[dict[str, Any]],
                 run_dirs: dict[str, Path], command: str = "") -> dict[str, Path]:
    """``summary.md``, ``summary.csv``, ``summary.json`` and ``curves/<metric>.png``."""
    per_variant = variant_rows(rows)
    agg_cols = ("variant", "seeds_done") + AGGREGATED
    md = [f"# Study {study}", ""]
    if command:
        md += ["Command:", "", f"    {command}", ""]
    md += ["## Per variant (mean ± std over finished seeds; tokens/s: median)", "",
           markdown_table(per_variant, agg_cols), "", "## Per run", "",
           markdown_table(rows, COLUMNS), ""]
    paths = {"markdown": write_text(out_dir / "summary.md", "\n".join(md)),
             "json": write_json(out_dir / "summary.json", {"study": study, "runs": rows,
                                                           "variants": per_variant})}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    paths["csv"] = write_text(out_dir / "summary.csv", buf.getvalue())
    for metric in CURVES:
        path = plot_curves(out_dir / "curves" / f"{metric}.png", metric, rows, run_dirs, study)
        if path is not None:
            paths[f"curve_{metric}"] = path
    return paths


def plot_curves(path: Path, metric: str, rows: Sequence[dict[str, Any]],
                run_dirs: dict[str, Path], study: str) -> Path | None:
    """Every run's ``metric`` against step (colour: variant, line style: seed); None when no run
    logged it."""
    plt = pyplot()

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    plotted = False
    for r in rows:
        recs = rundir.read_metrics(run_dirs[r["run"]])
        pts = [(s, v[metric]) for s, v in recs.items() if v.get(metric) is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=f"C{variants.index(r['variant']) % 10}",
                linestyle=styles[seeds.index(r["seed"]) % len(styles)],
                marker="o" if len(pts) < 12 else None, markersize=3, label=r["run"])
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel=metric, title=f"{study}: {metric} (colour: variant, "
           "style: seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)
    return path
