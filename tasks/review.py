"""Prefect tasks of the label review: rank every image by how wrong its label looks, and show the ranking where people
look (the run's MLflow artifacts under review/, a Prefect artifact linking them); read a logged review back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lib.common.numbers import significant
from lib.evaluate.evaluation import validation_predictions
from lib.evaluate.review import REVIEW_CSV, REVIEW_DIR, review_table, write_review
from lib.recipe import Recipe
from lib.train.stages import cpu_threads
from tasks import tracking
from tasks.training import prediction_settings

ARTIFACT_KEY = "label-review"
ARTIFACT_ROWS = 10  # table rows the Prefect artifact shows: the worst losses over every class


@task(cache_policy=NO_CACHE)
def review_top_losses(model_path: str, manifest_path: str, vocab_path: str, out_dir: str, recipe: Recipe) -> dict:
    """Predict every image, train and valid, with an exported model and write the review table and contact sheets.

    ImageClassifierCleaner reviews both sets (fastai 2.8 fastai/vision/widgets.py): the training images are where a
    wrong label does its harm. They are predicted as validation images are (centre crop, no augmentation), through
    the one evaluation path (`lib.evaluate.evaluation.validation_predictions`). Files go to `<out_dir>/review/`.
    """
    manifest = pd.read_csv(manifest_path)
    vocab = json.loads(Path(vocab_path).read_text("utf-8"))
    every_row = manifest.assign(split="valid")  # the evaluation predicts the validation rows, in manifest order
    with cpu_threads(recipe.runtime.threads):
        predictions = validation_predictions(Path(model_path), every_row, vocab, **prediction_settings(recipe))
    table = review_table(manifest, predictions.probabilities.numpy(), vocab)
    written = write_review(table, Path(out_dir) / REVIEW_DIR, per_class=recipe.review.review_per_class)
    return {"table": str(written["table"]), "sheets": {label: str(path) for label, path in written["sheets"].items()}}


def publish_review(run: tracking.TrainingRun, review: dict, *, ranking: str) -> None:
    """Log the review's files under review/ in the MLflow run, and link them from a Prefect artifact with its top rows.

    `ranking` says in the artifact how the rows were ranked.
    """
    tracking.log_files(run.run_id, [review["table"], *review["sheets"].values()], REVIEW_DIR)
    files = f"{run.url}/artifacts/{REVIEW_DIR}"  # the MLflow UI opens the run's artifact browser on that file
    sheets = " · ".join(f"[{label}]({files}/{Path(path).name})" for label, path in review["sheets"].items())
    top = pd.read_csv(review["table"]).sort_values("loss", ascending=False, kind="stable").head(ARTIFACT_ROWS)
    rows = [
        f"| {row.label} | {row.predicted} | {significant(row.loss)} | {significant(row.probability)} | {row.split} | "
        f"{row.file} |"
        for row in top.itertuples(index=False)
    ]
    create_markdown_artifact(
        "\n".join(
            [
                f"**Label review** ({ranking}) of MLflow run [{run.run_id}]({run.url}): "
                f"[{REVIEW_CSV}]({files}/{REVIEW_CSV}) (here: {review['table']})",
                "",
                f"Contact sheets per class: {sheets}",
                "",
                f"The {len(top)} worst:",
                "",
                "| label | predicted | loss | probability | split | file |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
                f"`pets review show {run.run_id}` lists them per class. Mark the action column of {REVIEW_CSV} (keep, "
                f"delete, relabel:<class>), then `pets review apply {REVIEW_CSV} --run {run.run_id}`.",
            ]
        ),
        key=ARTIFACT_KEY,
        description="Images whose labels look wrong, for a person to keep, delete or relabel",
    )
