"""Matplotlib for files only: one lazy pyplot import and one save-and-close, shared by every lib/ plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot():
    """Import pyplot on first use with the Agg backend: training hosts have no display, and lib/ must import fast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Figure, out_path: Path, *, dpi: int) -> Path:
    """Save a pyplot figure as a PNG, creating its folder, and close it even when saving fails."""
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out_path, dpi=dpi)
    finally:
        pyplot().close(figure)
    return out_path
