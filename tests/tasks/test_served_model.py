"""The registered model: a pyfunc from code that serves encoded images, agrees with validation, and stands alone."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from lib.evaluate.evaluation import validation_predictions
from lib.serve.contract import IMAGE_COLUMN
from lib.serve.inference import Classifier
from tasks import tracking
from tests.support.served import PRESIZE, SIZE, register_classifier, store_uri

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def registered(tmp_path_factory, _mlflow_template_db):
    root = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store_uri(root))
        yield register_classifier(root, _mlflow_template_db, "served")


@pytest.fixture
def served(registered, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    return tracking.load_served_model(registered.model_uri)


def request(paths) -> pd.DataFrame:
    return pd.DataFrame({IMAGE_COLUMN: [Path(path).read_bytes() for path in paths]})


def probabilities(answer: pd.DataFrame, vocab) -> np.ndarray:
    return np.array([[row[name] for name in vocab] for row in answer["probabilities"]])


def test_the_version_carries_its_contract_signature_example_and_class_names(registered, served):
    model, metadata = served
    client = mlflow.MlflowClient(registered.uri)
    version = client.get_model_version(registered.name, registered.version)
    assert json.loads(version.tags["classes"]) == list(registered.vocab) and version.tags["arch"] == "resnet18"
    assert metadata == {"vocab": list(registered.vocab), "arch": "resnet18", "size": SIZE, "presize": PRESIZE}
    signature = model.metadata.signature
    assert signature.inputs.input_names() == [IMAGE_COLUMN] and signature.inputs.inputs[0].type.name == "binary"
    assert signature.outputs.input_names() == ["label", "probability", "top_k", "error", "probabilities"]
    assert {(p.name, p.default) for p in signature.params.params} == {("top_k", 5), ("probabilities", False)}

    # The example MLflow's UI and `mlflow models predict` show is a real request: two JPEGs as base64.
    from mlflow.models.utils import load_serving_example

    example = json.loads(load_serving_example(registered.model_uri))
    assert example["dataframe_split"]["columns"] == [IMAGE_COLUMN] and len(example["dataframe_split"]["data"]) == 2
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    answer = model.predict(infer_and_parse_data(example, signature.inputs))
    assert answer["error"].isna().all() and set(answer["label"]) <= set(registered.vocab)

    # The network is a pt2 program; the only pickle in the model folder would be a bug.
    folder = Path(mlflow.artifacts.download_artifacts(registered.model_uri))
    assert (folder / "artifacts" / "network.pt2").is_file() and not list(folder.rglob("*.pkl"))
    assert sorted(p.relative_to(folder / "code").as_posix() for p in (folder / "code").rglob("*.py")) == sorted(
        tracking.CONTRACT_MODULES
    )


def test_served_probabilities_are_the_runs_validation_probabilities(registered, served):
    model, _ = served
    manifest, vocab = registered.manifest, registered.vocab
    expected = validation_predictions(
        Path(registered.export), manifest, vocab, presize=PRESIZE, size=SIZE, workers=0, device="cpu"
    ).probabilities.numpy()
    # Validation reads each picture from the presize cache: sending those bytes serves the very pixels it saw.
    valid = manifest[manifest["split"] == "valid"]
    answer = model.predict(request(valid["presized_path"]), params={"probabilities": True, "top_k": 1})
    assert np.abs(probabilities(answer, vocab) - expected).max() < 1e-5
    assert answer["label"].tolist() == [vocab[i] for i in expected.argmax(axis=1)]


def test_served_originals_agree_with_the_exported_classifier_that_pets_predict_used_to_run(registered, served):
    model, _ = served
    paths = registered.manifest["path"].head(5).tolist()
    expected = Classifier.load(Path(registered.export), device="cpu").predict(paths)
    answer = model.predict(request(paths), params={"probabilities": True})
    oracle = np.array([[p.probabilities[name] for name in registered.vocab] for p in expected])
    assert np.abs(probabilities(answer, registered.vocab) - oracle).max() < 1e-5


@pytest.mark.slow  # a fresh interpreter loading torch and MLflow: 15 s
def test_the_registered_model_loads_and_predicts_where_the_project_cannot_be_imported(registered, tmp_path):
    # A fresh interpreter, outside the checkout, with the project's editable install taken off the import path: the
    # model must bring its own code (the contract's modules) and need nothing but MLflow, torch and Pillow.
    paths = registered.manifest["path"].head(3).tolist()
    expected = Classifier.load(Path(registered.export), device="cpu").predict(paths)
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        sys.meta_path = [finder for finder in sys.meta_path if "__editable__" not in repr(finder)]
        assert all(importlib.util.find_spec(name) is None for name in ("lib", "tasks", "flows")), "project importable"
        import mlflow.pyfunc, pandas as pd
        model = mlflow.pyfunc.load_model({registered.model_uri!r})
        paths = {paths!r}
        answer = model.predict(pd.DataFrame({{"image": [open(p, "rb").read() for p in paths]}}))
        import lib
        print(json.dumps({{"labels": answer["label"].tolist(), "probability": answer["probability"].tolist(),
                          "lib": lib.__file__}}))
        """
    )
    environment = {**os.environ, "MLFLOW_TRACKING_URI": registered.uri}
    environment.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["labels"] == [p.label for p in expected]
    assert result["probability"] == pytest.approx([p.probability for p in expected], abs=1e-5)
    assert "/code/lib/" in result["lib"]  # the model's own copy, not the project
