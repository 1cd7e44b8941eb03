"""LR-finder pieces against fastai 2.8.12 suggestions (fastai/callback/schedule.py), hand cases and closed forms."""

import math

import pytest

from lib.train.lr_finder import (
    DivergenceCheck,
    LRFinderResult,
    SmoothedLoss,
    Suggestion,
    _lr_find_figure,
    minimum,
    plot_lr_find,
    slide,
    steep,
    suggest,
    trim_for_suggestions,
    valley,
)
from tests.lib.test_schedule import FASTAI_FIXTURES

SWEEP_LRS = FASTAI_FIXTURES["lr_find_lrs"]  # fastai's 100-point sweep, 1e-7 up to 8.3176377


def fixture_loss(lr: float) -> float:
    """Return the fastai 2.8.12 fixture curve: a sigmoid drop around 1e-3 and an exponential blow-up past 0.3."""
    x = math.log10(lr)
    return 2.3 - 1.5 / (1 + math.exp(-2.5 * (x + 3))) + 0.05 * math.exp(min(3 * (x + 0.5), 50))


FIXTURE_LOSSES = [fixture_loss(lr) for lr in SWEEP_LRS]  # used as the already smoothed losses


def test_fixture_suggestions_match_fastai():
    found = suggest(SWEEP_LRS, FIXTURE_LOSSES, num_it=100, methods=("valley", "steep", "minimum", "slide"))
    assert found["valley"].lr == pytest.approx(1.584893e-04, rel=1e-6)
    assert found["steep"].lr == pytest.approx(8.317638e-04, rel=1e-6)
    assert found["minimum"].lr == pytest.approx(8.317637e-03, rel=1e-6)
    assert found["minimum"].point[0] == pytest.approx(8.317637e-02, rel=1e-6)
    assert found["slide"].lr == pytest.approx(1.584893e-06, rel=1e-6)
    assert {name: s.method for name, s in found.items()} == {name: name for name in found}


def test_fixture_suggestion_points_lie_on_the_curve():
    found = suggest(SWEEP_LRS, FIXTURE_LOSSES, num_it=100, methods=("valley", "steep", "minimum"))
    for suggestion in found.values():
        lr, loss = suggestion.point
        assert loss == pytest.approx(fixture_loss(lr), rel=1e-12)
    assert found["minimum"].point[1] == min(FIXTURE_LOSSES[10:-5])


def test_slide_point_is_interpolated_on_a_log_axis():
    # the suggestion is a sweep LR, so the log10 interpolation lands on that point's loss
    point = suggest(SWEEP_LRS, FIXTURE_LOSSES, num_it=100, methods=("slide",))["slide"].point
    assert point[1] == pytest.approx(fixture_loss(point[0]), rel=1e-9)


def test_default_suggestion_is_valley_only():
    assert list(suggest(SWEEP_LRS, FIXTURE_LOSSES, num_it=100)) == ["valley"]


def test_trim_drops_the_first_tenth_and_the_last_five():
    lrs, losses = trim_for_suggestions(SWEEP_LRS, FIXTURE_LOSSES, 100)
    assert len(lrs) == len(losses) == 85
    assert lrs[0] == pytest.approx(6.3095734e-07) and lrs[-1] == pytest.approx(3.3113112)  # fastai: index 10 and 94


def test_trim_cuts_at_the_first_nan():
    losses = list(FIXTURE_LOSSES)
    losses[60] = math.nan
    losses[70:] = [math.nan] * 30  # once NaN, a smoothed loss stays NaN
    lrs, kept = trim_for_suggestions(SWEEP_LRS, losses, 100)
    assert len(lrs) == len(kept) == 50  # indices 10..59
    assert lrs[-1] == SWEEP_LRS[59]
    assert suggest(SWEEP_LRS, losses, num_it=100, methods=("minimum",))["minimum"].point[0] == SWEEP_LRS[59]


def test_trim_uses_num_it_when_the_sweep_stopped_early():
    lrs, losses = trim_for_suggestions(SWEEP_LRS[:40], FIXTURE_LOSSES[:40], 100)
    assert lrs == tuple(SWEEP_LRS[10:35]) and losses == tuple(FIXTURE_LOSSES[10:35])


def test_trim_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="got 3 learning rates but 2 losses"):
        trim_for_suggestions([1.0, 2.0, 3.0], [1.0, 2.0], 10)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown suggestion method\(s\) \['steepest'\].*minimum.*slide.*steep.*valley"
    ):
        suggest(SWEEP_LRS, FIXTURE_LOSSES, num_it=100, methods=("steepest",))


def test_too_few_points_is_a_clear_error_but_one_point_still_gives_a_valley():
    one_left = suggest(SWEEP_LRS[:16], FIXTURE_LOSSES[:16], num_it=100)  # points 10..10 survive the trimming
    assert one_left["valley"].lr == SWEEP_LRS[10]
    with pytest.raises(ValueError, match="steep suggestion needs at least 2 points"):
        suggest(SWEEP_LRS[:16], FIXTURE_LOSSES[:16], num_it=100, methods=("steep",))
    with pytest.raises(ValueError, match="none of the 15 sweep points is left"):
        suggest(SWEEP_LRS[:15], FIXTURE_LOSSES[:15], num_it=100)
    with pytest.raises(ValueError, match="slide suggestion needs at least 16 points"):
        slide(SWEEP_LRS[:10], FIXTURE_LOSSES[:10])


def test_valley_takes_two_thirds_of_the_longest_decreasing_run():
    lrs = [10.0**i for i in range(9)]
    # longest strictly decreasing subsequence: 3, 2.5, 2, 1.5, 1, 0.5 (indices 1..6), fastai start = 6 - 6 = 0,
    # third = 2, index = 0 + 2 + 1 = 3
    losses = [1.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.6, 0.7]
    assert valley(lrs, losses) == Suggestion("valley", 1e3, (1e3, 2.0))


def test_valley_without_any_decrease_takes_the_first_point():
    assert valley([1.0, 2.0, 3.0], [1.0, 1.0, 2.0]).lr == 1.0


def test_steep_takes_the_most_negative_slope_against_log_lr():
    lrs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    losses = [2.0, 1.9, 1.2, 1.0, 3.0]
    assert steep(lrs, losses) == Suggestion("steep", 1e-2, (1e-2, 1.9))


def test_minimum_takes_a_tenth_of_the_lowest_point():
    assert minimum([1e-3, 1e-2, 1e-1], [2.0, 0.5, 1.0]) == Suggestion("minimum", 1e-3, (1e-2, 0.5))


def test_slide_falls_back_to_lr_diff_plus_one_from_the_end_on_a_flat_curve():
    lrs = [10.0 ** (i / 10) for i in range(30)]
    assert slide(lrs, [1.0] * 30).lr == lrs[-16]
    assert slide(lrs, [1.0] * 30, lr_diff=5, adjust_value=0.5).lr == lrs[-6] * 0.5


def test_smoothed_loss_is_the_debiased_exponential_average():
    smoothed = SmoothedLoss()
    values = [smoothed.update(loss) for loss in (2.0, 1.0, 4.0)]
    # value_n = sum_i (1 - b) b**(n - i) x_i / (1 - b**n) with b = 0.98
    assert values[0] == pytest.approx(2.0)
    assert values[1] == pytest.approx((0.02 * 0.98 * 2.0 + 0.02 * 1.0) / (1 - 0.98**2))
    assert values[2] == pytest.approx((0.02 * 0.98**2 * 2.0 + 0.02 * 0.98 * 1.0 + 0.02 * 4.0) / (1 - 0.98**3))
    assert smoothed.count == 3 and smoothed.value == values[2]


def test_smoothed_loss_of_a_constant_is_that_constant_and_beta_zero_is_the_last_loss():
    constant = SmoothedLoss()
    assert all(constant.update(0.7) == pytest.approx(0.7) for _ in range(50))
    last = SmoothedLoss(beta=0.0)
    last.update(3.0)
    assert last.update(5.0) == 5.0


def test_smoothed_loss_needs_a_loss_before_its_value():
    with pytest.raises(ValueError, match="call update"):
        _ = SmoothedLoss().value
    with pytest.raises(ValueError, match="beta"):
        SmoothedLoss(beta=1.0)


def test_divergence_stops_strictly_above_four_times_the_best():
    check = DivergenceCheck()
    assert [check.diverged(loss) for loss in (3.0, 2.0, 1.0, 3.9, 4.0, 4.1)] == [False] * 5 + [True]
    assert check.best == 1.0


def test_divergence_stops_on_nan_and_inf():
    assert DivergenceCheck().diverged(math.nan)
    assert DivergenceCheck().diverged(math.inf)


def test_smoothed_sweep_that_blows_up_stops_where_the_closed_form_says():
    smoothed, check = SmoothedLoss(), DivergenceCheck()
    raw = [1.0] * 20 + [1000.0] * 10
    stop = next(i for i, loss in enumerate(raw) if check.diverged(smoothed.update(loss)))
    # at batch 20: (1 - b**21 - 0.02 + 0.02 * 1000) / (1 - b**21) with b = 0.98, which is > 4 * best = 4
    assert stop == 20
    assert smoothed.value == pytest.approx((1 - 0.98**21 + 0.02 * 999) / (1 - 0.98**21))


def test_plot_draws_a_log_axis_and_labels_each_suggestion(tmp_path):
    suggestions = suggest(SWEEP_LRS, FIXTURE_LOSSES, num_it=100, methods=("valley", "minimum"))
    result = LRFinderResult(tuple(SWEEP_LRS), tuple(FIXTURE_LOSSES), 100, False, suggestions)
    figure = _lr_find_figure(result, skip_end=5)
    try:
        (axes,) = figure.axes
        assert axes.get_xscale() == "log"
        assert len(axes.lines[0].get_xdata()) == 95  # fastai plot_lr_find: skip_end=5
        labels = [text.get_text() for text in axes.get_legend().get_texts()]
        assert labels == ["valley: 1.58e-04", "minimum: 8.32e-03"]
        assert tuple(axes.lines[2].get_xydata()[0]) == pytest.approx(suggestions["minimum"].point)
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
    out_path = plot_lr_find(result, tmp_path / "plots" / "lr_find.png")
    assert out_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_path.stat().st_size > 1000


def test_plot_without_suggestions_has_no_legend(tmp_path):
    result = LRFinderResult((1e-3, 1e-2, 1e-1), (1.0, 0.8, 2.0), 3, True)
    figure = _lr_find_figure(result, skip_end=0)
    try:
        assert figure.axes[0].get_legend() is None and len(figure.axes[0].lines) == 1
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
    assert plot_lr_find(result, tmp_path / "lr.png", skip_end=0).stat().st_size > 0
