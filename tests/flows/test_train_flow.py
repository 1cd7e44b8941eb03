"""The training flow end to end: real HTTP on 127.0.0.1, a temporary Prefect API, a real MLflow sqlite store."""

import json
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from flows.train import SUMMARY_METRICS, train
from lib.data.synthetic import duplicate_files
from lib.recipe import Recipe
from lib.serve.inference import Classifier
from lib.train.trainer import NonFiniteLossError
from tasks.tracking import DATASET_NAME, EPOCH_METRICS, describe, load_served_model
from tests.support.http_server import serve_directory
from tests.support.pets import pets_archive

pytestmark = pytest.mark.usefixtures("prefect_harness")

BREEDS, PER_BREED = 4, 10
# Tiny and random-init, so a run takes seconds on two CPU cores; workers=0: worker processes cost more than they save.
TINY = {
    "arch": "resnet18",
    "pretrained": False,
    "presize": 48,
    "size": 32,
    "bs": 8,
    "freeze_epochs": 1,
    "fp16": False,
    "workers": 0,
    "experiment": "pets-test",
}


def tiny(**options) -> Recipe:
    """The tiny recipe with more settings by option name (`data_url`, `epochs`)."""
    return Recipe().updated({**TINY, **options})


DATA_ARTIFACTS = {
    "presized.csv", "vocab.json", "cleaning_report.json", "summary.txt", "show_batch.png", "class_counts.png",
    "left_out.csv", "duplicates.csv", "duplicates.png",
}  # fmt: skip
EVALUATION_ARTIFACTS = {"predictions.pt", "confusion_matrix.png", "most_confused.txt", "top_losses.png"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    return pets_archive(root, breeds=BREEDS, images_per_breed=PER_BREED, max_side=96, duplicates=True)


def exact_copies() -> set[str]:
    return {name for name, (_, kind) in duplicate_files(BREEDS).items() if kind == "exact"}


def artifact_names(client, run_id, path):
    return {item.path.rsplit("/", 1)[-1] for item in client.list_artifacts(run_id, path)}


def task_runs(state):
    """The task runs of a finished flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )


def latest_artifact(key: str) -> str:
    """The newest Prefect artifact with this key, as its text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    return str(artifact.data)


def metric_steps(client, run_id, key):
    return [point.step for point in client.get_metric_history(run_id, key)]


@pytest.mark.timeout(900)  # two runs, one with the LR finder: about 4 minutes on two busy cores
def test_the_flow_tracks_the_whole_recipe_in_one_mlflow_run_and_a_warm_rerun_reuses_the_data(
    archive, tmp_path, mlflow_uri, caplog
):
    with serve_directory(archive.parent) as server:
        # A signed-URL style token: it must reach the download but never an MLflow param or the dataset source.
        url = server.url(archive.name) + "?token=s3cr3t"
        common = {"data_url": url, "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "runs")}
        recipe = tiny(**common, epochs=2, baseline_epochs=1)
        result = train(recipe)
        requests_after_first = server.requests
        warm = train(tiny(**common, epochs=1, base_lr=1e-3, baseline=False, retrain=False))

    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["arch"] == "resnet18"
    assert len(client.search_runs([run.info.experiment_id])) == 2  # one MLflow run per flow run

    # Params: every recipe setting under its dotted name, the LR the finder chose, and what ran and on what data.
    params = run.data.params
    assert set(Recipe().params()) <= set(params)
    assert params["data.bs"] == "8" and params["data.size"] == "32" and params["schedule.epochs"] == "2"
    assert float(params["base_lr"]) == pytest.approx(result["base_lr"]) and params["base_lr_source"] == "lr_find valley"
    assert params["precision_effective"] == "fp32" and params["device_effective"] == "cpu"
    assert params["data.labels"] == "auto" and params["data.label_source"] == "regex"  # the pets: the book's regex
    assert params["data.url"] == server.url(archive.name) + "?<redacted>"
    assert not [key for key, value in params.items() if "s3cr3t" in value]
    manifest = pd.read_csv(result["data"]["manifest"])
    assert params["classes"] == str(BREEDS) and int(params["valid_size"]) == (manifest["split"] == "valid").sum()

    # Its name says what trained, on which data (the archive's name and the data version) and when.
    assert re.fullmatch(rf"resnet18 · pets {params['data_version'][:6]} · \d\d-\d\d \d\d:\d\d", run.info.run_name)
    assert result["run_name"] == run.info.run_name

    # Per-epoch histories: the same keys for every stage, step = epoch index within the stage.
    epochs_by_stage = {"baseline": 1 + 1, "probe": 1 + 2, "final": 1 + result["epochs_trained"]}
    for stage, epochs in epochs_by_stage.items():
        for key in EPOCH_METRICS:
            assert metric_steps(client, run.info.run_id, f"{stage}/{key}") == list(range(epochs)), (stage, key)
    # And one line per epoch in the flow run's log (the warm rerun's probe has 2 epochs: "probe epoch k/2").
    logged = [record.getMessage() for record in caplog.records]
    for stage in ("baseline", "probe"):
        epochs = epochs_by_stage[stage]
        logged_epochs = [f"{stage} epoch {k + 1}/{epochs} (" for k in range(epochs)]
        counts = [sum(line.startswith(prefix) for line in logged) for prefix in logged_epochs]
        assert counts == [1] * epochs, (stage, counts)
    assert run.data.metrics["error_rate"] == pytest.approx(result["error_rate"])
    assert set(SUMMARY_METRICS) <= set(run.data.metrics)

    # Retraining for the best epoch count: the final stage is a fresh run of best_epoch epochs, or the probe itself.
    probe = client.get_metric_history(run.info.run_id, "probe/valid_loss")
    final = client.get_metric_history(run.info.run_id, "final/valid_loss")
    run_dir = tmp_path / "runs" / run.info.run_id
    if result["best_epoch"] < 2:
        assert result["epochs_trained"] == result["best_epoch"] and (run_dir / "final").is_dir()
    else:
        assert [point.value for point in final] == [point.value for point in probe]

    # The resolved recipe: the same settings, the token redacted, and loading it gives the run's params back.
    logged = Recipe.load(client.download_artifacts(run.info.run_id, "recipe.yaml", str(tmp_path)))
    assert logged == recipe.updated({"data_url": params["data.url"]})
    assert {key: describe(value) for key, value in logged.params().items()} == {
        key: params[key] for key in recipe.params()
    }

    # Artifacts: data, LR finder, loss curves of each stage, interpretation.
    assert artifact_names(client, run.info.run_id, "data") == DATA_ARTIFACTS
    assert artifact_names(client, run.info.run_id, "lr_find") == {"lr_find.png"}
    for stage in ("baseline", "probe", "final"):
        assert artifact_names(client, run.info.run_id, stage) == {"loss_curves.png"}
    assert artifact_names(client, run.info.run_id, "evaluation") == EVALUATION_ARTIFACTS

    # The planted near-duplicates: in the logged table with their originals, the exact copy used once, every group
    # on one side of the split, and counted in the params and the data summary.
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "data/duplicates.csv", str(tmp_path)))
    names = table.assign(name=table["path"].map(lambda path: Path(path).name)).set_index("name")
    for name, (original, kind) in duplicate_files(BREEDS).items():
        assert names.loc[name, "group"] == names.loc[original, "group"], kind
        assert names.loc[name, "used"] == (kind != "exact")
    assert int(params["duplicate_groups"]) == table["group"].nunique() >= 1
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    assert not manifest["path"].map(lambda path: Path(path).name).isin(exact_copies()).any()
    summary = (run_dir / "data" / "summary.txt").read_text()
    assert f"Near-duplicates (hashes within 10 bits): {params['duplicate_groups']} groups" in summary
    shown = latest_artifact("data-summary")  # the warm rerun's, on the same data
    assert f"{params['duplicate_groups']} groups" in shown and "duplicates.csv" in shown and "duplicates.png" in shown

    # The labelled dataset is the run's training input.
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == DATASET_NAME and dataset_input.dataset.digest == params["dataset_digest"]
    assert "s3cr3t" not in dataset_input.dataset.source and "<redacted>" in dataset_input.dataset.source
    assert {(tag.key, tag.value) for tag in dataset_input.tags} >= {("mlflow.data.context", "training")}
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == len(manifest)

    # The registered model serves encoded pictures with class names and agrees with the exported classifier.
    version = client.get_model_version("pets-classifier", str(result["model_version"]))
    assert version.source == result["model_uri"] and version.run_id == run.info.run_id
    served, metadata = load_served_model(f"models:/pets-classifier/{result['model_version']}")
    vocab = json.loads((run_dir / "data" / "vocab.json").read_text())
    assert metadata["vocab"] == vocab and metadata["presize"] == 48
    images = manifest.loc[manifest["split"] == "valid", "path"].head(3).tolist()  # batch of 3: the example had 2
    answer = served.predict(pd.DataFrame({"image": [Path(image).read_bytes() for image in images]}))
    stage = "final" if (run_dir / "final").is_dir() else "probe"
    exported = Classifier.load(run_dir / stage / "model.pth", device="cpu")
    expected = exported.predict(images)
    assert answer["label"].tolist() == [prediction.label for prediction in expected]
    assert answer["probability"].tolist() == pytest.approx([p.probability for p in expected], abs=1e-5)

    # The warm rerun: no download, nothing presized or decoded again, and the probe is the final model.
    assert requests_after_first == 1 and server.requests == 1
    assert warm["data"]["cache_hits"] == len(manifest) and warm["data"]["written"] == 0
    assert warm["data"]["decoded"] == 0
    warm_run = client.get_run(warm["run_id"])
    assert warm_run.data.params["base_lr_source"] == "given" and "baseline/valid_loss" not in warm_run.data.metrics
    assert not (tmp_path / "runs" / warm["run_id"] / "final").exists()


def test_a_failure_mid_flow_marks_the_mlflow_run_failed_with_what_it_had_logged(archive, tmp_path, mlflow_uri):
    recipe = tiny(
        data_url=archive.as_uri(),
        epochs=1,
        base_lr=1e30,  # the loss overflows in the first batch: the documented non-finite-loss error
        baseline=False,
        out_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
    )
    state = train(recipe, return_state=True)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)  # raised in the stage's process, rebuilt here with its message
    assert isinstance(error, NonFiniteLossError) and str(error).startswith("The probe stage stopped: the training loss")
    (probe,) = [run for run in task_runs(state) if run.name == "fine-tune-probe"]
    assert probe.state.is_failed() and probe.run_count == 1  # an error, not a kill: the same LR would diverge again
    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pets-test").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["pets.failure"] == f"NonFiniteLossError: {error}"
    assert run.data.params["base_lr"] == "1e+30" and run.data.params["model.arch"] == "resnet18"
    assert artifact_names(client, run.info.run_id, "data") == DATA_ARTIFACTS
    assert client.search_registered_models() == []  # nothing half-trained was registered


def test_parameters_are_validated_before_anything_runs(mlflow_uri):
    bad_settings = {
        ("data", "bs"): 0,
        ("data", "valid_pct"): 1.5,
        ("model", "arch"): "resnet19",
        ("schedule", "epochs"): 0,
    }
    for (section, name), value in bad_settings.items():
        recipe = {"data": {"dir": "/nonexistent"}, "tracking": {"experiment": "pets-test"}}
        recipe[section] = {**recipe.get(section, {}), name: value}
        state = train(recipe=recipe, return_state=True)  # as a deployment or the Prefect UI passes it
        assert state.is_failed(), name
        assert f"recipe.{section}.{name}: Input should" in str(state.result(raise_on_failure=False)), name
    assert mlflow.MlflowClient(mlflow_uri).search_experiments(filter_string="name = 'pets-test'") == []


def test_an_unreachable_tracking_server_stops_the_flow_before_any_data_is_fetched(archive, tmp_path, monkeypatch):
    from tasks.tracking import TrackingStoreUnavailableError
    from tests.support.http_server import refused_port

    with serve_directory(archive.parent) as server, refused_port() as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        recipe = tiny(data_url=server.url(archive.name), cache_dir=str(tmp_path / "cache"))
        state = train(recipe, return_state=True)
        assert server.requests == 0  # nothing downloaded, nothing trained
    error = state.result(raise_on_failure=False)
    assert isinstance(error, TrackingStoreUnavailableError) and f"127.0.0.1:{port}" in str(error)
