"""The user's own images through `pets` as a real process: class folders trained, registered and predicted back;
camera-named photos refused before anything trains."""

import json
import os
from pathlib import Path

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


@pytest.mark.slow  # 20-40 s of real processes: CI runs it (make test-slow)
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


# (layout, settings by option name, the source auto or the settings choose, whether the data fixes the split)
LAYOUTS = [
    ("folder", {}, "folder", False),
    ("nested", {"labels": "regex", "label_pattern": r"^([^/]+)/batch\d/"}, "regex", False),
    ("nested", {"labels": "folder"}, "folder", False),
    ("csv", {"labels_csv": "labels.csv"}, "csv", False),  # a relative path: the CSV inside the data root
    ("csv_valid", {"labels_csv": "labels.csv"}, "csv", True),
    ("split", {}, "split-folders", True),
]


@pytest.mark.parametrize(("layout", "settings", "source", "fixed"), LAYOUTS, ids=[f"{a}-{c}" for a, _, c, _ in LAYOUTS])
def test_each_layout_is_labelled_by_its_source_through_the_data_flow(tmp_path, layout, settings, source, fixed):
    from flows.data import prepare_data
    from lib.recipe import Recipe

    root = make_shapes_dataset(
        tmp_path / "data", layout=layout, images_per_class=8, test_images=2 * (layout == "split")
    )
    folders = {"data_dir": str(root), "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}

    result = prepare_data(Recipe().updated({"presize": 32, "size": 32, **folders, **settings}))

    assert result["label_source"] == source
    assert json.loads((tmp_path / "out" / "vocab.json").read_text()) == sorted(SHAPE_CLASSES[:3])
    split = pd.read_csv(tmp_path / "out" / "split.csv")
    assert len(split) == 3 * 8
    if fixed:  # the first quarter of each class is validation, as the generator wrote it
        assert (split.groupby("label")["split"].apply(lambda s: (s == "valid").sum()) == 2).all()
    else:
        assert result["sizes"] == {"train": 24 - int(0.2 * 24), "valid": int(0.2 * 24)}
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert summary.splitlines()[2].startswith("Labels from ")
    if layout == "split":  # the test folder is counted and left out
        left_out = pd.read_csv(tmp_path / "out" / "left_out.csv")
        assert list(left_out["reason"]) == ["test_folder"] * 6
        assert "Left out while labelling 6 files (left_out.csv): test_folder 6" in summary


def test_a_labels_csv_from_a_url_labels_the_images(tmp_path):
    from flows.data import prepare_data
    from lib.recipe import Recipe
    from tests.support.http_server import serve_directory

    root = make_shapes_dataset(tmp_path / "data", layout="csv", images_per_class=6)
    served = tmp_path / "served"
    served.mkdir()
    (root / "labels.csv").rename(served / "train.csv")  # the CSV lives elsewhere, e.g. on an annotation server
    with serve_directory(served) as server:
        options = {"labels_csv": server.url("train.csv"), "data_dir": str(root), "presize": 32, "size": 32}
        options.update(out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
        result = prepare_data(Recipe().updated(options))

    assert result["label_source"] == "csv" and server.requests == 1
    assert json.loads((tmp_path / "out" / "vocab.json").read_text()) == sorted(SHAPE_CLASSES[:3])
    assert Path(result["labels_csv"]).read_text() == (served / "train.csv").read_text()


def test_pets_summary_takes_a_labels_csv_from_the_working_directory(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    root = make_shapes_dataset(tmp_path / "data", layout="csv_valid", images_per_class=6)
    work = tmp_path / "work"
    work.mkdir()
    (root / "labels.csv").rename(work / "mine.csv")
    monkeypatch.chdir(work)  # `--labels-csv mine.csv` is this folder's file, not one under the data root

    options = ["--data-dir", str(root), "--labels-csv", "mine.csv", "--presize", "32", "--size", "32"]
    result = CliRunner().invoke(app, ["summary", *options, "--out-dir", "out", "--cache-dir", str(tmp_path / "c")])

    assert result.exit_code == 0, result.output
    assert (
        f"Labels from the CSV {work / 'mine.csv'} (columns fname, label): auto: --labels-csv names a CSV"
        in (work / "out" / "summary.txt").read_text()
    )
    assert "2 datasets of sizes 12,6" in result.output  # is_valid: a quarter of each class (1.5, rounded to 2)


def test_a_labels_csv_inside_an_archive_beside_its_images_folder_is_found(tmp_path):
    import tarfile

    from flows.data import prepare_data
    from lib.recipe import Recipe

    root = make_shapes_dataset(tmp_path / "dataset", layout="csv", images_per_class=6)  # labels.csv beside images/
    archive = tmp_path / "dataset.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="dataset")
    options = {"data_url": archive.as_uri(), "labels_csv": "labels.csv", "presize": 32, "size": 32}
    options.update(out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))

    result = prepare_data(Recipe().updated(options))

    assert result["images_dir"].endswith("dataset/images")  # the data root is the images folder, below the CSV
    assert Path(result["labels_csv"]) == Path(result["images_dir"]).parent / "labels.csv"
    assert json.loads((tmp_path / "out" / "vocab.json").read_text()) == sorted(SHAPE_CLASSES[:3])
    assert len(pd.read_csv(tmp_path / "out" / "split.csv")) == 18
