"""lib/evaluate/comparison.py: the comparison chart."""

import pytest
from PIL import Image

from lib.evaluate.comparison import plot_comparison


def test_the_chart_has_a_panel_per_ranking_metric_and_needs_a_history(tmp_path):
    curves = {
        "resnet18": {"error_rate": [0.5, 0.3, 0.2], "valid_loss": [1.2, 0.9, 0.7]},
        "resnet34": {"error_rate": [0.6, 0.25], "valid_loss": [1.3, 0.8]},  # fewer epochs: its own length
    }
    chart = plot_comparison(curves, tmp_path / "out" / "comparison.png")
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.size == (1000, 400)  # two 5 x 4 inch panels at 100 dpi
    with pytest.raises(ValueError, match="nothing to compare"):
        plot_comparison({}, tmp_path / "empty.png")
