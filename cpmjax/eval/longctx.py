"""Long-context evaluation harness: the synthetic tasks of ``cpmjax.eval.longctx_tasks`` on any
checkpoint ``cpmjax.load`` reads (HF folder, cpmjax checkpoint, training run), dense and InfLLM v2
sparse side by side on the same weights (sparse = the same params with ``sparse_config`` added),
greedy answers batched through the serving engine (``cpmjax.serve.generate``).

Outputs: a JSON of every cell (task x length x depth x mode: mean score, samples), a markdown
table per task and length, and per task and mode a heatmap PNG of depth x length (for
``positional_bias`` also a score-vs-position plot per length).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cpmjax.atomic import write_json, write_text
from cpmjax.config import ModelConfig, SparseConfig
from cpmjax.eval.longctx_tasks import (ANSWER_BUDGET, BIAS_DEPTHS, TASKS, Sample,
                                       corpus_haystack, make_sample, score)
from cpmjax.plotting import pyplot, save_png
from cpmjax.presets import MINICPM4_SPARSE

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MODES = ("dense", "sparse")


def sparse_variant(cfg: ModelConfig, sparse: dict[str, Any] | None) -> ModelConfig:
    """``cfg`` with ``sparse_config``: ``sparse`` if given, else the checkpoint's own, else
    MiniCPM4's (README sparse_config; below its ``dense_len`` attention stays dense)."""
    fields = sparse or (dataclasses.asdict(cfg.sparse_config) if cfg.sparse_config
                        else dict(MINICPM4_SPARSE))
    sc = SparseConfig(**fields)
    sc.validate()
    return dataclasses.replace(cfg, sparse_config=sc)


def dense_variant(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, sparse_config=None)


def usable_lengths(lengths: Sequence[int], max_positions: int, budget: int) -> list[int]:
    """The lengths whose prompt plus answer budget fit the checkpoint's context."""
    return [n for n in lengths if n + budget <= max_positions]


def build_samples(tokenizer: Any, haystack: Any, tasks: Sequence[str], lengths: Sequence[int],
                  depths: Sequence[float], samples: int, seed: int) -> list[Sample]:
    out = []
    for task in tasks:
        for n in lengths:
            for d in (BIAS_DEPTHS if task == "positional_bias" else depths):
                out += [make_sample(task, tokenizer, haystack, n, d, i, seed)
                        for i in range(samples)]
    return out


def run_samples(cfg: ModelConfig, params: Any, tokenizer: Any, samples: list[Sample],
                max_slots: int) -> list[float]:
    """Score of every sample: greedy continuations through the engine, one call per prompt
    length and answer budget (one engine shape each)."""
    from cpmjax.serve.generate import generate

    scores = [0.0] * len(samples)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.length, s.max_new_tokens), []).append(i)
    for (_, budget), idx in sorted(groups.items()):
        outs = generate(cfg, params, [samples[i].tokens for i in idx], max_new_tokens=budget,
                        temperature=0.0, max_slots=max_slots)
        for i, ids in zip(idx, outs):
            scores[i] = score(samples[i], tokenizer.decode(ids))
    return scores


def evaluate(model: Any, *, tasks: Sequence[str] = TASKS,
             lengths: Sequence[int] = DEFAULT_LENGTHS, depths: Sequence[float] = DEFAULT_DEPTHS,
             samples: int = 4, modes: Sequence[str] = MODES, sparse: dict[str, Any] | None = None,
             tokenizer: Any = None, cache_dir: str = ".cache/cpmjax", seed: int = 0,
             max_slots: int = 8) -> dict[str, Any]:
    """Every cell's mean score for a loaded ``cpmjax.Model``; lengths past its context are
    dropped (and listed)."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode {m!r} is not one of {MODES}")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown long-context task {t!r} (expected one of {TASKS})")
    tokenizer = tokenizer or model.tokenizer or _project_tokenizer(model.config, cache_dir)
    budget = max(ANSWER_BUDGET[t] for t in tasks)
    fit = usable_lengths(lengths, model.config.max_position_embeddings, budget)
    if not fit:
        raise ValueError(f"no length of {list(lengths)} fits the checkpoint's context of "
                         f"{model.config.max_position_embeddings} tokens (answers need "
                         f"{budget} more)")
    haystack = corpus_haystack(tokenizer, cache_dir, max(fit))
    items = build_samples(tokenizer, haystack, tasks, fit, depths, samples, seed)
    cells: list[dict[str, Any]] = []
    timing = {}
    for mode in modes:
        cfg = dense_variant(model.config) if mode == "dense" else sparse_variant(model.config,
                                                                                  sparse)
        t0 = time.time()
        got = run_samples(cfg, model.params, tokenizer, items, max_slots)
        timing[mode] = round(time.time() - t0, 1)
        keyed: dict[tuple, list[float]] = {}
        for s, v in zip(items, got):
            keyed.setdefault((s.task, s.length, s.depth), []).append(v)
        cells += [{"mode": mode, "task": t, "length": n, "depth": d,
                   "score": float(np.mean(v)), "samples": len(v)}
                  for (t, n, d), v in keyed.items()]
    return {"tasks": list(tasks), "lengths": fit,
            "dropped_lengths": sorted(set(lengths) - set(fit)), "depths": list(depths), "samples_per_cell": samples, "modes": list(modes),
            "seed": seed, "sparse_config": dataclasses.asdict(
                sparse_variant(model.config, sparse).sparse_config) if "sparse" in modes else None,
            "seconds": timing, "cells": cells}


def _project_tokenizer(cfg: ModelConfig, cache_dir: str) -> Any:
    from cpmjax.data.tokenizer import get_or_build_default_tokenizer, load_tokenizer

    tok = load_tokenizer(get_or_build_default_tokenizer(cache_dir, cfg.vocab_size))
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"the project tokenizer has {tok.get_vocab_size()} tokens, more than the "
                         f"checkpoint's vocab_size {cfg.vocab_size}; pass the checkpoint's "
                         "tokenizer")
    return tok


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per task and length, the mean score over depths per mode."""
    modes = result["modes"]
    lines = ["| task | length | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for task in result["tasks"]:
        for n in result["lengths"]:
            vals = []
            for m in modes:
                xs = [c["score"] for c in result["cells"]
                      if c["task"] == task and c["length"] == n and c["mode"] == m]
                vals.append(f"{np.mean(xs):.3f}" if xs else "-")
            lines.append(f"| {task} | {n} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def heatmaps(result: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Per task: a depth x length heatmap per mode, side by side; positional_bias also gets
    score vs answer position."""
    plt = pyplot()

    paths = []
    for task in result["tasks"]:
        depths = sorted({c["depth"] for c in result["cells"] if c["task"] == task})
        lengths = result["lengths"]
        fig, axes = plt.subplots(1, len(result["modes"]), squeeze=False, sharey=True,
                                 layout="constrained",
                                 figsize=(1.5 + (2.2 + 0.9 * len(lengths)) * len(result["modes"]),
                                          1.8 + 0.3 * len(depths)))
        for k, (ax, mode) in enumerate(zip(axes[0], result["modes"])):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for c in result["cells"]:
                if c["task"] == task and c["mode"] == mode:
                    grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["score"]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n)
                                                for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            ax.set(xlabel="context length", ylabel="answer depth" if k == 0 else "", title=mode)
        fig.suptitle(task)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="score")
        path = out_dir / f"{name}_{task}.png"
        save_png(fig, path)
        paths.append(path)
    if "positional_bias" in result["tasks"]:
        paths.append(_bias_plot(result, out_dir / f"{name}_positional_bias_curve.png"))
    return paths


def _bias_plot(result: dict[str, Any], path: Path) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, n in enumerate(result["lengths"]):
        for mode, style in zip(result["modes"], ("-", "--")):
            pts = sorted((c["depth"], c["score"]) for c in result["cells"] if
                         c["task"] == "positional_bias" and c["length"] == n and c["mode"] == mode)
            ax.plot(*zip(*pts), linestyle=style, marker="o", color=f"C{i}", label=f"{n} {mode}")
    ax.set(xlabel="relative answer position (0 = start)", ylabel="score", ylim=(-0.05, 1.05),
           title="positional bias (LongPiBench-style)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)
    return path


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike, name: str,
                  command: str = "") -> dict[str, Any]:
    """``<name>.json``, ``<name>.md`` and the PNGs under ``out_dir``."""
    out = Path(out_dir)
    result = {**result, "command": command}
    write_json(out / f"{name}.json", result, indent=1)
    write_text(out / f"{name}.md", f"# Long-context evaluation: {name}\n\n"
               f"Command: `{command}`\n\nMean score over depths and samples:\n\n"
               f"{table(result)}\n")
    result["plots"] = [str(p) for p in heatmaps(result, out, name)]
    return result
