"""fastbook chapter 5 as one Prefect flow: data, baseline, LR finder, staged fine-tuning, retraining, evaluation.

Every step is a task; every number, plot and the model land in one MLflow run per flow run (tasks/tracking.py).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.logging.loggers import flow_run_logger

from flows.data import data_stage
from flows.review import review_labels
from lib.common.download import file_name, file_sha256, redact_url
from lib.common.numbers import significant
from lib.common.paths import default_output_dir
from lib.data.digests import dataset_version
from lib.recipe import BASELINE_LR, DEFAULT_LR_MULT, Recipe
from lib.train.precision import resolve_precision
from lib.train.stages import read_history
from lib.train.trainer import resolve_device
from tasks import tracking
from tasks.training import evaluate_classifier, find_learning_rate, fine_tune_classifier, stage_process


def _fail_orphaned_run(flow, flow_run, state) -> None:
    """on_crashed: the flow run's process died (SIGKILL, a lost machine), so its MLflow run must not stay RUNNING.

    The worker that started the process runs this hook. `prefect flow-run retry <id>` later resumes the same run.
    """
    experiment = Recipe.model_validate(flow_run.parameters.get("recipe", {})).tracking.experiment
    for run_id in tracking.fail_orphaned_runs(experiment, str(flow_run.id)):
        flow_run_logger(flow_run, flow).warning(
            f"MLflow run {run_id} marked FAILED: the flow run's process died. `prefect flow-run retry {flow_run.id}` "
            f"runs it again, and `pets train --resume {run_id}` continues it; either resumes from the last complete "
            "epoch."
        )


@flow(name="train-pets", log_prints=True, on_crashed=[_fail_orphaned_run])
def train(recipe: Recipe = Recipe(), comparison: str | None = None, resume: str | None = None) -> dict:
    """Train a pet-breed classifier the fastai way and track it in MLflow.

    1. data: download (cached, retried), label, clean, split, presize, summarise (flows/data.py);
    2. baseline: fastai's default `fine_tune(2)`, as the book does before tuning anything, and the label review from
       its losses (`review.label_review`: review/review.csv and a contact sheet per class; flows/review.py);
    3. LR finder, whose valley suggestion is the base LR unless `schedule.base_lr` is given;
    4. probe: `fine_tune(epochs, base_lr, freeze_epochs, lr_mult)`, fp16 where the device allows it;
    5. retrain from scratch for the probe's best epoch count (skipped when the best is the last epoch);
    6. evaluate: final metrics, confusion matrix, most-confused table, top losses;
    7. log the model (uint8 pictures in, logits out) and register it.

    Each run writes its files to `<runtime.out_dir>/<MLflow run id>/` (default ./outputs/train). `comparison` tags
    the run as one of a compare-pets comparison; `resume` names an interrupted MLflow run to continue from its last
    complete epoch, with the recipe it logged. Returns the run's headline numbers.
    """
    recipe.check_runnable()  # the CLI checked it on its machine; a deployment's run checks it on the worker's
    _say_precision(recipe)
    schedule = recipe.schedule
    tags = _run_tags(recipe, comparison)
    runs_dir = Path(recipe.runtime.out_dir or default_output_dir() / "train").resolve()
    # The stage process loads torch while the MLflow run starts and the data stage runs.
    with (
        stage_process(runs_dir),
        tracking.training_run(recipe, _run_name(recipe, comparison), tags, resume=resume) as run,
    ):
        out_dir = runs_dir / run.run_id
        run.log_recipe(recipe, out_dir)
        data = data_stage(recipe.data, cache_dir=recipe.runtime.cache_dir, out_dir=str(out_dir / "data"))
        version = _log_data(run, data)
        # Created before the data was known; named now that it is (a resumed run keeps its own start time).
        run_name = _run_name(recipe, comparison, data=_data_name(data, version), started_ms=run.start_time)
        run.rename(run_name)
        inputs = {"manifest_path": data["manifest"], "vocab_path": data["vocab"], "out_dir": str(out_dir)}
        stage = partial(fine_tune_classifier, **inputs, recipe=recipe, run_id=run.run_id)

        baseline = None
        if schedule.baseline:  # the book's first model: fastai's fine_tune defaults
            baseline = stage(
                stage="baseline", epochs=schedule.baseline_epochs, base_lr=BASELINE_LR, freeze_epochs=1,
                lr_mult=DEFAULT_LR_MULT,
            )  # fmt: skip
            run.log_stage(baseline)
        review = review_labels(recipe, run, data, baseline, out_dir)  # the recipe's review.label_review

        base_lr = _base_lr(run, recipe, inputs)
        tuning = {"base_lr": base_lr, "freeze_epochs": schedule.freeze_epochs, "lr_mult": schedule.lr_mult}
        probe = stage(stage="probe", epochs=schedule.epochs, **tuning)
        run.log_stage(probe)

        best, final = probe["best_epoch"], probe
        if schedule.retrain and best < schedule.epochs:
            print(
                f"Best validation error after {best} of {schedule.epochs} epochs: retraining from scratch for {best}."
            )
            final = stage(stage="final", epochs=best, **tuning)
        else:
            tracking.log_history(run.run_id, "final", read_history(probe["history"]))  # the probe is the final model
        run.log_stage(final, name="final")

        evaluation = evaluate_classifier(final["model"], data["manifest"], data["vocab"], str(out_dir), recipe)
        tracking.log_files(run.run_id, list(evaluation["files"].values()), "evaluation")
        summary = _summary(run, final, evaluation, best=best, base_lr=base_lr, baseline=baseline)
        last_step = final["freeze_epochs"] + final["epochs"] - 1
        tracking.log_metrics(run.run_id, _summary_metrics(summary), step=last_step)
        tracking.log_params(
            run.run_id, {"precision_effective": final["precision"], "device_effective": final["device"]}
        )

        examples = _example_images(data)
        registered_model = recipe.tracking.registered_model
        model = tracking.log_classifier(
            run.run_id, final["model"], examples, registered_model=registered_model, step=last_step
        )
    result = {**summary, **model, "registered_model": registered_model, "arch": recipe.model.arch}
    result.update(run_name=run_name, probe_epochs=schedule.epochs, retrained=final is not probe)
    result["out_dir"] = str(out_dir)
    result["data"] = {key: data[key] for key in ("manifest", "cache_hits", "written", "decoded", "sizes", "classes")}
    result["data"]["example_images"] = examples  # validation pictures to try the model on
    result["review"] = review  # review.csv and the contact sheets, or None
    _report(result, run)
    return result


def _say_precision(recipe: Recipe) -> None:
    """Say once, in the run's log, what runs when the recipe's precision cannot (fp16, the default, on a CPU).

    The stages then run in fp32 without a word each, and the `precision_effective` param records it.
    """
    note = resolve_precision(recipe.precision, resolve_device(recipe.runtime.device)).note
    if note:
        print(note)


RUN_TIME_FORMAT = "%m-%d %H:%M"  # local time: short enough for the runs table, the year is in the run's start time


def _run_name(recipe: Recipe, comparison: str | None, *, data: str | None = None, started_ms: int = 0) -> str:
    """Name a run for the runs table: what trained, on which data, when, and in which comparison.

    e.g. `resnet18 · oxford-iiit-pet 3fa2c1 · 12-02 00:14 · cmp-20261202-001400-ab12`.
    """
    started = time.localtime(started_ms / 1000 if started_ms else None)
    parts = [recipe.model.arch, data, time.strftime(RUN_TIME_FORMAT, started), comparison]
    return " · ".join(part for part in parts if part)


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
VERSION_CHARS = 6  # of the data version in a run's name: enough to tell versions of one dataset apart at a glance


def _data_name(data: dict, version: str) -> str:
    """The data a run trained on, short: the archive's name (or the images folder's) and the data version's start."""
    if data["data_url"]:
        name = file_name(data["data_url"])  # it was downloaded under this name, so it has one
        name = next((name.removesuffix(s) for s in ARCHIVE_SUFFIXES if name.endswith(s)), name)
    else:
        folder = Path(data["images_dir"])
        name = folder.parent.name if folder.name == "images" else folder.name  # pets/images says more as pets
    return f"{name} {version[:VERSION_CHARS]}".strip()


def _run_tags(recipe: Recipe, comparison: str | None) -> dict[str, str]:
    tags = {"arch": recipe.model.arch, tracking.FLOW_RUN_TAG: str(runtime.flow_run.id), "pipeline": "fastbook-ch5"}
    deployment = runtime.deployment.name
    if deployment:
        tags["prefect.deployment"] = deployment
    if comparison:
        tags[tracking.COMPARISON_TAG] = comparison
    return tags


REVIEW_RUN_TAG = "pets.review_run"  # the MLflow run whose label review the applied overrides came from


def _log_data(run: tracking.TrainingRun, data: dict) -> str:
    """Log what the model was trained on (the labelled manifest as a dataset input, the reports, the counts); return
    the data version: the digest of the images' content, labels and split (`lib.data.digests.dataset_version`).

    With review decisions applied, the overrides file and the rows it changed go under data/ too, its sha256 and
    version as params, and a tag names the run whose review they came from (when known)."""
    import pandas as pd

    source = redact_url(data["data_url"]) or data["images_dir"]
    digest = tracking.log_dataset(run.run_id, data["manifest"], source=source)
    version = dataset_version(pd.read_csv(data["manifest"]))
    facts = {"classes": data["classes"], "train_size": data["sizes"]["train"], "valid_size": data["sizes"]["valid"]}
    facts["data.label_source"] = data["label_source"]  # what `--labels auto` chose (the recipe's data.labels says auto)
    data_files = [data["manifest"], data["vocab"], data["cleaning_report"], data["summary"], data["show_batch"]]
    data_files += [data["class_counts"], data["left_out"]]
    if data["duplicates"]:  # near-duplicate groups: the table, and the contact sheet when there are groups
        data_files += [path for path in (data["duplicates"]["duplicates"], data["duplicates"]["contact_sheet"]) if path]
        facts["duplicate_groups"] = data["duplicates"]["duplicate_groups"]
    if data["labels_csv"]:  # the labels themselves, and their digest: the CSV is part of the data's lineage
        facts["labels_csv_sha256"] = file_sha256(Path(data["labels_csv"]))
        data_files.append(data["labels_csv"])
    if overrides := data["overrides"]:  # review decisions applied: the file, its digest and version, and its review
        facts.update(overrides_sha256=overrides["sha256"], overrides_version=overrides["version"])
        data_files += [overrides["overrides"], overrides["changes"]]
        if overrides["review_run"]:
            tracking.set_tags(run.run_id, {REVIEW_RUN_TAG: overrides["review_run"]})
    tracking.log_params(run.run_id, {"dataset_digest": digest, "data_version": version, **facts})
    tracking.log_files(run.run_id, data_files, "data")
    return version


def _base_lr(run: tracking.TrainingRun, recipe: Recipe, inputs: dict[str, str]) -> float:
    """Return the recipe's base LR, or the one this run's LR finder chose (running it unless a resumed run has)."""
    if recipe.schedule.base_lr is not None:
        base_lr, source = recipe.schedule.base_lr, "given"
    elif (chosen := run.chosen_lr()) is not None:  # a resumed run: its finder has already chosen
        base_lr, source = chosen
    else:
        found = find_learning_rate(**inputs, recipe=recipe)
        base_lr, source = found["suggestion"], "lr_find valley"
        tracking.log_files(run.run_id, [found["plot"]], "lr_find")
        tracking.log_metrics(run.run_id, {f"lr_find_{k}": v for k, v in found["suggestions"].items()})
    tracking.log_params(run.run_id, {"base_lr": base_lr, "base_lr_source": source})
    return base_lr


def _summary(
    run: tracking.TrainingRun, final: dict, evaluation: dict, *, best: int, base_lr: float, baseline: dict | None
) -> dict:
    """Return the run's headline numbers (the `--json` object of `pets train`)."""
    summary: dict[str, Any] = {
        "run_id": run.run_id,
        "experiment_id": run.experiment_id,
        "error_rate": evaluation["error_rate"],
        "valid_loss": evaluation["valid_loss"],
        "accuracy": evaluation["accuracy"],
        **{name: evaluation[name] for name in TTA_METRICS if name in evaluation},
        "best_epoch": best,
        "epochs_trained": final["epochs"],
        "base_lr": base_lr,
        "images_per_second": final["images_per_second"],
        "train_seconds": final["train_seconds"],
        "parameters": final["parameters"],
        "model_size_mb": evaluation["model_size_mb"],
        "precision": final["precision"],
        "device": final["device"],
    }
    if baseline is not None:
        summary["baseline_error_rate"] = baseline["error_rate"]
    return summary


TTA_METRICS = ("tta_error_rate", "tta_valid_loss", "tta_accuracy")  # with the recipe's schedule.tta
SUMMARY_METRICS = (
    "error_rate", "valid_loss", "accuracy", *TTA_METRICS, "best_epoch", "epochs_trained", "base_lr",
    "images_per_second", "train_seconds", "parameters", "model_size_mb", "baseline_error_rate",
)  # fmt: skip


def _summary_metrics(summary: dict) -> dict[str, float]:
    return {key: summary[key] for key in SUMMARY_METRICS if key in summary}


def _example_images(data: dict) -> list[str]:
    """Return originals of two validation images: the logged model's input example."""
    import pandas as pd

    manifest = pd.read_csv(data["manifest"])
    return manifest.loc[manifest["split"] == "valid", "path"].head(2).tolist()


def _report(result: dict, run: tracking.TrainingRun) -> None:
    create_link_artifact(run.url, link_text=f"MLflow run {run.run_id}", key="mlflow-run")
    lines = [f"| {key} | {significant(value)} |" for key, value in result.items() if key not in ("data", "review")]
    create_markdown_artifact("| result | value |\n|---|---|\n" + "\n".join(lines), key="training-result")
    print(
        f"{result['arch']}: error_rate {significant(result['error_rate'])}, valid_loss "
        f"{significant(result['valid_loss'])} after {result['epochs_trained']} epochs; model {result['model_uri']} "
        f"registered as {result['registered_model']} v{result['model_version']}. MLflow run: {run.url}"
    )


@flow(name="find-lr", log_prints=True)
def lr_find(recipe: Recipe = Recipe()) -> dict:
    """Run the data stage and fastai's LR finder on a fresh model; return every suggestion and the plot's path.

    Files go to `<runtime.out_dir>` (default ./outputs/lr_find); the schedule and tracking settings are not read.
    """
    recipe.check_runnable()
    _say_precision(recipe)
    out_dir = Path(recipe.runtime.out_dir or default_output_dir() / "lr_find").resolve()
    data = data_stage(recipe.data, cache_dir=recipe.runtime.cache_dir, out_dir=str(out_dir / "data"))
    found = find_learning_rate(data["manifest"], data["vocab"], str(out_dir), recipe)
    suggestions = ", ".join(f"{name}: {significant(value)}" for name, value in found["suggestions"].items())
    print(f"{suggestions}; plot: {found['plot']}")
    return found
