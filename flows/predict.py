"""Label a folder, an archive or a CSV of images with a registered model version, as one Prefect flow.

The model alias (default `champion`) is resolved once, as the run starts, and the version it named is what the whole
run uses and records. Every image gets a row of predictions.csv: file, label, probability, top_k (JSON), error.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow
from prefect import runtime as prefect_runtime
from prefect.artifacts import create_link_artifact

from lib.common.download import file_name, redact_url
from lib.common.paths import default_cache_dir, default_output_dir
from lib.recipe import PredictSettings, RuntimeSettings
from lib.serve.inputs import is_url
from lib.train.precision import resolve_precision
from lib.train.trainer import resolve_device
from tasks import tracking
from tasks.prediction import collect_images, predict_batch, write_report

RUN_TIME_FORMAT = "%m-%d %H:%M"  # as the training runs' names (flows/train.py)


@flow(name="predict-images", log_prints=True)
def predict_images(
    source: str, settings: PredictSettings = PredictSettings(), runtime: RuntimeSettings = RuntimeSettings()
) -> dict:
    """Label every image of `source` with the model version the alias (or `settings.version`) names.

    `source`: a folder (searched recursively for image files), an archive (http(s)://, file:// or a path; .tgz, .tar
    or .zip; downloaded into the cache once) or a CSV whose `path` (or `url`) column lists image paths (relative to
    the CSV) or URLs. Images go through the network in batches on the device (fp16 on CUDA); an image that cannot be
    read gets its reason in its row and the others are labelled. One MLflow run in `settings.experiment` records the
    model version, the input's digest, the throughput, the class histogram and predictions.csv; the rows come from
    the Prefect cache when the same input was labelled by the same version before. Files go to
    `<runtime.out_dir>/<MLflow run id>/` (default ./outputs/predict-images).
    """
    runtime.check_runnable()  # the CLI checked it on its machine; a deployment's run checks it on the worker's
    model = tracking.resolve_model_version(settings.registered_model, alias=settings.alias, version=settings.version)
    device = resolve_device(runtime.device)
    precision = resolve_precision(runtime.precision, device)
    if precision.note:
        print(precision.note)
    cache_dir = str(Path(runtime.cache_dir or default_cache_dir()).resolve())
    runs_dir = Path(runtime.out_dir or default_output_dir() / "predict-images").resolve()
    source = source if is_url(source) else str(Path(source).expanduser().resolve())
    tags = {tracking.FLOW_RUN_TAG: str(prefect_runtime.flow_run.id), "pipeline": "predict-images"}
    with tracking.prediction_run(settings.experiment, _run_name(model, source), tags) as run:
        out_dir = runs_dir / run.run_id
        images = collect_images(source, cache_dir, str(out_dir))
        batch = {
            "cache_dir": cache_dir, "top_k": settings.top_k, "probabilities": settings.probabilities,
            "tta": settings.tta, "precision": precision.effective, "device": str(device),
            "batch_size": settings.bs, "workers": settings.workers, "threads": runtime.threads,
        }  # fmt: skip
        state = predict_batch(images["inputs"], images["digest"], model, **batch, return_state=True)
        predicted = state.result()
        cached = state.name == "Cached"
        if not Path(predicted["predictions"]).is_file():  # the cached file was deleted: predict again
            predicted = predict_batch.with_options(refresh_cache=True)(
                images["inputs"], images["digest"], model, **batch
            )
            cached = False
        report = write_report(predicted["predictions"], predicted["vocab"], str(out_dir))
        recorded = {key: batch[key] for key in ("top_k", "probabilities", "tta", "batch_size")}
        tracking.log_predictions(
            run.run_id,
            model=model,
            source=source,
            input_digest=images["digest"],
            settings=recorded,
            stats=predicted,
            cached=cached,
            files=[report["predictions"], report["histogram"]],
        )
    result = {
        "run_id": run.run_id,
        "experiment_id": run.experiment_id,
        "run_url": run.url,
        "registered_model": model["registered_model"],
        "model_version": model["version"],
        "alias": model["alias"],
        "input_digest": images["digest"],
        "cached": cached,
        **{key: predicted[key] for key in ("images", "unreadable", "images_per_second", "device", "precision")},
        **report,
    }
    create_link_artifact(run.url, link_text=f"MLflow run {run.run_id}", key="mlflow-run")
    hit = " (from the cache)" if cached else ""
    print(
        f"Labelled {result['images']} images with {model['registered_model']} v{model['version']}{hit}: "
        f"{result['predictions']}; {result['unreadable']} unreadable. MLflow run: {run.url}"
    )
    return result


def _run_name(model: dict, source: str) -> str:
    """e.g. `pets-classifier v3 · holiday-photos · 12-02 00:14`."""
    name = file_name(redact_url(source)) if is_url(source) else Path(source).name
    return " · ".join([f"{model['registered_model']} v{model['version']}", name, time.strftime(RUN_TIME_FORMAT)])
