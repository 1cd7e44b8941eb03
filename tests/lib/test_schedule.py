"""Schedules against fastai 2.8.12 fixtures, a torch OneCycleLR oracle and closed forms.

tests/fixtures/fastai_schedules.json was measured on fastai 2.8.12 (tests/fixtures/README.md says how): each schedule
row is [[lr per group], [mom per group]] seen at before_batch, 3 groups, 10 batches per epoch.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from lib.train.schedule import (
    DEFAULT_MOMS,
    OneCycle,
    Phase,
    cosine_anneal,
    fine_tune_phases,
    group_lrs,
    lr_finder_lr,
    one_cycle_position,
)

# fastai evaluates the schedule in float32; against float64 formulas that is within 7.7e-7 relative
FASTAI_RTOL = 1e-6
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "fastai_schedules.json"
FASTAI_FIXTURES = json.loads(FIXTURES.read_text())
N_GROUPS = 3  # the fixtures' learner has resnet's three parameter groups
BATCHES_PER_EPOCH = 10  # the fixtures' learner has 10 training batches per epoch


def assert_matches_fixture(schedule: OneCycle, rows: list) -> None:
    assert schedule.total_steps == len(rows)
    for step, (expected_lrs, expected_moms) in enumerate(rows):
        lrs, mom = schedule.at(step)
        assert lrs == pytest.approx(expected_lrs, rel=FASTAI_RTOL), f"lr at batch {step}"
        assert [mom] * N_GROUPS == pytest.approx(expected_moms, rel=FASTAI_RTOL), f"mom at batch {step}"


def test_cosine_anneal_runs_half_a_cosine_from_start_to_end():
    assert cosine_anneal(1.0, 3.0, 0.0) == 1.0
    assert cosine_anneal(1.0, 3.0, 1.0) == pytest.approx(3.0)
    assert cosine_anneal(1.0, 3.0, 0.5) == pytest.approx(2.0)
    assert cosine_anneal(1.0, 3.0, 0.25) == pytest.approx(1.0 + 2.0 * (1 - math.sqrt(0.5)) / 2)


@pytest.mark.parametrize(
    ("lr", "expected"),
    [
        (slice(1e-6, 1e-4), (1e-6, 1e-5, 1e-4)),  # measured on fastai 2.8.12
        (slice(1e-5, 1e-3), (1e-5, 1e-4, 1e-3)),  # measured on fastai 2.8.12
        (slice(2e-3), (2e-4, 2e-4, 2e-3)),  # measured on fastai 2.8.12: slice(hi) gives hi/10 to the body groups
        (3e-3, (3e-3, 3e-3, 3e-3)),
        ([1e-4, 2e-4, 5e-4], (1e-4, 2e-4, 5e-4)),
    ],
)
def test_group_lrs_maps_like_fastai_set_hyper(lr, expected):
    assert group_lrs(lr, 3) == pytest.approx(expected, rel=1e-12)


def test_group_lrs_with_one_group_gives_the_slice_top():
    assert group_lrs(slice(1e-5, 1e-3), 1) == (1e-3,)
    assert group_lrs(slice(1e-3), 1) == (1e-3,)


def test_group_lrs_rejects_a_list_of_the_wrong_length():
    with pytest.raises(ValueError, match="got 2 learning rates for 3 parameter groups"):
        group_lrs([1e-4, 1e-3], 3)


@pytest.mark.parametrize(
    "lr", [slice(1e-3, None), slice(1e-5, 1e-3, 2), slice(0.0, 1e-3), -1e-3, math.nan, [1e-3, 0.0]]
)
def test_group_lrs_rejects_bad_values(lr):
    with pytest.raises(ValueError, match="slice|positive"):
        group_lrs(lr, 2)


def test_fit_one_cycle_matches_fastai_fixture_every_batch():
    # fit_one_cycle(2, lr_max=1e-3): defaults div=25, div_final=1e5, pct_start=0.25, moms=(0.95, 0.85, 0.95)
    schedule = OneCycle(lr_max=group_lrs(1e-3, N_GROUPS), total_steps=2 * BATCHES_PER_EPOCH)
    assert_matches_fixture(schedule, FASTAI_FIXTURES["fit_one_cycle_2ep_lr1e-3"])


def _fine_tune_schedule(phase: Phase, epochs: int) -> OneCycle:
    return OneCycle(
        lr_max=group_lrs(phase.lr, N_GROUPS),
        total_steps=epochs * BATCHES_PER_EPOCH,
        div=phase.div,
        pct_start=phase.pct_start,
    )


@pytest.mark.parametrize(("freeze_epochs", "key"), [(1, "fine_tune_frozen_1ep"), (2, "fine_tune_frozen_2ep")])
def test_fine_tune_frozen_phase_matches_fastai_fixture(freeze_epochs, key):
    frozen = fine_tune_phases(2, freeze_epochs=freeze_epochs)[0]
    assert frozen.frozen and frozen.epochs == freeze_epochs
    assert_matches_fixture(_fine_tune_schedule(frozen, freeze_epochs), FASTAI_FIXTURES[key])


def test_fine_tune_unfrozen_phase_matches_fastai_fixture():
    unfrozen = fine_tune_phases(2)[-1]
    assert not unfrozen.frozen and unfrozen.epochs == 2
    assert_matches_fixture(_fine_tune_schedule(unfrozen, 2), FASTAI_FIXTURES["fine_tune_rows_lastfit"])


def test_phase_one_cycle_builds_the_same_schedule():
    for phase in fine_tune_phases(3, freeze_epochs=2):
        built = phase.one_cycle(n_groups=N_GROUPS, batches_per_epoch=BATCHES_PER_EPOCH)
        assert built == _fine_tune_schedule(phase, phase.epochs)


def test_fine_tune_phases_follow_fastai_fine_tune():
    frozen, unfrozen = fine_tune_phases(5)
    assert (frozen.name, frozen.frozen, frozen.epochs) == ("frozen", True, 1)
    assert (frozen.lr, frozen.pct_start, frozen.div) == (slice(2e-3), 0.99, 25.0)
    assert (unfrozen.name, unfrozen.frozen, unfrozen.epochs) == ("unfrozen", False, 5)
    # base_lr is halved before unfreezing: slice(1e-3/100, 1e-3)
    assert unfrozen.lr == slice(1e-5, 1e-3)
    assert (unfrozen.pct_start, unfrozen.div) == (0.3, 5.0)


def test_fine_tune_phases_settings_and_no_frozen_phase():
    (only,) = fine_tune_phases(3, base_lr=4e-3, freeze_epochs=0, lr_mult=10, pct_start=0.2, div=8.0)
    assert (only.name, only.frozen, only.epochs) == ("unfrozen", False, 3)
    assert only.lr == slice(2e-4, 2e-3)
    assert (only.pct_start, only.div) == (0.2, 8.0)


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"epochs": 1, "freeze_epochs": -1}, {"epochs": 1, "base_lr": 0}])
def test_fine_tune_phases_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        fine_tune_phases(**kwargs)


def torch_one_cycle(max_lr, total_steps: int, pct_start: float, div: float, div_final: float) -> list:
    """Run torch's OneCycleLR and return (lrs per group, momentum) before each optimizer step."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in max_lr]
    optimizer = torch.optim.SGD([{"params": [p]} for p in params], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=list(max_lr),
        total_steps=total_steps,
        pct_start=pct_start,
        anneal_strategy="cos",
        div_factor=div,
        final_div_factor=div_final / div,  # torch's final lr is initial_lr / final_div_factor = max_lr / div_final
        three_phase=False,
        cycle_momentum=True,
        base_momentum=DEFAULT_MOMS[1],
        max_momentum=DEFAULT_MOMS[0],
    )
    values = []
    for step in range(total_steps):
        values.append(([g["lr"] for g in optimizer.param_groups], optimizer.param_groups[0]["momentum"]))
        if step < total_steps - 1:
            optimizer.step()
            scheduler.step()
    return values


# torch's OneCycleLR puts its warm-up end at step pct_start*N - 1 and its last step N - 1 on the final LR, while
# fastai uses pos = k/N: warm-up t = k/(pct_start*N), annealing t = (k - pct_start*N)/(N - pct_start*N).
# With N' = N + 1 and pct_start' = (pct_start*N + 1)/N', torch's warm-up t = k/(pct_start*N') - 1 = k/(pct_start*N)
# and its annealing t = (k - pct_start*N)/(N' - 1 - pct_start*N) are fastai's exactly, so torch's first N steps
# must equal fastai's N batches to float rounding (1e-9), and torch's extra step N is fastai's unreached pos 1.
@pytest.mark.parametrize(
    ("lr_max", "epochs", "pct_start", "div"),
    [((1e-3,) * 3, 2, 0.25, 25.0), ((2e-4, 2e-4, 2e-3), 1, 0.99, 25.0), ((1e-5, 1e-4, 1e-3), 2, 0.3, 5.0)],
)
def test_one_cycle_equals_torch_one_cycle_lr_with_one_extra_step(lr_max, epochs, pct_start, div):
    steps = epochs * BATCHES_PER_EPOCH
    ours = OneCycle(lr_max=lr_max, total_steps=steps, div=div, pct_start=pct_start)
    oracle = torch_one_cycle(lr_max, steps + 1, (pct_start * steps + 1) / (steps + 1), div, ours.div_final)
    for step in range(steps):
        lrs, mom = ours.at(step)
        assert lrs == pytest.approx(oracle[step][0], rel=1e-9)
        assert mom == pytest.approx(oracle[step][1], rel=1e-9)
    assert oracle[steps][0] == pytest.approx([peak / ours.div_final for peak in lr_max], rel=1e-9)


def test_one_cycle_against_torch_with_the_same_step_count_is_one_step_ahead_after_the_peak():
    # Same N and pct_start for both: they agree at the start; torch peaks one step earlier (pct_start*N - 1) and from
    # its peak on, torch's step k is fastai's batch k + 1 (identical annealing t), ending on the final LR at N - 1.
    steps, pct_start, peak = 20, 0.25, 1e-3
    ours = OneCycle(lr_max=(peak,), total_steps=steps, pct_start=pct_start)
    oracle = torch_one_cycle((peak,), steps, pct_start, ours.div, ours.div_final)
    assert ours.at(0)[0] == pytest.approx(oracle[0][0], rel=1e-12) and ours.at(0)[1] == oracle[0][1] == 0.95
    torch_peak = int(pct_start * steps) - 1
    assert oracle[torch_peak][0] == pytest.approx([peak]) and ours.at(torch_peak + 1)[0] == pytest.approx((peak,))
    for step in range(torch_peak, steps - 1):
        lrs, mom = ours.at(step + 1)
        assert list(lrs) == pytest.approx(oracle[step][0], rel=1e-9)
        assert mom == pytest.approx(oracle[step][1], rel=1e-9)
    assert oracle[-1][0] == pytest.approx([peak / ours.div_final])
    assert ours.at(steps - 1)[0][0] > peak / ours.div_final  # fastai never reaches pos 1


def test_one_cycle_without_warm_up_starts_at_the_peak():
    schedule = OneCycle(lr_max=(1e-3,), total_steps=4, pct_start=0.0)
    assert schedule.at(0) == ((1e-3,), 0.85)
    lrs, mom = schedule.at(2)  # t = pos = 0.5
    assert lrs[0] == pytest.approx((1e-3 + 1e-3 / 1e5) / 2)
    assert mom == pytest.approx(0.9)


def test_one_cycle_all_warm_up_never_anneals():
    schedule = OneCycle(lr_max=(1e-3,), total_steps=4, pct_start=1.0)
    lrs, mom = schedule.at(2)  # t = pos = 0.5
    assert lrs[0] == pytest.approx((1e-3 / 25 + 1e-3) / 2)
    assert mom == pytest.approx(0.9)
    assert schedule.at(3)[0][0] < 1e-3


def test_one_cycle_single_step_and_boundary_belongs_to_annealing():
    assert OneCycle(lr_max=(1e-3,), total_steps=1).at(0) == ((1e-3 / 25,), 0.95)
    # pos 5/20 == pct_start 0.25 is in the second phase, at its start: the peak
    assert OneCycle(lr_max=(1e-3,), total_steps=20).at(5) == ((1e-3,), 0.85)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr_max": (), "total_steps": 10}, "lr_max"),
        ({"lr_max": (1e-3,), "total_steps": 0}, "total_steps"),
        ({"lr_max": (1e-3,), "total_steps": 10, "pct_start": 1.5}, "pct_start"),
        ({"lr_max": (1e-3,), "total_steps": 10, "div": 0.0}, "div"),
        ({"lr_max": (1e-3,), "total_steps": 10, "moms": (0.9, 0.8)}, "moms"),
    ],
)
def test_one_cycle_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OneCycle(**kwargs)


@pytest.mark.parametrize("step", [-1, 10])
def test_one_cycle_rejects_steps_outside_the_fit(step):
    with pytest.raises(ValueError, match=r"step must be in \[0, 10\)"):
        OneCycle(lr_max=(1e-3,), total_steps=10).at(step)


def test_one_cycle_position_is_step_over_total():
    assert one_cycle_position(0, 92) == 0.0
    assert one_cycle_position(91, 92) == pytest.approx(91 / 92)  # fastai: last frozen batch, still below pct_start 0.99


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 1e-7), (1, 1.2022644e-07), (10, 6.3095734e-07), (49, 8.3176377e-04), (50, 1e-3), (94, 3.3113112),
     (99, 8.3176377)],
)  # fmt: skip
def test_lr_finder_lr_landmarks(step, expected):
    assert lr_finder_lr(step) == pytest.approx(expected, rel=1e-7)  # fastai 2.8.12 values, to 8 significant digits


def test_lr_finder_lr_reproduces_the_whole_fastai_sweep():
    expected = FASTAI_FIXTURES["lr_find_lrs"]
    assert [lr_finder_lr(step) for step in range(100)] == pytest.approx(expected, rel=FASTAI_RTOL)


def test_lr_finder_lr_settings_and_errors():
    assert lr_finder_lr(5, start_lr=1e-4, end_lr=1.0, num_it=10) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="num_it"):
        lr_finder_lr(0, num_it=0)
    with pytest.raises(ValueError, match="positive"):
        lr_finder_lr(0, start_lr=0.0)
