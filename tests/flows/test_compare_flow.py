"""The comparison flow end to end, local mode: two tiny trainings as subflows, a real MLflow sqlite store and registry,
a temporary Prefect API. One comparison is run per module and read back by several tests."""

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
import torchvision
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.exceptions import ParameterTypeError

from flows.compare import COLUMNS, TrainingsFailedError, compare
from lib.data.synthetic import make_pets_dataset, pack_tgz
from lib.recipe import Recipe
from lib.train.weights import checkpoint_path, weights_for
from tasks import tracking
from tasks.tracking import champion_version

pytestmark = pytest.mark.usefixtures("prefect_harness")

ARCHS = ["resnet18", "resnet34"]
EXPERIMENT = "pets-compare-test"
REGISTERED_MODEL = "pets-compare-test-classifier"
# Tiny and random-init, the LR given (no LR finder), no baseline: a child trains in seconds on two CPU cores.
TINY = {
    "pretrained": False,
    "presize": 48,
    "size": 32,
    "bs": 8,
    "freeze_epochs": 1,
    "epochs": 1,
    "baseline": False,
    "base_lr": 2e-3,
    "fp16": False,
    "workers": 0,
}
METRICS = ("error_rate", "valid_loss", "accuracy", "train_seconds", "images_per_second", "parameters")
METRICS += ("model_size_mb", "epochs_trained")


@pytest.fixture(scope="module")
def store(tmp_path_factory, _mlflow_template_db):
    """One MLflow store for the module (mlflow_uri is per test): the failing comparison must see the first's alias."""
    folder = tmp_path_factory.mktemp("mlflow-compare")
    shutil.copy(_mlflow_template_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield mlflow.MlflowClient(uri)


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    images = make_pets_dataset(root / "pets", breeds=4, images_per_breed=10, max_side=96)
    archive = pack_tgz(images, root / "served" / "pets.tgz")
    where = {"data_url": archive.as_uri(), "cache_dir": str(root / "cache"), "out_dir": str(root / "runs")}
    return {**TINY, **where, "experiment": EXPERIMENT, "registered_model": REGISTERED_MODEL}


@pytest.fixture(scope="module")
def comparison(prefect_harness, store, settings, tmp_path_factory):
    return compare(archs=ARCHS, recipe=Recipe().updated(settings))


def runs_of(client, experiment):
    found = client.get_experiment_by_name(experiment)
    return {run.data.tags["arch"]: run for run in client.search_runs([found.experiment_id])}


def best_first(runs):
    return sorted(runs, key=lambda run: (run.data.metrics["error_rate"], run.data.metrics["valid_loss"]))


def logged_table(client, run_id):
    path = client.download_artifacts(run_id, "comparison.json")
    with open(path) as file:
        logged = json.load(file)
    return [dict(zip(logged["columns"], row, strict=True)) for row in logged["data"]]


def assert_same_row(logged, row):
    """MLflow writes table numbers with 10 significant digits: numbers match to that, everything else exactly."""
    assert list(logged) == list(row)
    for key, value in row.items():
        assert logged[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key


def test_each_architecture_trains_once_into_a_finished_run_tagged_with_the_comparison(comparison, store):
    runs = runs_of(store, EXPERIMENT)

    assert sorted(runs) == sorted(ARCHS) and len(store.search_runs([runs["resnet18"].info.experiment_id])) == 2
    for arch, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["comparison"] == comparison["comparison"] and run.data.tags["arch"] == arch
        assert run.data.params["schedule.epochs"] == "1" and run.data.params["data.size"] == "32"  # reached each child
    assert comparison["experiment"] == EXPERIMENT


def test_the_returned_table_is_best_first_and_holds_the_runs_mlflow_numbers(comparison, store):
    runs = runs_of(store, EXPERIMENT)
    rows = comparison["runs"]

    assert [row["run_id"] for row in rows] == [run.info.run_id for run in best_first(runs.values())]
    for row in rows:
        run = runs[row["arch"]]
        assert list(row) == list(COLUMNS) and row["run_id"] == run.info.run_id
        assert {key: row[key] for key in METRICS} == {key: run.data.metrics[key] for key in METRICS}
        assert row["model_version"] == run.data.tags["model_version"]
    table = comparison["table"]
    assert table.endswith(f"{comparison['comparison']}/comparison.md")
    text = Path(table).read_text()
    assert text.index(rows[0]["run_id"]) < text.index(rows[1]["run_id"])
    assert Path(table).with_suffix(".csv").read_text().splitlines()[0] == ",".join(COLUMNS)


def test_the_table_is_a_prefect_artifact(comparison):
    key = f"comparison-{comparison['comparison']}"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    assert len(artifacts) == 1 and artifacts[0].type == "table"
    shown = json.loads(artifacts[0].data)  # the same rows, numbers to 4 significant digits
    assert [row["run_id"] for row in shown] == [row["run_id"] for row in comparison["runs"]]
    for row, exact in zip(shown, comparison["runs"], strict=True):
        assert row["error_rate"] == float(f"{exact['error_rate']:.4g}") and row["parameters"] == exact["parameters"]
        assert row["train_seconds"] == float(f"{exact['train_seconds']:.4g}")
    # And a link to MLflow's compare-runs page for the two runs: the one the flow returns (and `pets compare` prints).
    with get_client(sync_client=True) as client:
        links = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mlflow-comparison"])))
    pages = [link.data for link in links if comparison["comparison"] in link.data]
    assert len(pages) == 1 and "/#/compare-runs?runs=" in pages[0]
    assert all(row["run_id"] in pages[0] for row in comparison["runs"])
    assert comparison["compare_url"] in pages[0] and comparison["compare_url"].startswith(tracking.ui_url())


def test_the_chart_draws_each_final_model_and_is_logged_on_every_child_run(comparison, store):
    chart = Path(comparison["chart"])
    assert chart.name == "comparison.png" and chart.parent == Path(comparison["table"]).parent
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in runs_of(store, EXPERIMENT).values():
        assert "comparison.png" in [item.path for item in store.list_artifacts(run.info.run_id)]


def test_the_table_is_logged_on_every_child_run(comparison, store):
    for run in runs_of(store, EXPERIMENT).values():
        names = [item.path for item in store.list_artifacts(run.info.run_id)]
        assert "comparison.json" in names
        logged = logged_table(store, run.info.run_id)
        assert len(logged) == len(comparison["runs"])
        for logged_row, row in zip(logged, comparison["runs"], strict=True):
            assert_same_row(logged_row, row)


def test_the_champion_alias_points_at_the_best_runs_model_version(comparison, store):
    best, other = best_first(runs_of(store, EXPERIMENT).values())

    assert comparison["champion"] == best.data.tags["arch"]
    assert champion_version(REGISTERED_MODEL) == comparison["champion_version"] == best.data.tags["model_version"]
    assert best.data.tags["champion"] == "true" and other.data.tags["champion"] == "false"
    assert other.data.tags["model_version"] != best.data.tags["model_version"]


def test_a_failed_child_fails_the_comparison_after_tabulating_the_others_and_leaves_the_champion(
    comparison, store, settings, tmp_path, monkeypatch
):
    # Pretrained weights come from the torch hub cache: a loadable resnet18 checkpoint and a corrupt resnet34 one, so
    # exactly one child fails, offline, once it builds its model.
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint_path(weights_for("resnet18"), checkpoints))
    checkpoint_path(weights_for("resnet34"), checkpoints).write_bytes(b"not a checkpoint")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    experiment, champion_before = "pets-compare-failing", champion_version(REGISTERED_MODEL)

    recipe = Recipe().updated({**settings, "pretrained": True, "experiment": experiment})
    state = compare(
        archs=["resnet34", "resnet18"],  # the failing child first: it must not stop the other
        recipe=recipe.updated({"out_dir": str(tmp_path / "tables")}),
        return_state=True,
    )

    assert state.is_failed()
    with pytest.raises(
        RuntimeError, match=r"2 trainings failed:\n  resnet34: Failed \(flow run [-0-9a-f]+\): CheckpointLoadError: "
    ) as failure:
        state.result()
    assert str(failure.value).startswith("1 of 2") and "resnet18:" not in str(failure.value)
    assert isinstance(failure.value, TrainingsFailedError)  # a user error in each failed child: `pets` prints one line
    runs = runs_of(store, experiment)
    assert {arch: run.info.status for arch, run in runs.items()} == {"resnet18": "FINISHED", "resnet34": "FAILED"}
    good = runs["resnet18"]
    # The others' table is written: one row, on the good run and on disk.
    assert [row["run_id"] for row in logged_table(store, good.info.run_id)] == [good.info.run_id]
    table = tmp_path / "tables" / good.data.tags["comparison"] / "comparison.md"
    assert good.info.run_id in table.read_text() and "resnet34" not in table.read_text()
    # The good child registered a new version, but the alias stays where the first comparison put it.
    assert good.data.tags["model_version"] != champion_before
    assert champion_version(REGISTERED_MODEL) == champion_before == comparison["champion_version"]
    assert good.data.tags["champion"] == "false"


def test_unknown_settings_are_refused_before_anything_trains(mlflow_uri, tmp_path):
    with pytest.raises(ParameterTypeError, match=r"recipe.schedule.epoch: Extra inputs are not permitted"):
        compare(archs=["resnet18"], recipe={"schedule": {"epoch": 3}, "runtime": {"out_dir": str(tmp_path)}})

    assert [e.name for e in mlflow.MlflowClient(mlflow_uri).search_experiments()] == ["Default"]  # no run started


def test_bad_setting_values_and_repeated_archs_are_refused_before_anything_trains(mlflow_uri, tmp_path):
    with pytest.raises(ParameterTypeError, match="epochs"):
        compare(archs=["resnet18"], recipe={"schedule": {"epochs": 0}, "runtime": {"out_dir": str(tmp_path)}})
    with pytest.raises(ValueError, match="resnet18 more than once"):
        compare(archs=["resnet18", "resnet34", "resnet18"], recipe=Recipe().updated({"out_dir": str(tmp_path)}))

    assert [e.name for e in mlflow.MlflowClient(mlflow_uri).search_experiments()] == ["Default"]


def test_deployment_mode_fails_naming_every_child_that_could_not_start(mlflow_uri, tmp_path):
    state = compare(
        archs=["resnet18", "resnet34"],
        recipe=Recipe().updated({**TINY, "out_dir": str(tmp_path)}),
        train_deployment="train-pets/no-such-deployment-{arch}",
        return_state=True,
    )

    assert state.is_failed()
    with pytest.raises(
        RuntimeError, match=r"2 of 2 trainings failed:\n  resnet18: Failed: could not .*\n  resnet34: Failed: could not"
    ) as error:
        state.result()
    for arch in ("resnet18", "resnet34"):
        assert f"could not run deployment 'train-pets/no-such-deployment-{arch}'" in str(error.value)
    assert not isinstance(error.value, TrainingsFailedError)  # children that never started: not the user's inputs
    client = mlflow.MlflowClient(mlflow_uri)
    assert client.search_runs([client.get_experiment_by_name("pets").experiment_id]) == []  # created, unused
