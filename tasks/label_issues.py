"""The out-of-fold label review (`--label-review oof`): K baselines as parallel Prefect tasks, cleanlab's ranking.

Each fold's baseline is the flow's baseline stage (fastai's `fine_tune` defaults, `fine_tune_classifier`) trained on
the other K-1 folds, named `oof-<k>`, so its epochs land in the flow's MLflow run as `oof-<k>/<metric>`. The folds
train at once, each in a stage process of its own (tasks/training.py hands out one per concurrent stage); each
then predicts its held-out fold, and the held-out probabilities of every image go to
`lib.evaluate.label_issues.rank_label_issues`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lib.common.files import write_atomically, write_text_atomically
from lib.evaluate.evaluation import validation_predictions
from lib.evaluate.label_issues import fold_manifests, out_of_fold_probabilities, rank_label_issues
from lib.evaluate.review import REVIEW_DIR, review_table, write_review
from lib.recipe import BASELINE_LR, DEFAULT_LR_MULT, Recipe
from lib.train.distributed import data_parallel
from lib.train.stages import cpu_threads
from lib.train.trainer import resolve_device
from tasks import tracking
from tasks.training import fine_tune_classifier, prediction_settings, seeded_for_run

OOF_DIR = "oof"  # under the run's folder: the fold manifests, the probabilities and the ranked table
STAGE_PREFIX = "oof-"  # the fold baselines' stages: oof-1 .. oof-K
HELD_OUT_FILE = "held_out.npz"  # in each fold's stage folder
PROBABILITIES_FILE = "oof.npz"


def fold_stage(number: int) -> str:
    return f"{STAGE_PREFIX}{number}"


@task(cache_policy=NO_CACHE, task_run_name="predict-held-out-{stage}")
def predict_held_out(model_path: str, fold_manifest_path: str, vocab_path: str, recipe: Recipe, *, stage: str) -> str:
    """Predict a fold's held-out (`valid`) rows with its baseline; write their probabilities and targets; return the
    file's path."""
    manifest = pd.read_csv(fold_manifest_path)
    vocab = json.loads(Path(vocab_path).read_text())
    with cpu_threads(recipe.runtime.threads):
        predictions = validation_predictions(Path(model_path), manifest, vocab, **prediction_settings(recipe))
    path = Path(model_path).parent / HELD_OUT_FILE
    arrays = {"probabilities": predictions.probabilities.numpy(), "targets": predictions.targets.numpy()}
    return str(write_atomically(path, lambda temporary: _save_npz(temporary, arrays)))


def out_of_fold_review(manifest_path: str, vocab_path: str, out_dir: str, recipe: Recipe, run_id: str) -> dict:
    """Train `review.folds` baselines on K-1 folds each, at once; rank every image's label by its held-out
    probabilities; write the review table and contact sheets (lib/evaluate/review.py) to `<out_dir>/review/` and log
    the probabilities to the MLflow run under `review/` (the flow publishes the table and sheets).

    Call it from a flow, inside `tasks.training.stage_process` (outside, each fold starts a process of its own). A
    resumed run draws the same folds (seeded by `data.seed`, or by the run's id as the stages are) and each fold's
    stage resumes from its checkpoint. Returns the review's `table` (review.csv, with label_quality and issue) and
    `sheets`, `paths` (the fold manifests; `oof.npz` with the N x C probabilities, targets, label_quality, is_issue
    and cleanlab's order) and `counts` (images, folds, issues) with the out-of-fold error rate.
    """
    folds = recipe.review.folds
    recipe = seeded_for_run(recipe, run_id)  # the seed fine_tune_classifier trains each fold with
    seed = recipe.data.seed
    manifest = pd.read_csv(manifest_path)
    oof_dir = Path(out_dir) / OOF_DIR
    fold_paths = []
    for number, fold in enumerate(fold_manifests(manifest, folds, seed), start=1):
        path = oof_dir / f"fold-{number}.csv"
        fold_paths.append(str(write_text_atomically(path, fold.to_csv(index=False))))
    logger = get_run_logger()
    logger.info(f"Out-of-fold label review: {folds} baselines of {recipe.schedule.baseline_epochs} epochs at once")

    fold_recipe = _fold_recipe(recipe, folds)
    inputs = {"vocab_path": vocab_path, "out_dir": out_dir, "recipe": fold_recipe, "run_id": run_id}
    # flows/train.py's baseline stage: fastai's fine_tune defaults
    epochs = recipe.schedule.baseline_epochs
    baseline = {"epochs": epochs, "base_lr": BASELINE_LR, "freeze_epochs": 1, "lr_mult": DEFAULT_LR_MULT}
    if data_parallel(recipe.runtime):  # each fold is a torchrun of its own: one at a time, on every process
        trained = [
            fine_tune_classifier(manifest_path=path, stage=fold_stage(k), **inputs, **baseline)
            for k, path in enumerate(fold_paths, start=1)
        ]
    else:
        futures = [
            fine_tune_classifier.submit(manifest_path=path, stage=fold_stage(k), **inputs, **baseline)
            for k, path in enumerate(fold_paths, start=1)
        ]
        trained = [future.result() for future in futures]
    held_out = [
        predict_held_out(result["model"], path, vocab_path, recipe, stage=fold_stage(k))
        for k, (result, path) in enumerate(zip(trained, fold_paths, strict=True), start=1)
    ]
    return _rank(manifest, fold_paths, held_out, vocab_path, out_dir, run_id, recipe.review.review_per_class)


def _fold_recipe(recipe: Recipe, folds: int) -> Recipe:
    """The recipe the folds train with: on the CPU, without a thread count, they share the cores instead of each
    taking them all (K processes of as many threads as cores would thrash)."""
    if recipe.runtime.threads is not None or resolve_device(recipe.runtime.device).type != "cpu":
        return recipe
    return recipe.updated({"threads": max(1, (os.cpu_count() or 1) // folds)})


def _rank(
    manifest: pd.DataFrame,
    fold_paths: list[str],
    held_out: list[str],
    vocab_path: str,
    out_dir: str,
    run_id: str,
    per_class: int,
) -> dict:
    folds = [pd.read_csv(path) for path in fold_paths]
    saved = [np.load(path) for path in held_out]
    probabilities = out_of_fold_probabilities(
        folds, [arrays["probabilities"] for arrays in saved], [arrays["targets"] for arrays in saved]
    )
    targets = manifest["target"].to_numpy()
    label_quality, is_issue, order = rank_label_issues(targets, probabilities)
    vocab = json.loads(Path(vocab_path).read_text())
    arrays = {
        "probabilities": probabilities, "targets": targets, "label_quality": label_quality, "is_issue": is_issue,
        "order": order,
    }  # fmt: skip
    npz = write_atomically(Path(out_dir) / OOF_DIR / PROBABILITIES_FILE, lambda temporary: _save_npz(temporary, arrays))
    # The same review table as the baseline's top losses, ranked within each class by label quality instead
    table = review_table(manifest, probabilities, vocab, label_quality=label_quality, is_issue=is_issue)
    review = write_review(table, Path(out_dir) / REVIEW_DIR, per_class=per_class)
    error_rate = float((probabilities.argmax(axis=1) != targets).mean())
    counts = {"images": len(manifest), "folds": len(folds), "issues": int(is_issue.sum())}
    tracking.log_files(run_id, [npz], REVIEW_DIR)
    tracking.log_metrics(run_id, {"oof_error_rate": error_rate, "oof_label_issues": counts["issues"]})
    get_run_logger().info(
        f"Out-of-fold label review: {counts['issues']} of {counts['images']} labels look wrong (confident learning); "
        f"out-of-fold error rate {error_rate:.3f}; the review table is {review['table']}"
    )
    sheets = {label: str(path) for label, path in review["sheets"].items()}
    paths = {"folds": fold_paths, "probabilities": str(npz)}
    return {"table": str(review["table"]), "sheets": sheets, "paths": paths, "counts": counts, "error_rate": error_rate}


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would add `.npz` to the temporary name
        np.savez(file, **arrays)
