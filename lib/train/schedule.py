"""Learning-rate schedules as pure functions of the batch index: per-group LRs, one-cycle, fine_tune phases, LR sweep.

Behaviour follows fastai 2.8.12 (fastai/callback/schedule.py: `fit_one_cycle`,
`fine_tune`, `combined_cos`; fastai/learner.py: `Learner.lr_range`). Time is always explicit: every
function takes the 0-based batch index and the total number of batches, so a schedule can be evaluated anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_MOMS = (0.95, 0.85, 0.95)  # fastai Learner.moms: Adam beta1 from 0.95 down to 0.85 and back


def cosine_anneal(start: float, end: float, t: float) -> float:
    """Return the half-cosine interpolation from start (t=0) to end (t=1)."""
    return start + (end - start) * (1 - math.cos(math.pi * t)) / 2


def group_lrs(lr: float | slice | Sequence[float], n_groups: int) -> tuple[float, ...]:
    """Expand an LR, a slice or a per-group sequence into one LR per parameter group, as fastai's set_hyper does.

    `slice(lo, hi)` spreads the groups geometrically from lo to hi; `slice(hi)` gives hi/10 to every group but
    the last, which gets hi; a scalar is shared by all groups; a sequence must have one value per group.
    """
    if n_groups < 1:
        raise ValueError(f"n_groups must be at least 1, got {n_groups}")
    if isinstance(lr, slice):
        values = _slice_lrs(lr, n_groups)
    elif isinstance(lr, Sequence):
        if len(lr) != n_groups:
            raise ValueError(
                f"got {len(lr)} learning rates for {n_groups} parameter groups; pass one per group, "
                "a scalar, or a slice"
            )
        values = tuple(float(value) for value in lr)
    else:
        values = (float(lr),) * n_groups
    for value in values:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"learning rates must be finite and positive, got {values}")
    return values


def _slice_lrs(lr: slice, n_groups: int) -> tuple[float, ...]:
    if lr.stop is None or lr.step is not None:
        raise ValueError(f"a learning-rate slice is slice(hi) or slice(lo, hi), got {lr}")
    high = float(lr.stop)
    if lr.start is None:
        # fastai set_hyper: slice(hi) -> [hi/10]*(n-1) + [hi]; only the last group (the head) gets hi
        return (high / 10,) * (n_groups - 1) + (high,)
    low = float(lr.start)
    if n_groups == 1:
        return (high,)
    if low <= 0:
        raise ValueError(f"the slice start must be positive for a geometric spread, got {lr}")
    # fastai even_mults: lo * (hi/lo) ** (i/(n-1))
    return tuple(low * (high / low) ** (i / (n_groups - 1)) for i in range(n_groups))


def one_cycle_position(step: int, total_steps: int) -> float:
    """Return fastai's training position for batch `step` of `total_steps`: step/total_steps, in [0, 1)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, {total_steps}), got {step}")
    return step / total_steps


@dataclass(frozen=True)
class OneCycle:
    """The 1cycle policy of fastai's fit_one_cycle: cosine warm-up to lr_max, then cosine annealing to lr_max/div_final.

    Momentum runs the other way: moms[0] down to moms[1] during the warm-up, then back up to moms[2].
    """

    lr_max: tuple[float, ...]  # peak LR per parameter group, already expanded by group_lrs
    total_steps: int  # training batches over the whole fit: epochs * batches per epoch
    div: float = 25.0  # fastai fit_one_cycle default: start at lr_max/25
    div_final: float = 1e5  # fastai fit_one_cycle default: end near lr_max/1e5
    pct_start: float = 0.25  # fastai fit_one_cycle default: a quarter of the batches warm up
    moms: tuple[float, float, float] = DEFAULT_MOMS

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_max", tuple(float(value) for value in self.lr_max))
        object.__setattr__(self, "moms", tuple(float(value) for value in self.moms))
        if not self.lr_max or not all(math.isfinite(v) and v > 0 for v in self.lr_max):
            raise ValueError(f"lr_max needs one finite positive LR per group, got {self.lr_max}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {self.total_steps}")
        if not 0 <= self.pct_start <= 1:
            raise ValueError(f"pct_start must be in [0, 1], got {self.pct_start}")
        if self.div <= 0 or self.div_final <= 0:
            raise ValueError(f"div and div_final must be positive, got div={self.div}, div_final={self.div_final}")
        if len(self.moms) != 3:
            raise ValueError(f"moms must be (start, middle, end), got {self.moms}")

    def at(self, step: int) -> tuple[tuple[float, ...], float]:
        """Return the per-group LRs and the momentum for batch `step` (0-based)."""
        position = one_cycle_position(step, self.total_steps)
        warm_up = position < self.pct_start  # fastai: the boundary pos == pct_start is in the second phase
        if warm_up:
            t = position / self.pct_start  # pct_start > position >= 0 here, so no division by zero
            lrs = tuple(cosine_anneal(peak / self.div, peak, t) for peak in self.lr_max)
            return lrs, cosine_anneal(self.moms[0], self.moms[1], t)
        # position >= pct_start and position < 1, so pct_start < 1 here
        t = (position - self.pct_start) / (1 - self.pct_start)
        lrs = tuple(cosine_anneal(peak, peak / self.div_final, t) for peak in self.lr_max)
        return lrs, cosine_anneal(self.moms[1], self.moms[2], t)


def lr_finder_lr(step: int, *, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100) -> float:
    """Return the LR of batch `step` in fastai's exponential LR sweep: start_lr * (end_lr/start_lr) ** (step/num_it).

    end_lr itself is never used: the last batch is num_it - 1.
    """
    if num_it < 1:
        raise ValueError(f"num_it must be at least 1, got {num_it}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    if not (start_lr > 0 and end_lr > 0):
        raise ValueError(f"start_lr and end_lr must be positive, got {start_lr} and {end_lr}")
    return start_lr * (end_lr / start_lr) ** (step / num_it)


@dataclass(frozen=True)
class Phase:
    """One fit_one_cycle call of fine_tune."""

    name: str  # "frozen" (head and BN only) or "unfrozen" (all groups)
    frozen: bool
    epochs: int
    lr: slice | float  # expanded per group with group_lrs
    pct_start: float
    div: float

    def one_cycle(
        self, *, n_groups: int, batches_per_epoch: int, div_final: float = 1e5, moms=DEFAULT_MOMS
    ) -> OneCycle:
        """Build this phase's one-cycle schedule for a model with n_groups parameter groups."""
        return OneCycle(
            lr_max=group_lrs(self.lr, n_groups),
            total_steps=self.epochs * batches_per_epoch,
            div=self.div,
            div_final=div_final,
            pct_start=self.pct_start,
            moms=moms,
        )


def fine_tune_phases(
    epochs: int,
    *,
    base_lr: float = 2e-3,
    freeze_epochs: int = 1,
    lr_mult: float = 100,
    pct_start: float = 0.3,
    div: float = 5.0,
) -> tuple[Phase, ...]:
    """Return fastai fine_tune's phases: a frozen one-cycle on the head, then an unfrozen one with discriminative LRs.

    Defaults are fastai fine_tune's. freeze_epochs=0 skips the frozen phase.
    """
    if epochs < 1 or freeze_epochs < 0:
        raise ValueError(f"need epochs >= 1 and freeze_epochs >= 0, got {epochs} and {freeze_epochs}")
    if base_lr <= 0 or lr_mult <= 0:
        raise ValueError(f"base_lr and lr_mult must be positive, got {base_lr} and {lr_mult}")
    phases = []
    if freeze_epochs:
        # fastai fine_tune: fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99) with the default div=25
        phases.append(Phase("frozen", True, freeze_epochs, slice(base_lr), pct_start=0.99, div=25.0))
    # fastai fine_tune halves base_lr before unfreezing (unconditionally, even with freeze_epochs=0)
    unfrozen_lr = base_lr / 2
    phases.append(
        Phase("unfrozen", False, epochs, slice(unfrozen_lr / lr_mult, unfrozen_lr), pct_start=pct_start, div=div)
    )
    return tuple(phases)
