"""Against fastai 2.8.12: the chapter-5 recipe's training and LR finder, on the same generated pets.

Both sides get the same images, split, labels, architecture (random init), batch size, presize, size and epochs:

* fastai reads the original JPEGs through `DataBlock(item_tfms=Resize(presize), batch_tfms=aug_transforms(size,
  min_scale=0.75))` with its default `num_workers`, as a fastai user would;
* the project reads its presize cache, built once by the data stage. That cold stage is timed once on its own
  (`project_data_stage_seconds`, into a fresh cache) and is not part of the training figures.

Training: wall-clock of `fine_tune(epochs, base_lr=2e-3, freeze_epochs=1)` on a fresh learner/trainer each round,
the device synchronized before the clock stops. Images/s = images trained (train batches per epoch, drop_last, x bs x
(freeze_epochs + epochs)) / those seconds, so **validation is included for both sides**, as is each side's loader
start-up. LR finder: wall-clock of `lr_find(num_it=N, stop_div=False)` on a fresh learner/trainer, with exactly N
iterations checked on both sides. Rounds alternate fastai/project and medians are reported (bench/common.py).

Before any clock starts, one untimed forward/backward warms the kernels up, so neither side pays the first-call costs
of the math libraries (the first side measured would otherwise pay them alone).

Targets (the issue's): project >= 1.5x fastai's training images/s, and the LR finder >= 1.5x faster. Exit code 0 even
when they are missed (the JSON line says `"met": false`); non-zero only on errors.

Run: `python -m bench.vs_fastai [--quick] [options]`. stdout holds only the JSON line; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torchvision
from torch import nn

from bench.common import (
    alternate,
    base_parser,
    bench_device,
    bench_pets,
    emit,
    generated_pets,
    prepared_pets,
    reference_model,
    rounded,
    synchronize,
    timed,
)
from lib.train import lr_finder
from lib.train.precision import resolve_precision
from lib.train.trainer import Trainer, vision_trainer

BASE_LR = 2e-3  # fine_tune's default base_lr, passed explicitly on both sides
FREEZE_EPOCHS = 1  # fine_tune's default
BOOK_BASELINE_EPOCHS = 2  # fastbook ch. 5's first model: learn.fine_tune(2)
MIN_SCALE = 0.75  # fastbook ch. 5: aug_transforms(size=224, min_scale=0.75)
SEED = 0
TARGET_SPEEDUP = 1.5
# Both finders raise any N below 6 to 6 (lib.train.lr_finder.MIN_LR_FIND_ITERATIONS), so a smaller N would not run N.
LEAST_LR_FIND_ITERATIONS = 6
FASTAI_MISSING = "fastai is an optional benchmark dependency: pip install -e '.[bench]'"
# --quick: a smoke test in well under a minute of training. Explicit flags still win over these.
QUICK_SETTINGS = {
    "breeds": 2,
    "per_breed": 12,
    "size": 32,
    "presize": 48,
    "bs": 4,
    "epochs": 1,
    "repeats": 1,
    "lr_find_iterations": LEAST_LR_FIND_ITERATIONS,
}


# -- options ------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the options; --quick swaps in small defaults, and flags given explicitly still override them."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs",
        type=int,
        default=BOOK_BASELINE_EPOCHS,
        help="unfrozen epochs of fine_tune, after 1 frozen epoch (default: the book's first model, fine_tune(2))",
    )
    parser.add_argument("--repeats", type=int, default=2, help="alternated rounds per measure (medians reported)")
    parser.add_argument(
        "--lr-find-iterations", type=int, default=20, help=f"LR-finder iterations (at least {LEAST_LR_FIND_ITERATIONS})"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: " + _describe(QUICK_SETTINGS))
    # Two passes: defaults set after a first parse lose to anything given on the command line.
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK_SETTINGS)
    args = parser.parse_args(argv)
    if args.lr_find_iterations < LEAST_LR_FIND_ITERATIONS:
        # Below 6 both sides silently run 6: the iteration counts would not be the ones asked for.
        parser.error(f"--lr-find-iterations must be at least {LEAST_LR_FIND_ITERATIONS}, so both LR finders finish")
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats must be at least 1")
    return args


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key.replace('_', '-')} {value}" for key, value in settings.items())


def import_fastai() -> Any:
    """Import fastai, or exit with code 2 and a hint: it is an optional dependency of the benchmarks only."""
    try:
        import fastai
        import fastai.vision.all  # noqa: F401  (what a fastai user imports; registers the vision patches)
    except ImportError:
        print(FASTAI_MISSING, file=sys.stderr)
        sys.exit(2)
    return fastai


def fastai_precision(project_precision: str, device: torch.device) -> str:
    """The precision fastai runs for the one the project effectively runs, refusing pairs that would differ.

    fastai 2.8.12's MixedPrecision callback autocasts with device type 'cuda' only: on the CPU, `to_bf16()` would
    silently train in fp32 while the project trains in bf16, which is no longer the same recipe.
    """
    if project_precision != "fp32" and device.type != "cuda":
        sys.exit(
            f"--precision {project_precision} on {device.type}: fastai 2.8.12 autocasts on CUDA only, so the two "
            "sides would not train in the same precision. Use --precision fp32 here, or run on CUDA."
        )
    return project_precision


def log(message: str) -> None:
    """Progress for the person running the benchmark: stderr, so stdout keeps only the JSON line."""
    print(message, file=sys.stderr, flush=True)


# -- fastai's side ------------------------------------------------------------------------------------------------
class ManifestItems:
    """fastai `get_items`: the manifest's original images, in manifest order.

    The three DataBlock functions are callable objects, not bound methods: fastcore re-binds a bound method passed to
    DataBlock to the DataBlock itself, so it would lose its own instance. Module-level classes also pickle, should
    loader workers ever be spawned instead of forked.
    """

    def __init__(self, manifest: pd.DataFrame):
        self.paths = [Path(path) for path in manifest["path"]]

    def __call__(self, source: Any = None) -> list[Path]:
        return list(self.paths)


class ManifestLabels:
    """fastai `get_y`: the manifest's label of an image (the project's regex on its file name)."""

    def __init__(self, manifest: pd.DataFrame):
        self.labels = dict(zip(manifest["path"].astype(str), manifest["label"], strict=True))

    def __call__(self, item: Path) -> str:
        return self.labels[str(item)]


class ManifestSplitter:
    """fastai `splitter`: (train indices, valid indices) following the manifest's split column."""

    def __init__(self, manifest: pd.DataFrame):
        self.valid = set(manifest.loc[manifest["split"] == "valid", "path"].astype(str))

    def __call__(self, items: Sequence[Path]) -> tuple[list[int], list[int]]:
        flags = [str(item) in self.valid for item in items]
        return [i for i, valid in enumerate(flags) if not valid], [i for i, valid in enumerate(flags) if valid]


def log_to_stderr(*values: Any) -> None:
    """fastai's Recorder logs each epoch's row with `learn.logger` (print by default): keep it off stdout."""
    print(*values, file=sys.stderr, flush=True)


def fastai_learner(
    manifest: pd.DataFrame, args: argparse.Namespace, device: torch.device, precision: str, workdir: Path
) -> Any:
    """A fresh fastai learner for the recipe: DataBlock over the originals, torchvision arch, random init, seeded."""
    from fastai.torch_core import set_seed
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        ImageBlock,
        Resize,
        aug_transforms,
        error_rate,
        vision_learner,
    )

    set_seed(SEED)
    dblock = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=ManifestItems(manifest),
        get_y=ManifestLabels(manifest),
        splitter=ManifestSplitter(manifest),
        item_tfms=Resize(args.presize),
        batch_tfms=aug_transforms(size=args.size, min_scale=MIN_SCALE),
    )
    # num_workers is left to fastai: its default, min(16, CPUs), is what a fastai user gets.
    dls = dblock.dataloaders(None, bs=args.bs, device=device, path=workdir)
    arch = getattr(torchvision.models, args.arch)  # fastai's `resnet18` etc. are these same functions
    # path: lr_find saves its temporary weights under path/models, which must not land in the repository.
    learn = vision_learner(dls, arch, pretrained=False, metrics=error_rate, path=workdir)
    learn.logger = log_to_stderr
    if precision == "fp16":
        learn.to_fp16()
    elif precision == "bf16":
        learn.to_bf16()
    return learn


def fastai_images_per_fine_tune(learn: Any, epochs: int) -> int:
    """Images one fine_tune trains on: len(train loader) counts whole batches only (fastai drops the last one)."""
    return len(learn.dls.train) * learn.dls.train.bs * (FREEZE_EPOCHS + epochs)


def fastai_workers(learn: Any) -> int:
    """Loader processes fastai really uses (its DataLoader's own `num_workers` attribute is a per-worker 1)."""
    return learn.dls.train.fake_l.num_workers


# -- the project's side -------------------------------------------------------------------------------------------
def project_trainer(
    manifest: pd.DataFrame, vocab: Sequence[str], args: argparse.Namespace, device: torch.device
) -> Trainer:
    """A fresh project trainer for the recipe over the presize cache, random init, seed 0, project defaults."""
    return vision_trainer(
        manifest,
        vocab,
        arch=args.arch,
        pretrained=False,
        presize=args.presize,
        size=args.size,
        batch_size=args.bs,
        workers=args.workers,
        seed=SEED,
        progress=False,
        precision=args.precision,
        device=device,
    )


def project_images_per_fine_tune(trainer: Trainer, epochs: int) -> int:
    """Images one fine_tune trains on: the train loader drops the last incomplete batch, as fastai's does."""
    return len(trainer.train_loader) * trainer.train_loader.batch_size * (FREEZE_EPOCHS + epochs)


# -- measures -----------------------------------------------------------------------------------------------------
def warm_up(args: argparse.Namespace, classes: int, device: torch.device) -> None:
    """One untimed forward/backward at the training size, so kernel set-up is paid before either side's clock."""
    model = reference_model(args.arch, classes).to(device).train()
    inputs = torch.randn(args.bs, 3, args.size, args.size, device=device)
    loss = nn.functional.cross_entropy(model(inputs), torch.zeros(args.bs, dtype=torch.long, device=device))
    loss.backward()
    synchronize(device)


def time_data_stage(args: argparse.Namespace) -> float:
    """Seconds of the project's cold data stage (label, clean, split, presize) into a fresh, empty cache."""
    images = generated_pets(args.data_dir, breeds=args.breeds, per_breed=args.per_breed)
    with tempfile.TemporaryDirectory(prefix="presize-") as cache:
        started = time.perf_counter()
        prepared_pets(images, Path(cache), presize=args.presize)
        return time.perf_counter() - started


class Comparison:
    """Fresh learners/trainers for both sides, and what each measured round saw (images, error rate, workers)."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        vocab: Sequence[str],
        args: argparse.Namespace,
        device: torch.device,
        precision: str,
        workdir: Path,
    ):
        self.manifest, self.vocab, self.args, self.device = manifest, tuple(vocab), args, device
        self.precision, self.workdir = precision, workdir
        self.seen: dict[str, Any] = {}

    def fastai_fine_tune(self) -> float:
        """Seconds of fastai's fine_tune on a fresh learner (progress bar off)."""
        learn = fastai_learner(self.manifest, self.args, self.device, self.precision, self.workdir)
        with learn.no_bar():
            seconds, _ = timed(
                lambda: learn.fine_tune(self.args.epochs, base_lr=BASE_LR, freeze_epochs=FREEZE_EPOCHS), self.device
            )
        self.seen["fastai_images"] = fastai_images_per_fine_tune(learn, self.args.epochs)
        self.seen["fastai_error_rate"] = float(learn.recorder.values[-1][-1])  # [train_loss, valid_loss, error_rate]
        self.seen["fastai_num_workers"] = fastai_workers(learn)
        log(f"fastai  fine_tune {seconds:.1f} s, error rate {self.seen['fastai_error_rate']:.3f}")
        return seconds

    def project_fine_tune(self) -> float:
        """Seconds of the project's fine_tune on a fresh trainer."""
        trainer = project_trainer(self.manifest, self.vocab, self.args, self.device)
        seconds, history = timed(
            lambda: trainer.fine_tune(self.args.epochs, base_lr=BASE_LR, freeze_epochs=FREEZE_EPOCHS), self.device
        )
        self.seen["project_images"] = project_images_per_fine_tune(trainer, self.args.epochs)
        self.seen["project_error_rate"] = history[-1].error_rate
        self.seen["project_workers"] = trainer.train_loader.num_workers
        self.seen["project_channels_last"] = trainer.channels_last
        log(f"project fine_tune {seconds:.1f} s, error rate {history[-1].error_rate:.3f}")
        return seconds

    def fastai_lr_find(self) -> float:
        """Seconds of fastai's lr_find over exactly N iterations (no early stop, no plot)."""
        learn = fastai_learner(self.manifest, self.args, self.device, self.precision, self.workdir)
        iterations = self.args.lr_find_iterations
        with learn.no_bar():
            seconds, _ = timed(lambda: learn.lr_find(num_it=iterations, stop_div=False, show_plot=False), self.device)
        check_iterations("fastai", len(learn.recorder.lrs), iterations)
        log(f"fastai  lr_find {seconds:.1f} s")
        return seconds

    def project_lr_find(self) -> float:
        """Seconds of the project's lr_find over exactly N iterations (no early stop)."""
        trainer = project_trainer(self.manifest, self.vocab, self.args, self.device)
        iterations = self.args.lr_find_iterations
        seconds, result = timed(lambda: lr_finder.lr_find(trainer, num_it=iterations, stop_div=False), self.device)
        check_iterations("project", len(result.lrs), iterations)
        log(f"project lr_find {seconds:.1f} s")
        return seconds


def check_iterations(side: str, ran: int, asked: int) -> None:
    """Fail when an LR finder ran another number of iterations: the comparison would not be like for like."""
    if ran != asked:
        raise RuntimeError(f"{side} lr_find ran {ran} iterations, not the {asked} asked for")


def images_trained(seen: dict[str, Any]) -> int:
    """The images one fine_tune trains on, which both sides must agree on (same items, same bs, drop_last)."""
    if seen["fastai_images"] != seen["project_images"]:
        raise RuntimeError(
            f"fastai trained {seen['fastai_images']} images per fine_tune and the project {seen['project_images']}: "
            "the two sides did not get the same training set"
        )
    return seen["project_images"]


# -- the run ------------------------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, fastai_version: str) -> tuple[torch.device, dict[str, Any], dict[str, bool]]:
    """Prepare the data, run the alternated rounds and return (device, figures, targets)."""
    device = bench_device(args)
    project_precision = resolve_precision(args.precision, device).effective
    precision = fastai_precision(project_precision, device)
    manifest, vocab = bench_pets(args)
    log(f"data: {len(manifest)} images, {len(vocab)} breeds, {(manifest['split'] == 'train').sum()} for training")
    data_stage_seconds = time_data_stage(args)
    warm_up(args, len(vocab), device)
    with tempfile.TemporaryDirectory(prefix="vs-fastai-") as workdir:
        sides = Comparison(manifest, vocab, args, device, precision, Path(workdir))
        train = alternate({"fastai": sides.fastai_fine_tune, "project": sides.project_fine_tune}, args.repeats)
        lr_find = alternate({"fastai": sides.fastai_lr_find, "project": sides.project_lr_find}, args.repeats)
    seen = sides.seen
    images = images_trained(seen)
    project_rate, fastai_rate = images / train["project"], images / train["fastai"]
    figures = {
        "arch": args.arch,
        "size": args.size,
        "presize": args.presize,
        "bs": args.bs,
        "epochs": args.epochs,
        "freeze_epochs": FREEZE_EPOCHS,
        "repeats": args.repeats,
        "lr_find_iterations": args.lr_find_iterations,
        "images": len(manifest),
        "train_images": int((manifest["split"] == "train").sum()),
        "images_trained_per_fine_tune": images,
        "precision": precision,
        "fastai_version": fastai_version,
        "project_workers": seen["project_workers"],
        "fastai_num_workers": seen["fastai_num_workers"],
        "project_channels_last": seen["project_channels_last"],
        "project_data_stage_seconds": data_stage_seconds,
        "project_train_seconds": train["project"],
        "fastai_train_seconds": train["fastai"],
        "project_train_images_per_second": project_rate,
        "fastai_train_images_per_second": fastai_rate,
        "train_speedup": project_rate / fastai_rate,
        "project_lr_find_seconds": lr_find["project"],
        "fastai_lr_find_seconds": lr_find["fastai"],
        "lr_find_speedup": lr_find["fastai"] / lr_find["project"],
        "project_error_rate": seen["project_error_rate"],
        "fastai_error_rate": seen["fastai_error_rate"],
    }
    targets = {
        "train_speedup_at_least_1_5": figures["train_speedup"] >= TARGET_SPEEDUP,
        "lr_find_speedup_at_least_1_5": figures["lr_find_speedup"] >= TARGET_SPEEDUP,
    }
    return device, figures, targets


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print its one JSON line."""
    args = parse_args(argv)
    fastai = import_fastai()
    # Anything printed while measuring (fastai's epoch rows, library chatter) goes to stderr: stdout is the JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        device, figures, targets = measure(args, fastai.__version__)
    emit("vs_fastai", device, rounded(figures), targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
