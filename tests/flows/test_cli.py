"""The `pets` command line: help, train -> predict on one real tiny run, and the errors a user can make."""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app, ui_command
from lib.data.synthetic import make_pets_dataset, pack_tgz
from lib.serve.inference import Classifier, read_export
from lib.serve.serving import serving_model, tta_probabilities

pytestmark = pytest.mark.usefixtures("prefect_harness")

BREEDS = 4
# The design doc's fast settings: random-init resnet18 on 32 px crops, given LR (no LR finder), CPU, no workers.
TINY = [
    "--arch", "resnet18", "--no-pretrained", "--presize", "48", "--size", "32", "--bs", "8", "--freeze-epochs", "1",
    "--epochs", "1", "--no-baseline", "--base-lr", "2e-3", "--no-fp16", "--device", "cpu", "--workers", "0",
]  # fmt: skip
# Each command's own flags; the recipe's flags are checked against lib/recipe.py by tests/test_recipe.py.
HELP_FLAGS = {
    "train": ["--resume", "--recipe", "--json"],
    "compare": ["--archs", "--train-deployment", "--recipe", "--json"],
    "lr-find": ["--recipe", "--json"],
    "predict": ["MODEL_URI", "IMAGES", "--top-k", "--tta", "--json"],
    "ui": ["--port", "--host"],
    "demo": ["--breeds", "--images-per-breed", "--epochs", "--out-dir", "--cache-dir"],
    "announce-dataset": ["DATA_URL", "--name"],
    "summary": ["--recipe"],
    "promote": ["VERSION", "--model", "--reason", "--alias"],
    "champion": ["--model", "--alias", "--json"],
}


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "200"})


def last_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def store(tmp_path_factory, _mlflow_template_db):
    """One MLflow store for the module's training run (the conftest `mlflow_uri` fixture is per test)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    shutil.copy(_mlflow_template_db, path)
    uri = f"sqlite:///{path}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def trained(prefect_harness, store, tmp_path_factory):
    """`pets train --json` once on a 4-breed synthetic archive served from a file:// URL; its parsed last line."""
    root = tmp_path_factory.mktemp("train")
    images = make_pets_dataset(root / "source", breeds=BREEDS, images_per_breed=10, max_side=96)
    archive = pack_tgz(images, root / "pets.tgz")
    result = invoke(
        "train", "--data-url", archive.as_uri(), *TINY, "--experiment", "cli", "--registered-model", "cli-pets",
        "--out-dir", root / "out", "--cache-dir", root / "cache", "--json",
    )  # fmt: skip
    return last_json(result)


@pytest.fixture(scope="module")
def valid_images(trained):
    manifest = pd.read_csv(trained["data"]["manifest"])
    return manifest.loc[manifest["split"] == "valid", "path"].head(2).tolist()


@pytest.mark.parametrize("command", HELP_FLAGS)
def test_every_command_has_help_naming_its_flags(command):
    result = invoke(command, "--help")

    assert result.exit_code == 0, result.output
    missing = [flag for flag in HELP_FLAGS[command] if flag not in result.stdout]
    assert not missing, result.stdout


def test_train_json_is_the_last_line_and_matches_the_mlflow_run(trained, store):
    required = {"run_id", "error_rate", "valid_loss", "best_epoch", "epochs_trained", "base_lr", "images_per_second"}
    assert required | {"model_uri", "arch", "model_version", "registered_model", "experiment_id"} <= set(trained)
    assert trained["arch"] == "resnet18" and trained["registered_model"] == "cli-pets" and trained["base_lr"] == 2e-3
    assert Path(trained["out_dir"]).is_absolute()
    run = mlflow.MlflowClient(store).get_run(trained["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["error_rate"] == pytest.approx(trained["error_rate"])
    assert run.data.tags["model_version"] == str(trained["model_version"])


def test_the_recipe_a_run_logged_repeats_it_with_exactly_its_params(trained, store, tmp_path):
    from lib.recipe import Recipe, fields

    client = mlflow.MlflowClient(store)
    first = client.get_run(trained["run_id"])
    assert {f"{section}.{name}" for section, name in fields()} <= set(first.data.params)  # every setting is logged
    recipe = Path(client.download_artifacts(first.info.run_id, "recipe.yaml", str(tmp_path)))
    assert Recipe.load(recipe).model.arch == "resnet18"

    again = last_json(invoke("train", "--recipe", recipe, "--json"))

    second = client.get_run(again["run_id"])
    assert second.info.run_id != first.info.run_id and second.info.status == "FINISHED"
    assert second.data.params == first.data.params
    assert again["error_rate"] == pytest.approx(trained["error_rate"])  # same seed, same data: the same model


def test_a_flag_overrides_the_recipe_file_and_a_bad_file_is_one_line(tmp_path):
    from lib.recipe import Recipe

    recipe = Recipe().updated({"bs": 16, "epochs": 2}).save(tmp_path / "recipe.yaml")
    result = invoke("train", "--recipe", recipe, "--bs", "0")
    assert result.exit_code == 2 and result.output.count("Error:") == 1 and "Traceback" not in result.output
    assert "--bs: Input should be greater than or equal to 1" in result.output

    (tmp_path / "typo.yaml").write_text("schedule:\n  epoch: 3\n")
    result = invoke("lr-find", "--recipe", tmp_path / "typo.yaml")
    assert result.exit_code == 2 and "schedule.epoch: is not a setting of the recipe" in result.output
    assert str(tmp_path / "typo.yaml") in result.output

    result = invoke("summary", "--recipe", tmp_path / "missing.yaml")
    assert result.exit_code == 2 and "cannot read the recipe" in result.output


def test_predict_json_agrees_with_the_exported_classifier(trained, valid_images):
    out_dir = Path(trained["out_dir"])
    exported = next(out_dir / stage / "model.pth" for stage in ("final", "probe") if (out_dir / stage).is_dir())
    expected = Classifier.load(exported, device="cpu").predict(valid_images)

    predictions = last_json(invoke("predict", trained["model_uri"], *valid_images, "--top-k", BREEDS, "--json"))

    assert [p["image"] for p in predictions] == valid_images
    assert [p["label"] for p in predictions] == [e.label for e in expected]
    for prediction, oracle in zip(predictions, expected, strict=True):
        probabilities = [top["probability"] for top in prediction["top"]]
        assert {top["label"] for top in prediction["top"]} == set(oracle.probabilities)
        assert all(0 <= p <= 1 for p in probabilities) and sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert probabilities == sorted(probabilities, reverse=True)
        assert prediction["probability"] == pytest.approx(oracle.probability, abs=1e-4)


def test_predict_reports_an_unreadable_picture_on_its_line_and_labels_the_others(trained, valid_images, tmp_path):
    broken = tmp_path / "notes.jpg"
    broken.write_text("not a picture")
    result = invoke("predict", trained["model_uri"], valid_images[0], broken, valid_images[1])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{broken}: could not read it: UnidentifiedImageError: cannot identify image file image 1" in result.stderr
    labelled = [line.split(":")[0] for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert labelled == valid_images[:2]


def test_predict_with_tta_blends_augmented_views_through_the_served_model(trained, valid_images, store):
    out_dir = Path(trained["out_dir"])
    exported = next(out_dir / stage / "model.pth" for stage in ("final", "probe") if (out_dir / stage).is_dir())
    export = read_export(exported)
    model = serving_model(export)

    def predict(pictures):
        with torch.inference_mode():
            return model(torch.from_numpy(pictures)).numpy()

    # Each picture's views are drawn on their own, so a picture's TTA does not depend on the others in the command.
    expected = np.concatenate([tta_probabilities(predict, [image], export.presize) for image in valid_images])

    predictions = last_json(
        invoke("predict", trained["model_uri"], *valid_images, "--top-k", BREEDS, "--tta", "--json")
    )

    for prediction, row in zip(predictions, expected, strict=True):
        probabilities = {top["label"]: top["probability"] for top in prediction["top"]}
        assert probabilities == pytest.approx(dict(zip(export.vocab, row.tolist(), strict=True)), abs=1e-4)
    metrics = mlflow.MlflowClient(store).get_run(trained["run_id"]).data.metrics
    for name in ("tta_error_rate", "tta_accuracy", "tta_valid_loss"):  # logged beside the plain ones
        assert metrics[name] == pytest.approx(trained[name])
    assert trained["tta_error_rate"] == pytest.approx(1 - trained["tta_accuracy"])


def test_predict_by_registered_version_prints_one_line_per_image(trained, valid_images):
    result = invoke("predict", f"models:/cli-pets/{trained['model_version']}", *valid_images)

    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.split(":")[0] in valid_images]
    assert len(lines) == len(valid_images)


def test_predict_names_a_missing_image(tmp_path):
    missing = tmp_path / "no-such-cat.jpg"

    result = invoke("predict", "models:/cli-pets/1", missing)

    assert result.exit_code == 2 and result.stderr == f"Error: no such image file: {missing}\n"


def test_predict_names_a_model_uri_that_does_not_resolve(mlflow_uri, tmp_path):
    picture = tmp_path / "cat.jpg"
    Image.new("RGB", (64, 48), "orange").save(picture)

    result = invoke("predict", "models:/no-such-model/7", picture)

    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "models:/no-such-model/7" in result.output and "pets train" in result.output
    assert "MLFLOW_TRACKING_URI" in result.output


def test_compare_rejects_an_unknown_architecture_by_name():
    result = invoke("compare", "--archs", "resnet18,nope")

    assert result.exit_code == 2
    assert "nope" in result.output and "resnet50" in result.output


def test_compare_passes_every_recipe_flag_as_a_valid_training_setting(tmp_path):
    # The flow checks settings and archs before training anything: a repeated arch fails it right after that check.
    result = invoke("compare", "--archs", "resnet18,resnet18", *TINY[2:], "--out-dir", tmp_path, "--json")

    assert result.exit_code == 2 and result.stderr.count("Error:") == 1
    assert "more than once" in result.output and "is not a setting" not in result.output


def test_data_url_and_data_dir_are_exclusive(tmp_path):
    result = invoke("train", "--data-url", "file:///x.tgz", "--data-dir", tmp_path)

    assert result.exit_code == 2 and "not both" in result.output


def test_announce_dataset_without_a_prefect_server_says_what_to_set():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = invoke("announce-dataset", "file:///data/pets-v2.tgz")

    assert result.exit_code == 2
    assert "PREFECT_API_URL is not set" in result.output and "Traceback" not in result.output


def test_announce_dataset_sends_the_event_to_the_server():
    from flows.events import announce_dataset

    assert announce_dataset("file:///data/pets-v2.tgz", "cli-test")


def test_ui_serves_the_tracking_store_on_loopback_with_artifacts_beside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")

    command, env = ui_command(host="127.0.0.1", port=5123)

    options = dict(zip(command[4::2], command[5::2], strict=True))
    assert command[1:4] == ["-m", "mlflow", "ui"]
    assert options == {
        "--backend-store-uri": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
        "--default-artifact-root": (tmp_path / "store" / "artifacts").as_uri(),
        "--host": "127.0.0.1",
        "--port": "5123",
        "--workers": "1",
    }
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false" and (tmp_path / "store").is_dir()
