"""The one figure helper: a matplotlib Figure on the Agg canvas (pyplot and the global backend untouched),
written as PNG atomically."""

from __future__ import annotations

import io
import os
from pathlib import Path

from bayprano.platform.fileio import atomic_write_bytes


def new_figure(width: float, height: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: float | None = None, tight: bool = True) -> Path:
    """Write ``fig`` as PNG to ``path`` (a temp file renamed into place), after ``tight_layout`` unless told."""
    if tight:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **({"dpi": dpi} if dpi else {}))
    return atomic_write_bytes(Path(path), buf.getvalue())
