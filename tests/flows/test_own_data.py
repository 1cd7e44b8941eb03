"""The user's own images through `pets` as a real process: class folders trained, registered and predicted back;
camera-named photos refused before anything trains."""

import json
import os

import mlflow
import pandas as pd
import pytest

from lib.data.synthetic import SHAPE_CLASSES, make_shapes_dataset, shape_extras
from tests.flows.test_console import pets

pytestmark = pytest.mark.usefixtures("prefect_harness")

# A random-init resnet18 at 32 px learns three coloured shapes in six CPU epochs (measured here: no validation error
# from the fourth unfrozen epoch on); base_lr skips the LR finder.
SHAPES = [
    "--arch", "resnet18", "--no-pretrained", "--presize", "48", "--size", "32", "--bs", "8", "--freeze-epochs", "1",
    "--epochs", "6", "--no-baseline", "--no-retrain", "--base-lr", "5e-3", "--no-fp16", "--device", "cpu",
    "--workers", "0", "--threads", "1", "--experiment", "own-data", "--registered-model", "shapes",
]  # fmt: skip
CLASSES, PER_CLASS = 3, 24


def _environment():
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the session's server: no start-up


def test_class_folders_train_register_and_predict_back_with_their_names(tmp_path, mlflow_uri):
    root = make_shapes_dataset(tmp_path / "shapes", classes=CLASSES, images_per_class=PER_CLASS, extras=True)
    out = tmp_path / "runs"

    done = pets(
        "train", "--data-dir", root, *SHAPES, "--out-dir", out, "--cache-dir", tmp_path / "cache", "--json",
        env=_environment(),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "Labels from class folders (each image's first-level folder): auto: every image sits in a first-level " \
        "folder" in done.stderr  # fmt: skip
    assert result["accuracy"] >= 0.8, result  # three classes: chance is 1/3
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.labels"] == "auto" and run.data.params["data.label_source"] == "folder"
    data = out / result["run_id"] / "data"
    vocab = json.loads((data / "vocab.json").read_text())
    assert vocab == sorted(SHAPE_CLASSES[:CLASSES])  # the folders' names
    # The extras: the odd pictures (GIF, WebP, upper-case extensions, an accented name) trained with the rest; the
    # resource fork, hidden folder and file and the notes were skipped, counted and never decoded.
    extras = shape_extras(PER_CLASS)
    pictures = {name for name, extra in extras.items() if extra.is_item}
    kept = pd.read_csv(data / "cleaned.csv")
    assert pictures <= {path.rsplit("/", 1)[-1] for path in kept["path"]}
    left_out = pd.read_csv(data / "left_out.csv")
    assert len(left_out) == len(extras) - len(pictures)
    assert set(left_out["reason"]) == {"resource_fork", "hidden", "not_image"}
    assert not (data / "excluded.csv").read_text().strip().splitlines()[1:]  # nothing failed to decode
    summary = (data / "summary.txt").read_text()
    assert f"Left out while labelling {len(left_out)} files (left_out.csv)" in summary
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/class_counts.png", "data/left_out.csv", "data/summary.txt"} <= artifacts

    version = client.get_model_version("shapes", result["model_version"])
    assert json.loads(version.tags["classes"]) == vocab
    valid = pd.read_csv(data / "split.csv").query("split == 'valid'")
    pictures = valid["path"].head(6).tolist()
    predicted = pets("predict", f"models:/shapes/{result['model_version']}", *pictures, "--json", env=_environment())
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    labels = [row["label"] for row in json.loads(predicted.stdout.strip().splitlines()[-1])]
    truth = valid["label"].head(6).tolist()
    assert set(labels) <= set(vocab) and sum(a == b for a, b in zip(labels, truth, strict=True)) >= 4


def test_camera_named_photos_under_the_regex_are_refused_before_training_suggesting_folders(tmp_path, mlflow_uri):
    root = make_shapes_dataset(tmp_path / "photos", classes=2, images_per_class=6, camera_names=True)

    done = pets(
        "train", "--data-dir", root, "--labels", "regex", *SHAPES, "--out-dir", tmp_path / "runs",
        "--cache-dir", tmp_path / "cache", env=_environment(),
    )  # fmt: skip

    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "differ only in their folders" in errors[0] and "--labels folder" in errors[0]
    assert "Traceback" not in done.stderr
    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("own-data").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["pets.failure"].startswith("LabelGateError: ")
    assert "differ only in their folders" in run.data.tags["pets.failure"]
    assert client.search_registered_models() == []  # no model
    assert not list((tmp_path / "runs").glob("*/probe"))  # nothing trained
