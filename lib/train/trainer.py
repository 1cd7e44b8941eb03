"""The chapter-5 fit loop in plain PyTorch: one-cycle fits, fine_tune, freezing, checkpoints and resume.

A `Trainer` owns a model split into fastai's three parameter groups, an AdamW optimizer equal to fastai's Adam, the
batch augmentation and the mixed-precision policy. Every epoch trains, measures the validation loss and error rate and
writes a checkpoint (`last.pt`, the one before kept as `previous.pt`: lib/train/checkpoint.py); its stats leave
through one plain callable, `on_epoch_end(stats)`, so the Prefect flow and MLflow logging sit outside lib/. What is not
fitting uses the Trainer's public parts from elsewhere: the LR finder (lib/train/lr_finder.py) drives `train_step`,
and the loss-curve plot (lib/evaluate/interpret.py) reads `smoothed_losses` and `valid_points`.

Reproducibility: the batch order, the crops, the augmentation and dropout of epoch k depend only on (seed, k). A run
resumed from the checkpoint of epoch k therefore continues exactly as the uninterrupted run would have; one resumed
from `previous.pt` (its `last.pt` damaged) repeats an epoch and ends the same.
"""

from __future__ import annotations

import math
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lib.common.errors import InputError, UserError
from lib.common.progress import progress_bar
from lib.data.augment import BatchAugmentation, aug_transforms
from lib.data.loading import Shard, default_workers, epoch_seed, make_loaders
from lib.data.presize import read_presized
from lib.recipe import DEFAULT_BATCH_SIZE, DEFAULT_PRESIZE
from lib.train import distributed
from lib.train.checkpoint import (
    LAST_CHECKPOINT,
    Resumption,
    load_checkpoint,
    previous_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from lib.train.distributed import DataParallel
from lib.train.lr_finder import SmoothedLoss
from lib.train.model import create_model, freeze_to, no_weight_decay, parameter_groups
from lib.train.precision import Precision, resolve_precision, use_channels_last
from lib.train.schedule import DEFAULT_MOMS, OneCycle, Phase, fine_tune_phases, group_lrs

DEFAULT_LR = 1e-3  # fastai Learner default lr
DEFAULT_WEIGHT_DECAY = 0.01  # fastai Adam wd, decoupled (AdamW)
SQR_MOM = 0.99  # fastai Adam sqr_mom = AdamW beta2
ADAM_EPS = 1e-5  # fastai Adam eps (torch's default is 1e-8)
# Training losses stay on the device and are read back this many batches at a time: one host-device sync per chunk
# instead of one per batch (`.item()`), which stalls a GPU's queue. A non-finite loss is still caught within a chunk.
LOSS_READBACK_BATCHES = 8

EpochCallback = Callable[["EpochStats"], None]
# What `_save_progress` writes besides the checkpoint's format and plan: a checkpoint lacking one is damaged.
PROGRESS_KEYS = (
    "phase_index", "epochs_done", "epochs_run", "model", "optimizer", "scaler", "smoother", "history",
    "smoothed_losses", "valid_points",
)  # fmt: skip


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class EpochStats:
    """One row of the training table: fastai's columns plus the mean train loss, throughput and the last LR."""

    phase: str
    epoch: int  # 0-based within the phase
    epochs: int
    train_loss: float  # fastai's printed train_loss: debiased EMA (beta 0.98) at the epoch's last batch
    train_loss_mean: float
    valid_loss: float
    error_rate: float
    accuracy: float
    seconds: float
    images_per_second: float
    lr: float  # the head group's LR at the epoch's last batch

    def as_dict(self) -> dict[str, Any]:
        """Return the stats as a plain dict."""
        return asdict(self)


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """Return the requested device, or CUDA when present, else MPS, else CPU (fastai's default_device order)."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_optimizer(
    model: nn.Module, *, weight_decay: float = DEFAULT_WEIGHT_DECAY, fused: bool = False
) -> torch.optim.AdamW:
    """Build AdamW over the model's parameter groups; norm parameters and biases get no weight decay.

    fastai's Adam (decoupled wd, eps 1e-5, beta2 0.99) gives the same updates as AdamW with these settings
    (fastai 2.8.12 optimizer.py, measured). Each fastai group becomes two torch groups, tagged with its `layer_group`.
    `fused` runs the step as one kernel; on CUDA it also lets GradScaler skip inf/NaN steps on the device, without
    the host sync its unfused path needs (torch.amp.GradScaler.step).
    """
    exempt = no_weight_decay(model)
    torch_groups = []
    for index, params in enumerate(parameter_groups(model)):
        for decays in (True, False):
            chosen = [p for p in params if (id(p) not in exempt) == decays]
            if chosen:
                torch_groups.append(
                    {"params": chosen, "layer_group": index, "weight_decay": weight_decay if decays else 0.0}
                )
    return torch.optim.AdamW(
        torch_groups, lr=DEFAULT_LR, betas=(DEFAULT_MOMS[0], SQR_MOM), eps=ADAM_EPS, fused=fused or None
    )


class Trainer:
    """Train a classifier split into parameter groups, the way fastai's Learner does for chapter 5."""

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        valid_loader: DataLoader,
        *,
        vocab: Sequence[str],
        augmentation: BatchAugmentation | None = None,
        device: torch.device | str | None = None,
        precision: str = "fp32",
        channels_last: bool | None = None,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        train_bn: bool = True,
        seed: int | None = None,
        checkpoint_dir: Path | None = None,
        on_epoch_end: EpochCallback | None = None,
        on_resume: Callable[[str], None] | None = None,
        progress: bool | None = None,
        epoch_table: bool = True,
        compile: bool = False,
        parallel: DataParallel | None = None,
    ):
        # A data-parallel rank (lib/train/distributed.py): its loaders yield its share, rank 0 alone writes and tells.
        self.parallel = parallel
        self.main = parallel is None or parallel.main
        self.device = resolve_device(device)
        self.precision: Precision = resolve_precision(precision, self.device)
        self.channels_last = use_channels_last(self.device, channels_last)
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=memory_format)
        # torch.compile pays only when its minute of compiling is amortised: off by default (BENCHMARKS.md). The
        # compiled module shares the parameters, so checkpoints and exports keep using `self.model`.
        self.compiled = compile
        self._wrap()
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.vocab = tuple(vocab)
        self.augmentation = augmentation or aug_transforms()
        self.weight_decay = weight_decay
        self.train_bn = train_bn
        self.seed = secrets.randbits(62) if seed is None else seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_epoch_end = on_epoch_end
        # Told in one line which checkpoint a resumed fit continues from, and any damaged one it moved aside.
        self.on_resume = on_resume or (lambda line: tqdm.write(line, file=sys.stderr))
        self.progress = progress if self.main else False  # per-batch bars: on a terminal (None), always or never
        self.epoch_table = epoch_table  # each epoch as a row of fastai's table on stderr (rank 0's)
        self.optimizer = make_optimizer(self.model, weight_decay=weight_decay, fused=self.device.type == "cuda")
        self.n_groups = len(parameter_groups(self.model))
        self.loss_function = nn.CrossEntropyLoss()  # fastai CrossEntropyLossFlat: mean, no smoothing
        # What fastai's Recorder keeps, across fits and checkpoints: lib.evaluate.interpret.plot_losses draws it.
        self.history: list[EpochStats] = []
        self.smoothed_losses: list[float] = []  # per training batch
        self.valid_points: list[tuple[int, float]] = []  # (iteration, valid loss) at each epoch end
        self.epochs_run = 0  # across fits: seeds each epoch's randomness

    def _wrap(self) -> None:
        """Make `forward`: the model, in DDP over its trainable parameters on a rank, compiled if asked."""
        module = distributed.wrap(self.model, self.device) if self.parallel else self.model
        self.forward = torch.compile(module) if self.compiled else module

    # -- freezing -------------------------------------------------------------------------------------------------
    def freeze_to(self, n: int) -> None:
        """Freeze the groups before `n` (norm layers keep training with train_bn) and clear the optimizer state."""
        freeze_to(self.model, n, train_bn=self.train_bn)
        self.optimizer.state.clear()  # fastai freeze_to calls opt.clear_state(): Adam moments start again
        if self.parallel is not None:
            self._wrap()  # DDP syncs the gradients of the parameters that trained when it was built

    def freeze(self) -> None:
        """Train only the head (and norm layers): fastai's freeze() == freeze_to(-1)."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Train every group: fastai's unfreeze() == freeze_to(0)."""
        self.freeze_to(0)

    def is_frozen(self) -> bool:
        """Return whether some parameter group is frozen (its non-norm parameters take no gradient)."""
        return not all(p.requires_grad for p in self.model.parameters())

    # -- fitting --------------------------------------------------------------------------------------------------
    def fit_one_cycle(
        self,
        epochs: int,
        lr_max: float | slice | Sequence[float] = DEFAULT_LR,
        *,
        div: float = 25.0,
        div_final: float = 1e5,
        pct_start: float = 0.25,
        moms: tuple[float, float, float] = DEFAULT_MOMS,
        resume_from: Path | None = None,
    ) -> list[EpochStats]:
        """Train `epochs` epochs with the one-cycle schedule (fastai fit_one_cycle defaults)."""
        # `frozen` records the current freezing, so a checkpoint is never resumed with other groups trainable.
        phase = Phase(name="fit", frozen=self.is_frozen(), epochs=epochs, lr=lr_max, pct_start=pct_start, div=div)
        return self._fit_phases("fit_one_cycle", (phase,), resume_from, div_final=div_final, moms=moms)

    def fine_tune(
        self,
        epochs: int,
        base_lr: float = 2e-3,
        *,
        div_final: float = 1e5,
        moms: tuple[float, float, float] = DEFAULT_MOMS,
        resume_from: Path | None = None,
        **phase_settings: float,
    ) -> list[EpochStats]:
        """Train the head alone, then everything with discriminative LRs (fastai fine_tune's exact phases).

        Args:
            epochs: Epochs of the unfrozen phase.
            base_lr: Peak LR of the frozen phase's head; the unfrozen phase peaks at half of it.
            div_final: One-cycle final divisor for both phases.
            moms: One-cycle momentum (Adam beta1) schedule for both phases.
            resume_from: A `last.pt` checkpoint written by this same call, to continue from (its `previous.pt`
                when it is damaged or absent; the start when both are damaged).
            **phase_settings: freeze_epochs, lr_mult, pct_start and div of `lib.train.schedule.fine_tune_phases`.
        """
        phases = fine_tune_phases(epochs, base_lr=base_lr, **phase_settings)
        return self._fit_phases("fine_tune", phases, resume_from, div_final=div_final, moms=moms)

    def _fit_phases(
        self,
        kind: str,
        phases: Sequence[Phase],
        resume_from: Path | None,
        *,
        div_final: float,
        moms: tuple[float, float, float],
    ) -> list[EpochStats]:
        plan = self._plan(kind, phases, div_final=div_final, moms=moms)
        state = self._resume(resume_from, plan) if resume_from else None
        if state is not None:
            self._restore_progress(state)
        done_phase, done_epochs = (state["phase_index"], state["epochs_done"]) if state else (-1, 0)
        stats: list[EpochStats] = []
        for index, phase in enumerate(phases):
            if index < done_phase or (index == done_phase and done_epochs >= phase.epochs):
                continue
            if kind == "fine_tune":
                self.freeze() if phase.frozen else self.unfreeze()
            schedule = phase.one_cycle(
                n_groups=self.n_groups, batches_per_epoch=len(self.train_loader), div_final=div_final, moms=moms
            )
            stats += self._fit_phase(index, phase, schedule, plan, state if index == done_phase else None)
        return stats

    def _plan(self, kind: str, phases: Sequence[Phase], **settings: Any) -> dict[str, Any]:
        described = [
            {
                "name": phase.name,
                "frozen": phase.frozen,
                "epochs": phase.epochs,
                "lr": list(group_lrs(phase.lr, self.n_groups)),
                "pct_start": phase.pct_start,
                "div": phase.div,
            }
            for phase in phases
        ]
        extra = {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}
        return {"kind": kind, "phases": described, "seed": self.seed, "batches": len(self.train_loader), **extra}

    def _fit_phase(
        self, index: int, phase: Phase, schedule: OneCycle, plan: dict[str, Any], state: dict[str, Any] | None
    ) -> list[EpochStats]:
        # fastai's MixedPrecision callback makes a new GradScaler and the Recorder a new smoother for every fit.
        scaler = self.precision.grad_scaler()
        smoother = SmoothedLoss()
        first_epoch = 0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            smoother = SmoothedLoss.from_state(state["smoother"])
            first_epoch = state["epochs_done"]
        stats = []
        for epoch in range(first_epoch, phase.epochs):
            row = self._fit_epoch(phase, epoch, schedule, scaler, smoother)
            if not math.isfinite(row.valid_loss):  # diverged weights: never checkpoint them over the last good ones
                raise self._non_finite(row.valid_loss, phase, epoch, None, [row.lr], loss="validation")
            stats.append(row)
            self.history.append(row)
            self._save_progress(plan, index, epoch + 1, scaler, smoother)
            self._report(row)
        return stats

    def _fit_epoch(
        self, phase: Phase, epoch: int, schedule: OneCycle, scaler: torch.amp.GradScaler, smoother: SmoothedLoss
    ) -> EpochStats:
        started = time.perf_counter()
        with self.seeded(self.epochs_run):  # dropout of this epoch
            train_loss_mean, lr, images = self._train_epoch(phase, epoch, schedule, scaler, smoother)
        train_seconds = time.perf_counter() - started
        valid_loss, accuracy = self.validate()
        self.epochs_run += 1
        self.valid_points.append((len(self.smoothed_losses), valid_loss))
        return EpochStats(
            phase=phase.name,
            epoch=epoch,
            epochs=phase.epochs,
            train_loss=smoother.value,
            train_loss_mean=train_loss_mean,
            valid_loss=valid_loss,
            error_rate=1.0 - accuracy,
            accuracy=accuracy,
            seconds=time.perf_counter() - started,
            images_per_second=images / train_seconds,
            lr=lr,
        )

    def _train_epoch(
        self, phase: Phase, epoch: int, schedule: OneCycle, scaler: torch.amp.GradScaler, smoother: SmoothedLoss
    ) -> tuple[float, float, int]:
        self.model.train()  # frozen BatchNorm layers keep updating their statistics, as in fastai
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epochs_run))
        batches = self._epoch_batches(self.train_loader, desc=f"{phase.name} {epoch + 1}/{phase.epochs}")
        losses = LossReadback(smoother, self.smoothed_losses, across_ranks=self.parallel is not None)
        images, lrs = 0, [0.0]
        for batch, (inputs, targets) in enumerate(batches):
            step = epoch * len(self.train_loader) + batch
            lrs, momentum = schedule.at(step)
            losses.add(self.train_step(inputs, targets, lrs, momentum, scaler=scaler, generator=generator), lrs)
            images += len(targets)
            if losses.due() or batch == len(self.train_loader) - 1:
                self._read_losses(losses, phase, epoch, batch)
                batches.set_postfix(loss=f"{smoother.value:.4f}", refresh=False)
        world_size = self.parallel.world_size if self.parallel else 1
        return losses.total / max(1, len(self.train_loader)), lrs[-1], images * world_size

    def _read_losses(self, losses: LossReadback, phase: Phase, epoch: int, batch: int) -> None:
        non_finite = losses.read()
        if non_finite is not None:
            value, back, lrs = non_finite
            raise self._non_finite(value, phase, epoch, batch - back, lrs)

    def train_step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        lrs: Sequence[float],
        momentum: float,
        *,
        scaler: torch.amp.GradScaler,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Run one optimizer step on a batch of the train loader; return its loss detached, still on the device.

        `lrs` holds one LR per parameter group and `momentum` is Adam's beta1. The caller puts the model in train
        mode, and owns the GradScaler (one per fit, as fastai's MixedPrecision) and the CPU generator the batch
        augmentation draws from. Reading the loss back (a host-device sync) is left to the caller too.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lrs[group["layer_group"]]
            group["betas"] = (momentum, SQR_MOM)  # the one-cycle "momentum" is Adam's beta1
        inputs, targets = self._to_device(inputs, targets, train=True, generator=generator)
        with self.precision.autocast():
            logits = self.forward(inputs)
        loss = self.loss_function(logits.float(), targets)  # fastai casts predictions to fp32 before the loss
        scaler.scale(loss).backward()
        scaler.step(self.optimizer)  # skipped when the unscaled fp16 gradients hold inf/NaN
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    @contextmanager
    def seeded(self, epoch: int) -> Iterator[None]:
        """Seed the global RNG (dropout) for `epoch` of this run inside the block; outside, it is left as it was."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        seed = epoch_seed(self.seed, epoch)
        if self.parallel is not None and self.parallel.rank:  # rank 0 draws what one process would; the others differ
            seed = epoch_seed(seed, self.parallel.rank)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _to_device(
        self, inputs: torch.Tensor, targets: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        share = (self.parallel.rank, self.parallel.world_size) if self.parallel and train else None
        inputs = self.augmentation.on_device(
            inputs, self.device, train=train, channels_last=self.channels_last, generator=generator, share=share
        )
        return inputs, targets.to(self.device, non_blocking=True)

    def _epoch_batches(self, loader: DataLoader, *, desc: str) -> tqdm:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epochs_run)
        return progress_bar(loader, show=self.progress, desc=desc, leave=False, unit="batch")

    def _non_finite(
        self, value: float, phase: Phase, epoch: int, batch: int | None, lrs: Sequence[float], *, loss: str = "training"
    ) -> NonFiniteLossError:
        kept = (
            f" The checkpoint of the last finished epoch is kept in {self.checkpoint_dir}."
            if self.checkpoint_dir and self.history
            else ""
        )
        at_batch = f", batch {batch + 1}/{len(self.train_loader)}" if batch is not None else ""
        return NonFiniteLossError(
            f"The {loss} loss became {value} in phase '{phase.name}', epoch {epoch + 1}/{phase.epochs}{at_batch}, at "
            f"learning rate {lrs[-1]:.3g} (head group): the learning rate is too high for this model. Train with a "
            f"smaller one (--base-lr on the pets CLI, e.g. {lrs[-1] / 10:.1g}; the LR finder, `pets lr-find`, "
            f"suggests one), and with fp16 try fp32 (--no-fp16).{kept}"
        )

    # -- validation ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def validate(self, loader: DataLoader | None = None) -> tuple[float, float]:
        """Return (mean cross-entropy, accuracy) over a loader, the validation set by default.

        On a data-parallel rank, the loader holds the rank's run of the images, the ranks' BatchNorm statistics are
        averaged first (the same model on every rank, the one rank 0 saves) and the sums are reduced over every rank:
        the metrics of the whole set.
        """
        self.model.eval()
        if self.parallel is not None:
            distributed.average_buffers(self.model)
        # Per-batch sums stay on the device and are read back once: no GPU sync per validation batch.
        loss_sums, correct, count = [], [], 0
        for inputs, targets in self._epoch_batches(loader or self.valid_loader, desc="valid"):
            inputs, targets = self._to_device(inputs, targets, train=False)
            with self.precision.autocast():
                logits = self.forward(inputs)
            logits = logits.float()
            loss_sums.append(F.cross_entropy(logits, targets, reduction="sum"))
            correct.append((logits.argmax(dim=1) == targets).sum())
            count += len(targets)
        # One float64 vector of the three sums (a rank may hold no batch at all); one all-reduce on a rank.
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = torch.stack(
            [
                torch.stack(loss_sums).double().sum() if loss_sums else zero,
                torch.stack(correct).double().sum() if correct else zero,
                torch.tensor(float(count), dtype=torch.float64, device=self.device),
            ]
        )
        if self.parallel is not None:
            sums = distributed.sum_across(sums)
        loss_sum, correct_count, count = sums.cpu().tolist()
        if count == 0:
            raise InputError("The validation set is empty: raise --valid-pct so some images are held out.")
        return loss_sum / count, correct_count / count

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _resume(self, resume_from: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
        found = self._find_resumption(resume_from, plan)
        if not self.main:
            return found.state
        if found.state is None:
            outcome = "training from the start"
        else:  # beside a damaged file, its folder is named already
            source = found.path.name if found.damaged else found.path
            outcome = f"resuming from {source} (after epoch {found.state['epochs_run']})"
        self.on_resume("; ".join([*found.damaged, outcome]) + ".")
        return found.state

    def _find_resumption(self, resume_from: Path, plan: dict[str, Any]) -> Resumption:
        """Find the checkpoint to resume from; on ranks, rank 0 finds it (moving damaged ones aside) for all."""
        if self.parallel is None:
            return resume_checkpoint(resume_from, plan=plan, keys=PROGRESS_KEYS)
        found = resume_checkpoint(resume_from, plan=plan, keys=PROGRESS_KEYS) if self.main else None
        path = distributed.share_rank0_object(None if found is None or found.path is None else str(found.path))
        if self.main:
            return found
        state = None if path is None else load_checkpoint(Path(path), plan=plan, keys=PROGRESS_KEYS)
        return Resumption(state, None if path is None else Path(path), ())

    def _save_progress(
        self, plan: dict[str, Any], phase_index: int, epochs_done: int, scaler: torch.amp.GradScaler, smoother
    ) -> None:
        if self.checkpoint_dir is None or not self.main:
            return
        state = {
            "plan": plan,
            "phase_index": phase_index,
            "epochs_done": epochs_done,
            "epochs_run": self.epochs_run,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "smoother": smoother.state(),
            "history": [row.as_dict() for row in self.history],
            "smoothed_losses": self.smoothed_losses,
            "valid_points": self.valid_points,
        }
        last = self.checkpoint_dir / LAST_CHECKPOINT
        save_checkpoint(last, state, keep_previous=previous_checkpoint(last))

    def _restore_progress(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.epochs_run = state["epochs_run"]
        self.history = [EpochStats(**row) for row in state["history"]]
        self.smoothed_losses = list(state["smoothed_losses"])
        self.valid_points = [tuple(point) for point in state["valid_points"]]

    def _report(self, row: EpochStats) -> None:
        if not self.main:
            return
        if self.epoch_table:
            tqdm.write(format_stats_row(row, header=len(self.history) == 1), file=sys.stderr)
        if self.on_epoch_end is not None:
            self.on_epoch_end(row)


class LossReadback:
    """Training losses kept on the device and read back in chunks: the smoother and the epoch's sum see every value.

    `read()` returns (value, batches before the chunk's end, head LRs) of the first non-finite loss, if any.
    """

    def __init__(
        self,
        smoother: SmoothedLoss,
        smoothed: list[float],
        every: int = LOSS_READBACK_BATCHES,
        *,
        across_ranks: bool = False,
    ):
        self.smoother, self.smoothed, self.every = smoother, smoothed, every
        # On data-parallel ranks each loss is the mean over the rank's equal share: their mean is the global batch's
        self.across_ranks = across_ranks
        self.pending: list[torch.Tensor] = []
        self.pending_lrs: list[Sequence[float]] = []
        self.total = 0.0

    def add(self, loss: torch.Tensor, lrs: Sequence[float]) -> None:
        self.pending.append(loss)
        self.pending_lrs.append(lrs)

    def due(self) -> bool:
        return len(self.pending) >= self.every

    def read(self) -> tuple[float, int, Sequence[float]] | None:
        losses = torch.stack(self.pending)
        if self.across_ranks:
            losses = distributed.sum_across(losses) / torch.distributed.get_world_size()
        values = losses.tolist()  # the one host-device sync of the chunk
        lrs, count = self.pending_lrs, len(values)
        self.pending, self.pending_lrs = [], []
        for index, value in enumerate(values):
            if not math.isfinite(value):
                return value, count - 1 - index, lrs[index]
            self.smoothed.append(self.smoother.update(value))
            self.total += value
        return None


def best_epoch(history: Sequence[EpochStats], *, phase: str = "unfrozen") -> int:
    """Return how many epochs of `phase` gave the lowest error rate (ties: lower valid loss, then fewer epochs).

    fastbook ch. 5 retrains from scratch for that many epochs instead of stopping early: a one-cycle schedule cut
    short leaves the model mid-schedule (fastbook 05_pet_breeds.ipynb, "Selecting the Number of Epochs").
    """
    rows = [row for row in history if row.phase == phase]
    if not rows:
        raise ValueError(f"no {phase!r} epochs in the history; phases present: {sorted({r.phase for r in history})}")
    best = min(rows, key=lambda row: (row.error_rate, row.valid_loss, row.epoch))
    return best.epoch + 1


def format_stats_row(row: EpochStats, *, header: bool = False) -> str:
    """Format one epoch like fastai's progress table (6-decimal floats, mm:ss)."""
    minutes, seconds = divmod(int(round(row.seconds)), 60)
    line = (
        f"{row.phase:<9} {row.epoch:>5} {row.train_loss:>10.6f} {row.valid_loss:>10.6f} {row.error_rate:>10.6f} "
        f"{row.images_per_second:>8.1f} {minutes:02d}:{seconds:02d}"
    )
    if not header:
        return line
    titles = f"{'phase':<9} {'epoch':>5} {'train_loss':>10} {'valid_loss':>10} {'error_rate':>10} {'img/s':>8} time"
    return titles + "\n" + line


def rank_batch_size(batch_size: int, world_size: int) -> int:
    """Each rank's share of the global batch; refused when the ranks cannot share it equally."""
    if batch_size % world_size:
        raise InputError(
            f"--bs {batch_size} does not split equally over the {world_size} training processes: give a multiple of "
            f"{world_size} (--bs is the global batch)"
        )
    return batch_size // world_size


def check_presize(manifest: pd.DataFrame, presize: int) -> None:
    """Fail early, in the main process, when the manifest's images were presized for another size."""
    if manifest.empty:
        raise InputError("The manifest has no images: run the data stage first (pets summary).")
    first = manifest.iloc[0]
    found = min(read_presized(first["presized_path"], first.get("path")).size)  # heals a damaged first entry too
    if found != presize:
        raise InputError(
            f"The manifest's images were presized to {found}px, but presize={presize} was asked for: pass "
            f"presize={found}, or re-run the data stage with --presize {presize}."
        )


def vision_trainer(
    manifest: pd.DataFrame,
    vocab: Sequence[str],
    *,
    arch: str = "resnet34",
    pretrained: bool | str | Path = True,
    presize: int = DEFAULT_PRESIZE,
    size: int = 224,
    min_scale: float = 0.75,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    seed: int | None = None,
    parallel: DataParallel | None = None,
    **trainer_settings: Any,
) -> Trainer:
    """Build fastai's `vision_learner` equivalent over a presized split manifest; pretrained models start frozen.

    On a data-parallel rank (`parallel`), `batch_size` is still the global batch: the rank's loaders take its share.
    """
    check_presize(manifest, presize)
    device = resolve_device(trainer_settings.pop("device", None))
    workers = default_workers(device) if workers is None else workers
    shard = None
    if parallel is not None:
        shard = Shard(parallel.rank, parallel.world_size, rank_batch_size(batch_size, parallel.world_size))
    train_loader, valid_loader = make_loaders(
        manifest, size=presize, batch_size=shard.batch_size if shard else batch_size, workers=workers, seed=seed,
        pin_memory=device.type == "cuda", shard=shard,
    )  # fmt: skip
    model = create_model(arch, len(vocab), pretrained=pretrained)
    trainer = Trainer(
        model,
        train_loader,
        valid_loader,
        vocab=vocab,
        augmentation=aug_transforms(size, min_scale),
        device=device,
        seed=seed,
        parallel=parallel,
        **trainer_settings,
    )
    if pretrained:
        trainer.freeze()  # fastai vision_learner freezes a pretrained body
    return trainer
