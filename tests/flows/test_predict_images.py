"""The predict-images flow and `pets predict-images` on a tiny registered model, against the registered pyfunc itself.

One model is logged and registered for the module (resnet18, random init, 40 px presize), in a store of its own.
"""

import json
import shutil

import mlflow
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from flows.predict import predict_images
from lib.recipe import PredictSettings, Recipe, RuntimeSettings
from lib.serve.batch import read_predictions
from tasks import tracking
from tests.lib.test_batch_prediction import bad_inputs
from tests.support.images import write_image

pytestmark = pytest.mark.usefixtures("prefect_harness")

VOCAB = ["cat", "dog", "fox"]
MODEL = "predict-test-classifier"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, _mlflow_template_db):
    """A store holding MODEL v1 with the alias champion: a tiny classifier logged as `pets train` logs one."""
    from lib.serve.inference import export_classifier
    from lib.train.model import create_model

    root = tmp_path_factory.mktemp("predict-store")
    shutil.copy(_mlflow_template_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        torch.manual_seed(0)
        model = create_model("resnet18", n_classes=len(VOCAB), pretrained=False)
        exported = export_classifier(root / "model.pth", model, arch="resnet18", vocab=VOCAB, size=32, presize=40)
        examples = [str(write_image(root / f"example{index}.jpg", (60, 48), (90 * index, 40, 40))) for index in (0, 1)]
        recipe = Recipe().updated({"experiment": "predict-test", "arch": "resnet18"})
        run = tracking.start_run("predict-test", "m", {tracking.FLOW_RUN_TAG: "flow-p"}, recipe=recipe)
        info = tracking.log_classifier(run.run_id, str(exported), examples, registered_model=MODEL, step=0)
        tracking.end_run(run.run_id)
        mlflow.MlflowClient(uri).set_registered_model_alias(MODEL, "champion", info["model_version"])
        yield {"uri": uri, **info}


def settings(**given) -> PredictSettings:
    return PredictSettings(registered_model=MODEL, top_k=2, workers=0, **given)


def test_a_folder_is_labelled_as_the_registered_model_serves_it_recorded_in_mlflow_then_a_rerun_is_cached(
    registered, tmp_path
):
    predicted, reported = bad_inputs(tmp_path / "images")
    runtime = RuntimeSettings(device="cpu", out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))

    first = predict_images(str(tmp_path / "images"), settings(probabilities=True, bs=3), runtime)

    rows = read_predictions(first["predictions"]).set_index("file")
    assert list(pd.read_csv(first["predictions"]).columns) == ["file", "label", "probability", "top_k", "error",
                                                               "probabilities"]  # fmt: skip
    served, _ = tracking.load_served_model(f"models:/{MODEL}/{registered['model_version']}")
    request = pd.DataFrame({"image": [(tmp_path / "images" / name).read_bytes() for name in rows.index]})
    expected = served.predict(request, params={"top_k": 2, "probabilities": True})
    expected.index = rows.index
    assert sorted(rows.index[rows["error"].notna()]) == reported
    for name in predicted:
        assert rows.loc[name, "label"] == expected.loc[name, "label"]
        assert rows.loc[name, "probabilities"] == pytest.approx(expected.loc[name, "probabilities"], abs=1e-5)
        assert rows.loc[name, "top_k"] == pytest.approx(expected.loc[name, "top_k"], abs=1e-5)
    assert all(expected.loc[name, "error"] for name in reported)
    assert first["cached"] is False and first["unreadable"] == len(reported) and first["images"] == 8

    client = mlflow.MlflowClient(registered["uri"])
    run = client.get_run(first["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "pets-predictions" and run.info.status == "FINISHED"
    params = run.data.params
    assert (params["registered_model"], params["model_version"], params["model_alias"]) == (MODEL, "1", "champion")
    assert params["model_id"] == registered["model_id"] and params["input_digest"] == first["input_digest"]
    assert (params["top_k"], params["tta"], params["precision"]) == ("2", "False", "fp32")
    metrics = run.data.metrics
    assert (metrics["images"], metrics["unreadable"]) == (8, len(reported)) and metrics["images_per_second"] > 0
    assert run.data.tags[tracking.CACHE_HIT_TAG] == "false"
    assert [model.model_id for model in run.inputs.model_inputs] == [registered["model_id"]]
    artifacts = sorted(item.path for item in client.list_artifacts(run.info.run_id))
    assert artifacts == ["class_histogram.png", "predictions.csv"]
    logged = client.download_artifacts(run.info.run_id, "predictions.csv", str(tmp_path))
    assert pd.read_csv(logged).equals(pd.read_csv(first["predictions"]))

    again = predict_images(str(tmp_path / "images"), settings(probabilities=True, bs=5), runtime)  # bs: same rows
    assert again["cached"] is True and again["run_id"] != first["run_id"]
    assert again["images_per_second"] == first["images_per_second"]  # the cached pass's, not a second one
    assert pd.read_csv(again["predictions"]).equals(pd.read_csv(first["predictions"]))
    assert client.get_run(again["run_id"]).data.tags[tracking.CACHE_HIT_TAG] == "true"

    for stored in (tmp_path / "cache" / "predictions").glob("*.csv"):  # the cached rows' file, gone
        stored.unlink()
    healed = predict_images(str(tmp_path / "images"), settings(probabilities=True, bs=3), runtime)
    assert healed["cached"] is False and pd.read_csv(healed["predictions"]).equals(pd.read_csv(first["predictions"]))

    (tmp_path / "images" / "plain.jpg").write_bytes((tmp_path / "images" / "cmyk.jpg").read_bytes())
    changed = predict_images(str(tmp_path / "images"), settings(probabilities=True), runtime)
    assert changed["cached"] is False and changed["input_digest"] != first["input_digest"]


def invoke(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "200"})


def test_pets_predict_images_labels_a_csv_with_tta_and_names_an_unknown_alias_or_version_in_one_line(
    registered, tmp_path
):
    write_image(tmp_path / "a.jpg", (50, 40))
    (tmp_path / "broken.jpg").write_text("not a picture")
    pd.DataFrame({"path": ["a.jpg", "broken.jpg", "missing.jpg"]}).to_csv(tmp_path / "list.csv", index=False)
    common = ["--model", MODEL, "--device", "cpu", "--workers", "0", "--cache-dir", tmp_path / "cache"]

    done = invoke("predict-images", tmp_path / "list.csv", *common, "--tta", "--out-dir", tmp_path / "out", "--json")

    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rows = read_predictions(result["predictions"])
    assert rows["file"].tolist() == ["a.jpg", "broken.jpg", "missing.jpg"]
    assert rows["label"].iloc[0] in VOCAB and len(rows["top_k"].iloc[0]) == 5 - 2  # capped at the 3 classes
    assert "cannot identify image file" in rows["error"].iloc[1] and "FileNotFoundError" in rows["error"].iloc[2]
    params = mlflow.MlflowClient(registered["uri"]).get_run(result["run_id"]).data.params
    assert params["tta"] == "True" and params["input"] == str(tmp_path / "list.csv")

    for option, named in (("--alias", "no alias 'nope'"), ("--version", "no version '9'")):
        refused = invoke("predict-images", tmp_path / "list.csv", *common, option, "nope" if option == "--alias" else 9)
        assert refused.exit_code == 2, refused.output
        (line,) = refused.output.strip().splitlines()
        assert named in line and MODEL in line and "champion -> v1" in line and "Traceback" not in line
    refused = invoke("predict-images", tmp_path / "nowhere", *common)
    assert refused.exit_code == 2 and "nowhere does not exist" in refused.output
    refused = invoke("predict-images", tmp_path / "list.csv", *common, "--top-k", "0")
    assert refused.exit_code == 2 and "--top-k" in refused.output


def test_every_prediction_and_runtime_setting_is_an_option_and_in_the_flows_form():
    from lib.recipe import DATA_PARALLEL_SETTINGS, PREDICT_TOP_K, field_option
    from lib.serve.contract import DEFAULT_TOP_K

    text = invoke("predict-images", "--help").stdout
    trains_only = {"compile", *DATA_PARALLEL_SETTINGS}  # nothing compiles a prediction or runs it on several ranks
    for model in (PredictSettings, RuntimeSettings):
        for name in model.model_fields:
            flag = f"--{field_option(model, name).replace('_', '-')}"
            assert (flag in text) == (name not in trains_only), flag
    schema = predict_images.parameters.model_dump()
    assert schema["required"] == ["source"]
    for model in (PredictSettings, RuntimeSettings):
        assert set(schema["definitions"][model.__name__]["properties"]) == set(model.model_fields)
    assert PREDICT_TOP_K == DEFAULT_TOP_K  # the CSV's top_k is the served answer's by default


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_cpu_deployment_labels_a_folder_through_a_real_worker(registered, tmp_path):
    from tests.support.prefect_server import prefect_server

    predicted, reported = bad_inputs(tmp_path / "images")
    worker_env = {"MLFLOW_TRACKING_URI": registered["uri"], "MLFLOW_DISABLE_TELEMETRY": "true"}
    with prefect_server(tmp_path / "prefect") as server:
        server.cli("work-pool", "create", "cpu", "--type", "process", "--overwrite")
        server.cli("--no-prompt", "deploy", "--name", "predict-images-cpu")
        (deployment,) = server.post("/deployments/filter", {})
        server.start_worker("cpu", extra_env=worker_env)
        parameters = {
            "source": str(tmp_path / "images"),
            "settings": {"registered_model": MODEL, "workers": 0},
            "runtime": {"device": "cpu", "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")},
        }
        run = server.post(f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})
        final = server.wait_for_final_state(run["id"], timeout=300)
        assert final["state_type"] == "COMPLETED", f"{final['state']}\n{server.diagnostics()}"
    assert (deployment["work_pool_name"], deployment["name"]) == ("cpu", "predict-images-cpu")

    client = mlflow.MlflowClient(registered["uri"])
    experiment = client.get_experiment_by_name("pets-predictions")
    (found,) = client.search_runs([experiment.experiment_id], f"tags.`{tracking.FLOW_RUN_TAG}` = '{run['id']}'")
    assert found.data.params["model_version"] == "1" and found.data.params["device"] == "cpu"
    rows = read_predictions(tmp_path / "out" / found.info.run_id / "predictions.csv")
    assert sorted(rows.loc[rows["error"].notna(), "file"]) == reported
    assert sorted(rows.loc[rows["label"].notna(), "file"]) == predicted
