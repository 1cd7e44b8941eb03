"""The chart of a comparison: each architecture's final model, epoch by epoch, on one pair of axes per metric."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lib.common.plots import pyplot, save_figure

COMPARISON_METRICS = ("error_rate", "valid_loss")  # what the comparison ranks by, in that order


def plot_comparison(curves: Mapping[str, Mapping[str, Sequence[float]]], out_path: Path) -> Path:
    """Plot `curves[arch][metric]` (one value per epoch) for every metric of COMPARISON_METRICS; save a PNG.

    Each architecture is one line on every panel, labelled with its last value, so the best one reads off the legend.
    """
    if not curves:
        raise ValueError("nothing to compare: no architecture has a history")
    plt = pyplot()
    figure, panels = plt.subplots(1, len(COMPARISON_METRICS), figsize=(5 * len(COMPARISON_METRICS), 4))
    for axes, metric in zip(panels, COMPARISON_METRICS, strict=True):
        for arch, history in curves.items():
            values = list(history.get(metric, ()))
            if values:
                axes.plot(range(1, len(values) + 1), values, marker="o", label=f"{arch}: {values[-1]:.4g}")
        axes.set_xlabel("epoch of the final model")
        axes.set_ylabel(metric)
        axes.set_title(f"validation {metric}")
        axes.xaxis.get_major_locator().set_params(integer=True)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best")
    figure.tight_layout()
    return save_figure(figure, Path(out_path), dpi=100)
