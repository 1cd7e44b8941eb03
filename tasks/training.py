"""Prefect tasks of the training stage: each builds a trainer from the presized manifest, runs one lib step, writes its
outputs under `<out_dir>/<stage>/` and returns paths and small numbers (never a model or a loader).

`recipe` is the plain dict of model and data settings every stage shares (see `recipe_settings`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from lib.files import write_text_atomically
from lib.inference import export_classifier, read_export
from lib.lr_finder import plot_lr_find
from lib.model import count_parameters
from lib.training import EpochStats, Trainer, best_epoch, vision_trainer
from tasks import tracking

LR_FIND_METHODS = ("valley", "steep", "minimum", "slide")  # valley first: fastai 2.8's default suggestion
MODEL_FILE = "model.pth"
HISTORY_FILE = "history.json"


def recipe_settings(
    *,
    arch: str,
    pretrained: bool,
    presize: int,
    size: int,
    min_scale: float,
    bs: int,
    seed: int | None,
    fp16: bool,
    device: str | None,
    workers: int | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Collect the settings every training stage shares into the small dict tasks pass around."""
    return {
        "arch": arch,
        "pretrained": pretrained,
        "presize": presize,
        "size": size,
        "min_scale": min_scale,
        "batch_size": bs,
        "seed": seed,
        "precision": "fp16" if fp16 else "fp32",
        "device": device,
        "workers": workers,
        "compile": compile,
    }


def build_trainer(
    manifest_path: str,
    vocab_path: str,
    recipe: Mapping[str, Any],
    *,
    pretrained: bool | None = None,
    checkpoint_dir: Path | None = None,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
) -> Trainer:
    """Build the vision trainer of the recipe; the model's random parts are seeded, so stages start alike."""
    manifest = pd.read_csv(manifest_path)
    vocab = json.loads(Path(vocab_path).read_text())
    seed = recipe["seed"]
    with torch.random.fork_rng(devices=[]):  # seed the head's init without touching the caller's RNG
        if seed is not None:
            torch.manual_seed(seed)
        return vision_trainer(
            manifest,
            vocab,
            arch=recipe["arch"],
            pretrained=recipe["pretrained"] if pretrained is None else pretrained,
            presize=recipe["presize"],
            size=recipe["size"],
            min_scale=recipe["min_scale"],
            batch_size=recipe["batch_size"],
            workers=recipe["workers"],
            compile=recipe.get("compile", False),
            seed=seed,
            device=recipe["device"],
            precision=recipe["precision"],
            checkpoint_dir=checkpoint_dir,
            on_epoch_end=on_epoch_end,
        )


def _progress_reporter(run_id: str, stage: str, total_epochs: int) -> Callable[[EpochStats], None]:
    """Log each epoch to MLflow and move a Prefect progress bar for the stage."""
    log_epoch = tracking.epoch_logger(run_id, stage)
    progress_id = create_progress_artifact(0.0, description=f"{stage}: epochs done")
    done = iter(range(1, total_epochs + 1))

    def report(row: EpochStats) -> None:
        log_epoch(row)
        update_progress_artifact(progress_id, 100.0 * next(done) / total_epochs)

    return report


@task(cache_policy=NO_CACHE, task_run_name="fine-tune-{stage}")
def fine_tune_classifier(
    manifest_path: str,
    vocab_path: str,
    out_dir: str,
    recipe: Mapping[str, Any],
    *,
    stage: str,
    epochs: int,
    base_lr: float,
    freeze_epochs: int,
    lr_mult: float,
    run_id: str,
) -> dict:
    """Fine-tune a fresh model the fastai way (frozen epochs, then unfrozen with discriminative LRs); export it.

    Every epoch is logged to MLflow as `<stage>/<metric>`. Returns the exported model's path, the history file, the
    loss-curve plot and the stage's numbers.
    """
    stage_dir = Path(out_dir) / stage
    reporter = _progress_reporter(run_id, stage, freeze_epochs + epochs)
    trainer = build_trainer(
        manifest_path, vocab_path, recipe, checkpoint_dir=stage_dir / "checkpoints", on_epoch_end=reporter
    )
    history = trainer.fine_tune(epochs, base_lr, freeze_epochs=freeze_epochs, lr_mult=lr_mult)
    model_path = export_classifier(
        stage_dir / MODEL_FILE,
        trainer.model,
        arch=recipe["arch"],
        vocab=trainer.vocab,
        size=recipe["size"],
        presize=recipe["presize"],
    )
    history_path = write_text_atomically(
        stage_dir / HISTORY_FILE, json.dumps([row.as_dict() for row in history], indent=1) + "\n"
    )
    return {
        "stage": stage,
        "model": str(model_path),
        "history": str(history_path),
        "loss_curves": str(trainer.plot_losses(stage_dir / "loss_curves.png")),
        **stage_numbers(history, trainer),
        "base_lr": base_lr,
        "epochs": epochs,
        "freeze_epochs": freeze_epochs,
    }


def stage_numbers(history: list[EpochStats], trainer: Trainer) -> dict[str, Any]:
    """Summarise a stage: its last epoch's metrics, throughput, time, best epoch, and what actually ran."""
    last = history[-1]
    return {
        "error_rate": last.error_rate,
        "valid_loss": last.valid_loss,
        "accuracy": last.accuracy,
        "train_loss": last.train_loss,
        "images_per_second": sum(row.images_per_second for row in history) / len(history),
        "train_seconds": sum(row.seconds for row in history),
        "best_epoch": best_epoch(history),
        "parameters": count_parameters(trainer.model),
        "precision": trainer.precision.effective,
        "device": str(trainer.device),
    }


def read_history(history_path: str) -> list[EpochStats]:
    """Read a stage's epochs back from its history file."""
    return [EpochStats(**row) for row in json.loads(Path(history_path).read_text())]


@task(cache_policy=NO_CACHE)
def find_learning_rate(manifest_path: str, vocab_path: str, out_dir: str, recipe: Mapping[str, Any]) -> dict:
    """Run fastai's LR finder on a fresh model (frozen when pretrained, as `vision_learner` leaves it); plot it.

    Returns every suggestion, the one the recipe uses (valley, fastai 2.8's default) and the plot's path.
    """
    trainer = build_trainer(manifest_path, vocab_path, recipe)
    result = trainer.lr_find(methods=LR_FIND_METHODS)
    plot = plot_lr_find(result, Path(out_dir) / "lr_find" / "lr_find.png")
    return {
        "suggestion": result.suggestions["valley"].lr,
        "suggestions": {method: found.lr for method, found in result.suggestions.items()},
        "plot": str(plot),
        "stopped_early": result.stopped_early,
        "iterations": len(result.lrs),
    }


@task(cache_policy=NO_CACHE)
def evaluate_classifier(
    model_path: str, manifest_path: str, vocab_path: str, out_dir: str, recipe: Mapping[str, Any]
) -> dict:
    """Evaluate an exported model on the validation set: metrics, confusion matrix, most confused, top losses."""
    trainer = build_trainer(manifest_path, vocab_path, recipe, pretrained=False)
    trainer.model.load_state_dict(read_export(Path(model_path)).model.state_dict())
    predictions = trainer.predictions()  # one validation pass serves the metrics and the interpretation
    files = trainer.write_interpretation(Path(out_dir) / "evaluation", predictions=predictions)
    size_mb = Path(model_path).stat().st_size / 2**20
    return {
        "valid_loss": float(predictions.losses.double().mean()),
        "accuracy": predictions.accuracy(),
        "error_rate": predictions.error_rate(),
        "model_size_mb": size_mb,
        "files": {name: str(path) for name, path in files.items()},
    }
