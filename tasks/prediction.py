"""Prefect tasks of batch prediction: collect the input's images, label them (cached), write the run's report.

`predict_batch` is cached on what decides its rows: the input's digest (names and bytes), the model version and the
settings that change a prediction (top_k, probabilities, tta, the precision that runs). Its predictions are a file in
the cache folder, named by that key, and the task returns its path; a second run on the same input and model gets
the path from the Prefect cache without running the network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from lib.common.files import write_atomically
from lib.serve.batch import BatchPredictor, label_histogram, network_from_program, predictions_table, read_predictions
from lib.serve.inputs import collect_inputs, input_digest
from tasks import tracking
from tasks.progress import ProgressArtifact

INPUTS_FILE = "inputs.csv"  # what was labelled: file, local path, sha256, why it could not be read
PREDICTIONS_FILE = "predictions.csv"
HISTOGRAM_FILE = "class_histogram.png"
PREDICTIONS_FOLDER = "predictions"  # under the cache folder: one CSV per cache key
# The parameters of predict_batch that change its rows; the others say where and how fast it runs (the batch size
# changes at most the last bits of a probability, ~1e-7: how oneDNN splits a batch's sums).
KEYED_PARAMETERS = ("input_digest", "top_k", "probabilities", "tta", "precision")
KEYED_MODEL = ("registered_model", "version", "model_id")


@task(cache_policy=NO_CACHE)
def collect_images(source: str, cache_dir: str, out_dir: str) -> dict:
    """List the input's images (downloading an archive or a CSV's URLs into the cache) and write inputs.csv.

    An archive is held to the data stage's default limits against zip and tar bombs (lib/data/source.py).
    """
    inputs = collect_inputs(source, Path(cache_dir))
    path = Path(out_dir) / INPUTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs.to_csv(path, index=False)
    return {"inputs": str(path), "digest": input_digest(inputs), "images": len(inputs)}


def prediction_key(parameters: dict) -> str:
    """The cache key of a prediction: sha256 of the keyed parameters and the model version."""
    keyed = {name: parameters[name] for name in KEYED_PARAMETERS}
    keyed["model"] = {name: parameters["model"][name] for name in KEYED_MODEL}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def _cache_key(context, parameters) -> str:
    return f"predict-images-{prediction_key(parameters)}"


@task(cache_key_fn=_cache_key)
def predict_batch(
    inputs_path: str,
    input_digest: str,
    model: dict,
    *,
    cache_dir: str,
    top_k: int,
    probabilities: bool,
    tta: bool,
    precision: str,
    device: str,
    batch_size: int,
    workers: int | None,
    threads: int | None = None,
) -> dict:
    """Label inputs.csv's files with the model version in batches on the device; return the predictions' path.

    `precision` is the one that runs on `device` (fp16 on CUDA, else fp32). The result is cached (see the module).
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        downloaded = tracking.download_network(model["model_uri"], Path(folder))
        vocab = list(downloaded["vocab"])
        net = network_from_program(Path(downloaded["network"]), arch=downloaded["arch"], classes=len(vocab))
    predictor = BatchPredictor(
        net, size=int(downloaded["size"]), presize=int(downloaded["presize"]), device=device, precision=precision
    )
    inputs = pd.read_csv(inputs_path, dtype=str, keep_default_na=False)
    progress = ProgressArtifact(f"predict {len(inputs)} images")
    found = predictor.predict(
        inputs["path"].tolist(),
        errors=inputs["error"].tolist(),
        batch_size=batch_size,
        workers=workers,
        tta=tta,
        on_progress=progress,
    )
    progress.finish()
    table = predictions_table(inputs["file"], found, vocab, top_k=top_k, probabilities=probabilities)
    key = prediction_key(
        {"input_digest": input_digest, "model": model, "top_k": top_k, "probabilities": probabilities, "tta": tta,
         "precision": precision}
    )  # fmt: skip
    stored = write_atomically(
        Path(cache_dir) / PREDICTIONS_FOLDER / f"{key}.csv", lambda temporary: table.to_csv(temporary, index=False)
    )
    return {
        "predictions": str(stored),
        "vocab": vocab,
        "images": len(table),
        "unreadable": found.unreadable,
        "seconds": found.seconds,
        "images_per_second": found.images_per_second,
        "device": found.device,
        "precision": found.precision,
    }


@task(cache_policy=NO_CACHE)
def write_report(predictions_path: str, vocab: list[str], out_dir: str) -> dict:
    """Copy the predictions into the run's folder and draw the histogram of predicted classes beside them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = shutil.copyfile(predictions_path, out / PREDICTIONS_FILE)
    histogram = label_histogram(read_predictions(csv)["label"], vocab, out / HISTOGRAM_FILE)
    return {"predictions": str(csv), "histogram": str(histogram)}
