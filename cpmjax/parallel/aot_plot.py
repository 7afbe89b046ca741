"""Per-device memory against sequence length from ``aot_compile_tpu.jsonl`` rows: one panel per
step (train, prefill), a line per attention kind (dense, InfLLM v2 sparse), the chip's HBM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cpmjax.atomic import atomic_file


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def series(rows: list[dict[str, Any]], step: str, preset: str, topology: str, sparse: bool,
           tag: str | None = None) -> tuple[list[int], list[float], list[int]]:
    """(seq_lens, arguments + temporaries GiB, seq_lens that did not fit) of the newest row per
    length that matches."""
    newest: dict[int, dict[str, Any]] = {}
    for r in rows:
        if (r.get("step", "train") == step and r["preset"] == preset and r["topology"] == topology
                and r.get("sparse") == sparse and r.get("sweep") == tag):
            newest[r["seq_len"]] = r
    fit = sorted(n for n, r in newest.items() if r.get("fits", True))
    return (fit, [newest[n]["per_device_gib"]["arguments_plus_temporaries"] for n in fit],
            sorted(n for n, r in newest.items() if not r.get("fits", True)))


def plot_memory(rows: list[dict[str, Any]], panels: list[dict[str, str]], path: str | Path,
                tag: str | None = None) -> None:
    """``panels``: per subplot its ``step``, ``preset``, ``topology`` and ``title``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    for ax, panel in zip(list(getattr(axes, "flat", [axes])), panels):
        hbm = next((r["hbm_gib"] for r in rows if r["topology"] == panel["topology"]
                    and "hbm_gib" in r), None)
        for sparse, label in ((False, "dense (flash)"), (True, "InfLLM v2 sparse")):
            lens, gib, too_big = series(rows, panel["step"], panel["preset"], panel["topology"],
                                        sparse, tag)
            line = ax.plot(lens, gib, marker="o", label=label)[0] if lens else None
            if too_big and hbm:  # the compiler refused: drawn on the HBM line
                ax.plot(too_big, [hbm] * len(too_big), marker="x", linestyle="none",
                        markersize=10, color=line.get_color() if line else None,
                        label=f"{label}: does not fit")
        if hbm:
            ax.axhline(hbm, color="grey", linestyle="--", label=f"HBM {hbm:.0f} GiB")
            ax.axhline(0.9 * hbm, color="grey", linestyle=":", label="90% of HBM")
        ax.set(xscale="log", xlabel="sequence length (tokens)",
               ylabel="per-device arguments + temporaries (GiB)", title=panel["title"])
        ax.set_xticks([4096, 8192, 16384, 32768, 65536, 131072],
                      ["4K", "8K", "16K", "32K", "64K", "128K"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
