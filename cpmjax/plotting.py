"""Figures as PNG files: matplotlib without a display, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cpmjax.atomic import atomic_file


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed); imported on use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (atomically) and close it."""
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    pyplot().close(fig)
    return Path(path)
