"""The review loop end to end: a run's label review in MLflow and Prefect, `pets review show|apply`, and the next
run trained on the reviewed data, with its lineage. Real Prefect API, real MLflow sqlite store, real files."""

import json

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.data import prepare_data
from flows.train import REVIEW_RUN_TAG, train
from lib.common.download import file_sha256
from lib.common.errors import InputError
from lib.recipe import Recipe
from tests.flows.test_train_flow import TINY, latest_artifact
from tests.support.pets import pets_archive

pytestmark = pytest.mark.usefixtures("prefect_harness")

BREEDS, PER_BREED = 3, 8


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return pets_archive(tmp_path_factory.mktemp("source"), breeds=BREEDS, images_per_breed=PER_BREED, max_side=96)


def invoke(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "200"})


def mark(table: pd.DataFrame, actions: dict[int, str]) -> pd.DataFrame:
    """A copy of a review table with actions set at row positions."""
    table = table.copy()
    table["action"] = ""
    for position, action in actions.items():
        table.loc[position, "action"] = action
    return table


def test_the_data_stage_applies_a_reviewed_csv_or_an_overrides_file_and_refuses_a_foreign_class(archive, tmp_path):
    common = {"data_url": archive.as_uri(), "presize": 48, "cache_dir": str(tmp_path / "cache")}
    plain = prepare_data(Recipe().updated({**common, "out_dir": str(tmp_path / "plain")}))
    manifest = pd.read_csv(plain["manifest"])
    assert plain["overrides"] is None
    # A review table as a run writes one (file, label, predicted, sha256, action), marked by hand.
    table = manifest.rename(columns={"path": "file"})[["file", "label", "sha256"]].assign(predicted=manifest["label"])
    first_cat = table.index[table["label"] == table["label"].iloc[0]][0]
    other = next(label for label in table["label"] if label != table.loc[first_cat, "label"])
    relabelled = table.index[table["label"] == other][0]
    reviewed = tmp_path / "reviewed.csv"
    mark(table, {first_cat: "delete", relabelled: f"relabel:{table.loc[first_cat, 'label']}"}).to_csv(
        reviewed, index=False
    )

    applied = prepare_data(Recipe().updated({**common, "out_dir": str(tmp_path / "csv"), "overrides": str(reviewed)}))

    after = pd.read_csv(applied["manifest"])
    assert len(after) == len(manifest) - 1 and table.loc[first_cat, "sha256"] not in set(after["sha256"])
    moved = after.loc[after["sha256"] == table.loc[relabelled, "sha256"], "label"]
    assert moved.tolist() == [table.loc[first_cat, "label"]]
    recorded = applied["overrides"]
    assert recorded["version"] == 1 and recorded["deleted"] == 1 and recorded["relabelled"] == 1
    assert recorded["review_run"] is None  # the table sat in no run's review folder
    assert json.loads((tmp_path / "csv" / "overrides.json").read_text())["version"] == 1
    changes = pd.read_csv(recorded["changes"])
    assert sorted(changes["action"]) == ["delete", "relabel"]
    assert pd.read_csv(plain["manifest"]).equals(manifest)  # the earlier run's files are left as they were

    # The recorded overrides file given back is applied the same way, byte for byte the same file.
    again = prepare_data(
        Recipe().updated({**common, "out_dir": str(tmp_path / "json"), "overrides": recorded["overrides"]})
    )
    assert again["overrides"]["sha256"] == recorded["sha256"]
    assert pd.read_csv(again["manifest"])[["sha256", "label"]].equals(after[["sha256", "label"]])

    # A relabel to a class the data lacks is one line naming the file and the fix.
    mark(table, {first_cat: "relabel:emu"}).to_csv(tmp_path / "foreign.csv", index=False)
    state = prepare_data(
        Recipe().updated({**common, "out_dir": str(tmp_path / "bad"), "overrides": str(tmp_path / "foreign.csv")}),
        return_state=True,
    )
    error = state.result(raise_on_failure=False)
    assert isinstance(error, InputError) and "'relabel:emu' names no class of the dataset" in str(error)


def test_review_apply_refuses_an_unknown_action_in_one_line(tmp_path):
    table = pd.DataFrame({"file": ["/a/x_1.jpg"], "label": ["x"], "sha256": ["abc"], "action": ["burn"]})
    table.to_csv(tmp_path / "review.csv", index=False)
    result = invoke("review", "apply", tmp_path / "review.csv", "--to", tmp_path / "overrides.json")
    assert result.exit_code == 2
    assert "review.csv line 2 (x_1.jpg): unknown action 'burn'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "overrides.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)  # two tiny trainings, one with its baseline: about 2 minutes on two busy cores
def test_a_review_changes_the_next_runs_data_and_lineage(archive, tmp_path, mlflow_uri):
    common = {**TINY, "data_url": archive.as_uri(), "cache_dir": str(tmp_path / "cache"), "epochs": 1}
    common.update(out_dir=str(tmp_path / "runs"), base_lr=1e-3, retrain=False, review_per_class=3)
    first = train(Recipe().updated({**common, "baseline_epochs": 1}))

    # The review: every image, train and valid, in review/ of the run's folder and of the MLflow run.
    review = first["review"]
    table = pd.read_csv(review["table"], keep_default_na=False)
    manifest = pd.read_csv(first["data"]["manifest"])
    assert sorted(table["sha256"]) == sorted(manifest["sha256"]) and set(table["split"]) == {"train", "valid"}
    client = mlflow.MlflowClient(mlflow_uri)
    logged = {item.path.rsplit("/", 1)[-1] for item in client.list_artifacts(first["run_id"], "review")}
    assert logged == {"review.csv", *(name.rsplit("/", 1)[-1] for name in review["sheets"].values())}
    assert len(review["sheets"]) == BREEDS
    shown = latest_artifact("label-review")  # this run's: other tests' runs (the demo) make some too
    assert f"{first['run_id']}/artifacts/review/review.csv" in shown and table["file"].iloc[0] in shown

    # `pets review show` prints each class's worst rows, with their paths, and saves the table to mark.
    saved = tmp_path / "mine.csv"
    shown = invoke("review", "show", first["run_id"], "--per-class", "2", "--save", saved)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    for label, rows in table.groupby("label", sort=False):
        header = lines.index(f"{label}: {len(rows)} images, the 2 with the worst loss")
        assert [line.rsplit("  ", 1)[-1] for line in lines[header + 1 : header + 3]] == rows["file"].head(2).tolist()
    assert pd.read_csv(saved, keep_default_na=False).equals(table)

    # Mark one delete and one relabel, and record them.
    labels = list(dict.fromkeys(table["label"]))
    deleted = table.index[table["label"] == labels[0]][0]
    moved = table.index[table["label"] == labels[1]][0]
    mark(table, {deleted: "delete", moved: f"relabel:{labels[0]}"}).to_csv(saved, index=False)
    overrides = tmp_path / "overrides.json"
    applied = invoke("review", "apply", saved, "--to", overrides, "--run", first["run_id"])
    assert applied.exit_code == 0, applied.output
    assert applied.output.strip() == (
        f"Overrides v1 of run {first['run_id']} in {overrides}: 1 deleted, 1 relabelled, {len(table) - 2} kept. "
        f"Next: pets train --overrides {overrides}"
    )

    # The next run trains on the reviewed data, and reviews it out of fold: two baselines on one fold each.
    oof = {"baseline": False, "label_review": "oof", "folds": 2, "baseline_epochs": 1}
    second = train(Recipe().updated({**common, **oof, "overrides": str(overrides)}))

    review = second["review"]
    assert review["ranking"].startswith("out of fold over 2 baselines")
    ranked = pd.read_csv(review["table"], keep_default_na=False)
    assert len(ranked) == len(manifest) - 1 and {"label_quality", "issue"} <= set(ranked.columns)
    assert ranked.groupby("label", sort=False)["label_quality"].apply(lambda q: q.is_monotonic_increasing).all()
    logged = {item.path.rsplit("/", 1)[-1] for item in client.list_artifacts(second["run_id"], "review")}
    assert {"review.csv", "oof.npz"} <= logged
    assert [point.step for point in client.get_metric_history(second["run_id"], "oof-2/valid_loss")] == [0, 1]
    shown = invoke("review", "show", second["run_id"], "--per-class", "1")
    assert shown.exit_code == 0 and "the 1 with the worst label quality" in shown.stdout, shown.output
    run = client.get_run(second["run_id"])
    trained_on = pd.read_csv(client.download_artifacts(second["run_id"], "data/presized.csv", str(tmp_path)))
    assert len(trained_on) == len(manifest) - 1 and table.loc[deleted, "sha256"] not in set(trained_on["sha256"])
    assert trained_on.loc[trained_on["sha256"] == table.loc[moved, "sha256"], "label"].tolist() == [labels[0]]
    before = client.get_run(first["run_id"]).data.params
    params = run.data.params
    assert params["data_version"] != before["data_version"] and params["dataset_digest"] != before["dataset_digest"]
    assert params["overrides_version"] == "1" and params["overrides_sha256"] == file_sha256(overrides)
    assert run.data.tags[REVIEW_RUN_TAG] == first["run_id"]
    data_files = {item.path.rsplit("/", 1)[-1] for item in client.list_artifacts(second["run_id"], "data")}
    assert {"overrides.json", "overrides_changes.csv"} <= data_files

    # A run that logged no review, and one that does not exist: one line each, exit 2.
    bare = client.create_run(run.info.experiment_id).info.run_id
    missing = invoke("review", "show", bare)
    assert missing.exit_code == 2 and f"MLflow run {bare} logged no review/review.csv" in missing.output
    unknown = invoke("review", "show", "0" * 32)
    assert unknown.exit_code == 2 and f"No MLflow run {'0' * 32} in the tracking store" in unknown.output
