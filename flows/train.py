"""fastbook chapter 5 as one Prefect flow: data, baseline, LR finder, staged fine-tuning, retraining, evaluation.

Every step is a task; every number, plot and the model land in one MLflow run per flow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.logging.loggers import flow_run_logger
from pydantic import Field

from flows.data import data_stage
from flows.defaults import DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL
from lib.common.download import redact_url
from lib.common.paths import default_output_dir
from lib.data.source import PETS_URL
from lib.recipe import (
    ARCHITECTURES,
    BASELINE_EPOCHS,
    BASELINE_LR,
    DEFAULT_ARCH,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_FREEZE_EPOCHS,
    DEFAULT_LABEL_PATTERN,
    DEFAULT_LR_MULT,
    DEFAULT_MIN_SCALE,
    DEFAULT_PRESIZE,
    DEFAULT_SEED,
    DEFAULT_SIZE,
    DEFAULT_VALID_PCT,
)
from lib.train.stages import read_history, recipe_settings
from tasks import tracking
from tasks.training import evaluate_classifier, find_learning_rate, fine_tune_classifier

Positive = Annotated[int, Field(ge=1)]
Architecture = Literal[tuple(ARCHITECTURES)]  # an enum in the Prefect UI; a bad name is refused, listing the good ones


def _fail_orphaned_run(flow, flow_run, state) -> None:
    """on_crashed: the flow run's process died (SIGKILL, a lost machine), so its MLflow run must not stay RUNNING.

    The worker that started the process runs this hook. `prefect flow-run retry <id>` later resumes the same run.
    """
    experiment = flow_run.parameters.get("experiment", DEFAULT_EXPERIMENT)
    for run_id in tracking.fail_orphaned_runs(experiment, str(flow_run.id)):
        flow_run_logger(flow_run, flow).warning(
            f"MLflow run {run_id} marked FAILED: the flow run's process died. `prefect flow-run retry {flow_run.id}` "
            "runs it again, resuming the same MLflow run from its last complete epoch."
        )


@flow(name="train-pets", log_prints=True, on_crashed=[_fail_orphaned_run])
def train(
    data_url: str | None = None,
    data_dir: str | None = None,
    label_pattern: str = DEFAULT_LABEL_PATTERN,
    arch: Architecture = DEFAULT_ARCH,
    pretrained: bool = True,
    presize: Annotated[int, Field(ge=8)] = DEFAULT_PRESIZE,
    size: Annotated[int, Field(ge=8)] = DEFAULT_SIZE,
    min_scale: Annotated[float, Field(gt=0, le=1)] = DEFAULT_MIN_SCALE,
    bs: Positive = DEFAULT_BATCH_SIZE,
    valid_pct: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_VALID_PCT,
    seed: int | None = DEFAULT_SEED,
    freeze_epochs: Annotated[int, Field(ge=0)] = DEFAULT_FREEZE_EPOCHS,
    epochs: Positive = DEFAULT_EPOCHS,
    base_lr: Annotated[float, Field(gt=0)] | None = None,
    lr_mult: Annotated[float, Field(gt=0)] = DEFAULT_LR_MULT,
    fp16: bool = True,
    device: str | None = None,
    workers: Annotated[int, Field(ge=0)] | None = None,
    compile: bool = False,
    experiment: str = DEFAULT_EXPERIMENT,
    baseline: bool = True,
    baseline_epochs: Positive = BASELINE_EPOCHS,
    retrain: bool = True,
    registered_model: str = DEFAULT_REGISTERED_MODEL,
    comparison: str | None = None,
    out_dir: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Train a pet-breed classifier the fastai way and track it in MLflow.

    1-6. the data stage: download (cached, retried), label from file names, clean, split, presize, summarise;
    7. baseline: fastai's default `fine_tune(2)`, as the book does before tuning anything;
    8. LR finder, whose valley suggestion is the base LR unless `base_lr` is given;
    9. probe: `fine_tune(epochs, base_lr, freeze_epochs, lr_mult)`, fp16 where the device allows it;
    10. retrain from scratch for the probe's best epoch count (skipped when the best is the last epoch);
    11. evaluate: final metrics, confusion matrix, most-confused table, top losses;
    12. log the model (uint8 pictures in, logits out) and register it.

    Without data_url or data_dir the Oxford-IIIT Pet archive is downloaded. Each run writes its files to
    `<out_dir>/<MLflow run id>/` (out_dir defaults to ./outputs/train). Returns the run's headline numbers.
    """
    parameters = dict(locals())
    if size > presize:
        raise ValueError(f"size={size} is larger than presize={presize}: presize to at least the training size")
    run_name = arch if comparison is None else f"{arch} ({comparison})"
    run = tracking.start_run(experiment, run_name, _run_tags(arch, comparison))
    run_id = run["run_id"]
    try:
        out_dir = str((Path(out_dir or default_output_dir() / "train") / run_id).resolve())  # one folder per run
        settings = {key: parameters[key] for key in TRACKED_PARAMETERS}
        # The URL as a param, but never a token it carries (signed URLs, user:password@host).
        logged_url = redact_url(data_url or (None if data_dir else PETS_URL))
        tracking.log_params(run_id, {**settings, "data_url": logged_url})
        data, recipe = _data_and_recipe(parameters, out_dir)
        _log_data(run_id, data)
        common = {"manifest_path": data["manifest"], "vocab_path": data["vocab"], "out_dir": out_dir, "recipe": recipe}
        tuning = {"freeze_epochs": freeze_epochs, "lr_mult": lr_mult, "run_id": run_id}

        first = None
        if baseline:
            first = fine_tune_classifier(
                **common, stage="baseline", epochs=baseline_epochs, base_lr=BASELINE_LR, freeze_epochs=1,
                lr_mult=DEFAULT_LR_MULT, run_id=run_id,
            )  # fmt: skip
            tracking.log_files(run_id, [first["loss_curves"]], "baseline")

        lr_source = "given"
        if base_lr is None and "base_lr" in run["params"]:  # a retried flow run: its LR finder has already chosen
            base_lr, lr_source = float(run["params"]["base_lr"]), run["params"]["base_lr_source"]
        if base_lr is None:
            found = find_learning_rate(**common)
            base_lr, lr_source = found["suggestion"], "lr_find valley"
            tracking.log_files(run_id, [found["plot"]], "lr_find")
            tracking.log_metrics(run_id, {f"lr_find_{k}": v for k, v in found["suggestions"].items()})
        tracking.log_params(run_id, {"base_lr": base_lr, "base_lr_source": lr_source})

        probe = fine_tune_classifier(**common, stage="probe", epochs=epochs, base_lr=base_lr, **tuning)
        tracking.log_files(run_id, [probe["loss_curves"]], "probe")
        best = probe["best_epoch"]

        final = probe
        if retrain and best < epochs:
            print(f"Best validation error after {best} of {epochs} epochs: retraining from scratch for {best}.")
            final = fine_tune_classifier(**common, stage="final", epochs=best, base_lr=base_lr, **tuning)
        else:
            tracking.log_history(run_id, "final", read_history(probe["history"]))  # the probe is the final model
        tracking.log_files(run_id, [final["loss_curves"]], "final")

        evaluation = evaluate_classifier(final["model"], data["manifest"], data["vocab"], out_dir, recipe)
        tracking.log_files(run_id, list(evaluation["files"].values()), "evaluation")
        summary = _summary(run, final, evaluation, best=best, base_lr=base_lr, baseline=first)
        last_step = final["freeze_epochs"] + final["epochs"] - 1
        tracking.log_metrics(run_id, _summary_metrics(summary), step=last_step)
        tracking.log_params(run_id, {"precision_effective": final["precision"], "device_effective": final["device"]})

        examples = _example_images(data)
        model = tracking.log_classifier(
            run_id, final["model"], examples, registered_model=registered_model, step=last_step
        )
        tracking.end_run(run_id, "FINISHED")
    except BaseException as error:
        # Never leave the run RUNNING: a failure keeps what was logged and says FAILED (KILLED on Ctrl-C).
        tracking.end_run(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    result = {**summary, **model, "registered_model": registered_model, "arch": arch, "out_dir": out_dir}
    result["data"] = {key: data[key] for key in ("manifest", "cache_hits", "written", "decoded", "sizes", "classes")}
    result["data"]["example_images"] = examples  # validation pictures to try the model on
    _report(result, run)
    return result


# Flow parameters recorded as MLflow params (with their names): the settings, not where files go.
TRACKED_PARAMETERS = (
    "data_dir", "label_pattern", "arch", "pretrained", "presize", "size", "min_scale", "bs", "valid_pct", "seed",
    "freeze_epochs", "epochs", "lr_mult", "fp16", "device", "workers", "compile", "baseline", "baseline_epochs",
    "retrain", "registered_model", "comparison",
)  # fmt: skip


# Flow parameters that feed the data stage and the recipe every training stage shares.
DATA_PARAMETERS = ("data_url", "data_dir", "label_pattern", "valid_pct", "seed", "presize", "cache_dir")
RECIPE_PARAMETERS = (
    "arch", "pretrained", "presize", "size", "min_scale", "bs", "seed", "fp16", "device", "workers", "compile",
)  # fmt: skip


def _data_and_recipe(parameters: dict[str, Any], out_dir: str) -> tuple[dict, dict]:
    """Run the data tasks into <out_dir>/data; collect the recipe settings from the flow's parameters."""
    data = data_stage(
        **{key: parameters[key] for key in DATA_PARAMETERS},
        skip_unmatched=False,
        sha256=None,
        out_dir=str(Path(out_dir) / "data"),
    )
    return data, recipe_settings(**{key: parameters[key] for key in RECIPE_PARAMETERS})


def _run_tags(arch: str, comparison: str | None) -> dict[str, str]:
    tags = {"arch": arch, tracking.FLOW_RUN_TAG: str(runtime.flow_run.id), "pipeline": "fastbook-ch5"}
    deployment = runtime.deployment.name
    if deployment:
        tags["prefect.deployment"] = deployment
    if comparison:
        tags[tracking.COMPARISON_TAG] = comparison
    return tags


def _log_data(run_id: str, data: dict) -> None:
    """Log what the model was trained on: the labelled manifest as a dataset input, the reports, the counts."""
    digest = tracking.log_dataset(run_id, data["manifest"], source=redact_url(data["data_url"]) or data["images_dir"])
    tracking.log_params(
        run_id,
        {
            "dataset_digest": digest,
            "classes": data["classes"],
            "train_size": data["sizes"]["train"],
            "valid_size": data["sizes"]["valid"],
        },
    )
    data_files = [data["manifest"], data["vocab"], data["cleaning_report"], data["summary"], data["show_batch"]]
    tracking.log_files(run_id, data_files, "data")


def _summary(run: dict, final: dict, evaluation: dict, *, best: int, base_lr: float, baseline: dict | None) -> dict:
    """Return the run's headline numbers (the `--json` object of `pets train`)."""
    summary: dict[str, Any] = {
        "run_id": run["run_id"],
        "experiment_id": run["experiment_id"],
        "error_rate": evaluation["error_rate"],
        "valid_loss": evaluation["valid_loss"],
        "accuracy": evaluation["accuracy"],
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


SUMMARY_METRICS = (
    "error_rate", "valid_loss", "accuracy", "best_epoch", "epochs_trained", "base_lr", "images_per_second",
    "train_seconds", "parameters", "model_size_mb", "baseline_error_rate",
)  # fmt: skip


def _summary_metrics(summary: dict) -> dict[str, float]:
    return {key: summary[key] for key in SUMMARY_METRICS if key in summary}


def _example_images(data: dict) -> list[str]:
    """Return originals of two validation images: the logged model's input example."""
    import pandas as pd

    manifest = pd.read_csv(data["manifest"])
    return manifest.loc[manifest["split"] == "valid", "path"].head(2).tolist()


def _report(result: dict, run: dict) -> None:
    url = tracking.run_url(run)
    create_link_artifact(url, link_text=f"MLflow run {run['run_id']}", key="mlflow-run")
    lines = [f"| {key} | {value} |" for key, value in result.items() if key not in ("data",)]
    create_markdown_artifact("| result | value |\n|---|---|\n" + "\n".join(lines), key="training-result")
    print(
        f"{result['arch']}: error_rate {result['error_rate']:.4f}, valid_loss {result['valid_loss']:.4f} after "
        f"{result['epochs_trained']} epochs; model {result['model_uri']} registered as "
        f"{result['registered_model']} v{result['model_version']}. MLflow run: {url}"
    )


@flow(name="find-lr", log_prints=True)
def lr_find(
    data_url: str | None = None,
    data_dir: str | None = None,
    label_pattern: str = DEFAULT_LABEL_PATTERN,
    arch: Architecture = DEFAULT_ARCH,
    pretrained: bool = True,
    presize: Annotated[int, Field(ge=8)] = DEFAULT_PRESIZE,
    size: Annotated[int, Field(ge=8)] = DEFAULT_SIZE,
    min_scale: Annotated[float, Field(gt=0, le=1)] = DEFAULT_MIN_SCALE,
    bs: Positive = DEFAULT_BATCH_SIZE,
    valid_pct: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_VALID_PCT,
    seed: int | None = DEFAULT_SEED,
    fp16: bool = True,
    device: str | None = None,
    workers: Annotated[int, Field(ge=0)] | None = None,
    compile: bool = False,
    out_dir: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Run the data stage and fastai's LR finder on a fresh model; return every suggestion and the plot's path."""
    parameters = dict(locals())
    out_dir = str(Path(out_dir or default_output_dir() / "lr_find").resolve())
    data, recipe = _data_and_recipe(parameters, out_dir)
    found = find_learning_rate(data["manifest"], data["vocab"], out_dir, recipe)
    suggestions = ", ".join(f"{name}: {value:.2e}" for name, value in found["suggestions"].items())
    print(f"{suggestions}; plot: {found['plot']}")
    return found
