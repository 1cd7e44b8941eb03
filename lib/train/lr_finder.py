"""fastai's lr_find: the sweep over a Trainer, the smoothed loss, the divergence check, LR suggestions and the plot.

Behaviour follows fastai 2.8.12 (fastai/callback/schedule.py: `LRFinder`, `lr_find`, `valley`, `steep`, `minimum`,
`slide`). `lr_find(trainer)` drives the trainer one `train_step` at a time, as Lightning's tuner drives its trainer,
and puts the weights and optimizer back afterwards; the rest are pure functions of the recorded losses.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lib.common.plots import pyplot, save_figure
from lib.common.progress import ProgressCallback, progress_bar
from lib.train.schedule import lr_finder_lr

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from lib.train.trainer import Trainer

SMOOTHING_BETA = 0.98  # fastai Recorder: beta=0.98
DIVERGENCE_FACTOR = 4.0  # fastai LRFinder.after_batch: stop once the smoothed loss exceeds 4x the best one
SKIP_END = 5  # fastai lr_find and plot_lr_find: the last 5 points are left out
MIN_LR_FIND_ITERATIONS = 6  # fastai LRFinder raises num_it to at least 6


class SmoothedLoss:
    """Exponential moving average of the batch losses, debiased by 1 - beta**count, as fastai's Recorder keeps it."""

    def __init__(self, beta: float = SMOOTHING_BETA):
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.count = 0
        self._average = 0.0

    def update(self, loss: float) -> float:
        """Add one batch loss and return the new smoothed value."""
        self._average = self.beta * self._average + (1 - self.beta) * float(loss)
        self.count += 1
        return self.value

    @property
    def value(self) -> float:
        """The debiased average of the losses so far."""
        if self.count == 0:
            raise ValueError("no loss recorded yet: call update() first")
        return self._average / (1 - self.beta**self.count)

    def state(self) -> dict[str, float]:
        """Return what a checkpoint needs to continue the average."""
        return {"beta": self.beta, "count": self.count, "average": self._average}

    @classmethod
    def from_state(cls, state: dict[str, float]) -> SmoothedLoss:
        """Rebuild a smoother saved with `state()`."""
        smoother = cls(state["beta"])
        smoother.count, smoother._average = int(state["count"]), float(state["average"])
        return smoother


class DivergenceCheck:
    """Track the best smoothed loss of a sweep and tell when the loss has blown up."""

    def __init__(self, *, factor: float = DIVERGENCE_FACTOR):
        self.factor = factor
        self.best = math.inf

    def diverged(self, smoothed: float) -> bool:
        """Record one smoothed loss and return True if it is over factor x the best so far, or not finite.

        fastai does not stop on NaN (NaN > 4*best is False); we do, because once the loss is NaN every later point
        is NaN too and is cut off before the suggestions anyway.
        """
        if not math.isfinite(smoothed):
            return True
        self.best = min(self.best, smoothed)
        return smoothed > self.factor * self.best


@dataclass(frozen=True)
class Suggestion:
    """A suggested learning rate and the (lr, loss) point that marks it on the plot."""

    method: str
    lr: float
    point: tuple[float, float]


def valley(lrs: Sequence[float], losses: Sequence[float]) -> Suggestion:
    """Suggest the LR about two thirds of the way down the longest strictly decreasing run of losses (fastai default).

    The run is the longest strictly decreasing subsequence; its first maximal end wins ties.
    """
    _need_points("valley", losses, 1)
    decreasing = _decreasing_lengths(losses)
    longest = max(decreasing)
    if longest == 1:
        index = 0  # no decrease at all: fastai falls back to its initial start=end=0
    else:
        end = decreasing.index(longest)
        start = end - longest  # fastai counts the valley from one before its first point
        third = (end - start) / 3
        # fastai: start + int(third) + int(third/2); it can be -1 for a 2-point valley at index 0, which fastai wraps
        # to the last LR; we keep it on the valley instead
        index = max(start + int(third) + int(third / 2), 0)
    return Suggestion("valley", float(lrs[index]), (float(lrs[index]), float(losses[index])))


def _decreasing_lengths(losses: Sequence[float]) -> list[int]:
    """Return, for each index, the length of the longest strictly decreasing subsequence ending there (O(n²))."""
    lengths = [1] * len(losses)
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j]:
                lengths[i] = max(lengths[i], lengths[j] + 1)
    return lengths


def steep(lrs: Sequence[float], losses: Sequence[float]) -> Suggestion:
    """Suggest the LR where the loss falls fastest against log(lr)."""
    _need_points("steep", losses, 2)
    log_lrs = np.log(np.asarray(lrs, dtype=float))
    slopes = np.diff(np.asarray(losses, dtype=float)) / np.diff(log_lrs)
    index = int(np.argmin(slopes))
    return Suggestion("steep", float(lrs[index]), (float(lrs[index]), float(losses[index])))


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> Suggestion:
    """Suggest a tenth of the LR with the lowest loss; the plot marks the minimum itself."""
    _need_points("minimum", losses, 1)
    index = int(np.argmin(np.asarray(losses, dtype=float)))
    return Suggestion("minimum", float(lrs[index]) / 10, (float(lrs[index]), float(losses[index])))


def slide(
    lrs: Sequence[float],
    losses: Sequence[float],
    *,
    lr_diff: int = 15,
    thresh: float = 0.005,
    adjust_value: float = 1.0,
) -> Suggestion:
    """Suggest an LR by sliding an interval of lr_diff points left until the loss gradient is as flat at both ends.

    Defaults are fastai slide's. The plot point's loss is interpolated at the suggestion on a log10 LR axis.
    """
    _need_points("slide", losses, lr_diff + 1)
    gradient = np.gradient(np.asarray(losses, dtype=float))
    right, left = -1, -1 - lr_diff
    chosen = lrs[left]  # fastai: the initial left end when the gradients already agree
    while left >= -len(losses) and abs(gradient[right] - gradient[left]) > thresh:
        chosen = lrs[left]
        right, left = right - 1, left - 1
    lr = float(chosen) * adjust_value
    loss = float(np.interp(math.log10(lr), np.log10(np.asarray(lrs, dtype=float)), np.asarray(losses, dtype=float)))
    return Suggestion("slide", lr, (lr, loss))


def _need_points(method: str, losses: Sequence[float], needed: int) -> None:
    if len(losses) < needed:
        raise ValueError(
            f"the {method} suggestion needs at least {needed} points after trimming, got {len(losses)}; "
            "run the LR finder for more iterations (num_it) or with stop_div off"
        )


SUGGESTION_METHODS: dict[str, Callable[..., Suggestion]] = {
    "valley": valley,
    "steep": steep,
    "minimum": minimum,
    "slide": slide,
}


def trim_for_suggestions(
    lrs: Sequence[float], losses: Sequence[float], num_it: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Drop the first num_it//10 and the last 5 points, as fastai's lr_find does, then cut at the first NaN or inf.

    fastai cuts only at NaN; an infinite loss would turn every slope after it into NaN, so we cut there too.
    """
    if len(lrs) != len(losses):
        raise ValueError(f"got {len(lrs)} learning rates but {len(losses)} losses")
    kept_lrs = tuple(float(v) for v in lrs[num_it // 10 : -SKIP_END])
    kept_losses = tuple(float(v) for v in losses[num_it // 10 : -SKIP_END])
    finite = [math.isfinite(loss) for loss in kept_losses]
    cut = finite.index(False) if False in finite else len(kept_losses)
    return kept_lrs[:cut], kept_losses[:cut]


def suggest(
    lrs: Sequence[float], losses: Sequence[float], *, num_it: int, methods: Sequence[str] = ("valley",)
) -> dict[str, Suggestion]:
    """Trim the sweep as fastai does and return one suggestion per method, by name (fastai's default is valley)."""
    unknown = [name for name in methods if name not in SUGGESTION_METHODS]
    if unknown:
        raise ValueError(f"unknown suggestion method(s) {unknown}; choose from {sorted(SUGGESTION_METHODS)}")
    kept_lrs, kept_losses = trim_for_suggestions(lrs, losses, num_it)
    # Each method says how many points it needs: valley and minimum suggest from one, as fastai's do (so the
    # shortest sweep fastai allows, 6 iterations, works), steep needs two and slide sixteen.
    if not kept_losses:
        raise ValueError(
            f"none of the {len(losses)} sweep points is left after dropping the first {num_it // 10}, the last "
            f"{SKIP_END} and any from the first NaN on; run the LR finder for more iterations"
        )
    return {name: SUGGESTION_METHODS[name](kept_lrs, kept_losses) for name in methods}


@dataclass(frozen=True)
class LRFinderResult:
    """One LR sweep: the LR and smoothed loss of every batch run, and the suggestions drawn from them."""

    lrs: tuple[float, ...]
    losses: tuple[float, ...]  # smoothed, as fastai's Recorder stores them
    num_it: int  # batches asked for; fewer ran if stopped_early
    stopped_early: bool  # the loss diverged before num_it batches
    suggestions: dict[str, Suggestion] = field(default_factory=dict)


def lr_find(
    trainer: Trainer,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    stop_div: bool = True,
    methods: Sequence[str] = ("valley",),
    on_progress: ProgressCallback | None = None,
) -> LRFinderResult:
    """Sweep the LR exponentially over `num_it` training batches, then put weights and optimizer back as they were.

    Every parameter group gets the same LR; momentum and weight decay stay where they are (fastai's LRFinder). The
    sweep stops once the smoothed loss passes 4x its best (with `stop_div`) or is not finite, and the suggestions
    come from the finite points only. `on_progress(done, num_it)` is called after every batch; a bar shows on a
    terminal unless the trainer's `progress` says otherwise.
    """
    num_it = max(num_it, MIN_LR_FIND_ITERATIONS)
    saved_model = copy.deepcopy(trainer.model.state_dict())
    saved_optimizer = copy.deepcopy(trainer.optimizer.state_dict())
    try:
        with trainer.seeded(-1):  # the sweep's dropout, apart from every epoch's (epochs count from 0)
            lrs, losses, stopped_early = _sweep(trainer, start_lr, end_lr, num_it, stop_div, on_progress)
    finally:
        # Lightning's tuner restores in `finally` too: probing must leave no trace, even when interrupted.
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.model.load_state_dict(saved_model)
        trainer.optimizer.load_state_dict(saved_optimizer)
    suggestions = suggest(lrs, losses, num_it=num_it, methods=methods)
    return LRFinderResult(
        lrs=tuple(lrs), losses=tuple(losses), num_it=num_it, stopped_early=stopped_early, suggestions=suggestions
    )


def _sweep(
    trainer: Trainer, start_lr: float, end_lr: float, num_it: int, stop_div: bool, on_progress: ProgressCallback | None
) -> tuple[list[float], list[float], bool]:
    scaler, smoother, generator = trainer.precision.grad_scaler(), SmoothedLoss(), torch.Generator().manual_seed(0)
    momentum = trainer.optimizer.param_groups[0]["betas"][0]
    lrs, losses, divergence = [], [], DivergenceCheck()
    trainer.model.train()
    for step, (inputs, targets) in enumerate(_cycle(trainer.train_loader, num_it, progress=trainer.progress)):
        lr = lr_finder_lr(step, start_lr=start_lr, end_lr=end_lr, num_it=num_it)
        step_lrs = [lr] * trainer.n_groups
        # The sweep decides after every batch whether to stop, so it reads each loss back at once.
        loss = trainer.train_step(inputs, targets, step_lrs, momentum, scaler=scaler, generator=generator).item()
        smoothed = smoother.update(loss)
        lrs.append(lr)
        losses.append(smoothed)
        if on_progress is not None:
            on_progress(step + 1, num_it)
        if divergence.diverged(smoothed) and (stop_div or not math.isfinite(smoothed)):
            return lrs, losses, True
    return lrs, losses, False


def _cycle(loader: DataLoader, count: int, *, progress: bool | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `count` batches, passing over the loader again as needed (fastai's lr_find fits several epochs too)."""
    yielded = 0
    bar = progress_bar(total=count, show=progress, desc="lr_find", leave=False)
    try:  # a sweep that diverges stops iterating early: the bar must still close
        while yielded < count:
            for batch in loader:
                yield batch
                bar.update()
                yielded += 1
                if yielded == count:
                    break
    finally:
        bar.close()


def plot_lr_find(result: LRFinderResult, out_path: Path, *, skip_end: int = SKIP_END) -> Path:
    """Plot loss against LR on a log axis, mark each suggestion with its LR in the legend, and save it as a PNG."""
    return save_figure(_lr_find_figure(result, skip_end=skip_end), out_path, dpi=100)


def _lr_find_figure(result: LRFinderResult, *, skip_end: int):
    """Build the LR-finder figure (the caller closes it)."""
    plt = pyplot()
    end = len(result.lrs) - skip_end if skip_end else len(result.lrs)
    figure, axes = plt.subplots(1, 1, figsize=(6, 4))
    axes.plot(result.lrs[:end], result.losses[:end])
    axes.set_xscale("log")
    axes.set_xlabel("Learning Rate")
    axes.set_ylabel("Loss")
    # fastai plot_lr_find: suggestion markers take the colour cycle after the curve's colour
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"][1:]
    for (name, suggestion), colour in zip(result.suggestions.items(), colours, strict=False):
        lr, loss = suggestion.point
        axes.plot(lr, loss, "o", color=colour, label=f"{name}: {suggestion.lr:.2e}")
    if result.suggestions:
        axes.legend(loc="best")
    figure.tight_layout()
    return figure
