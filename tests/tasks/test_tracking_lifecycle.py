"""The MLflow run's lifecycle (tasks/tracking.py) against a real sqlite store: start, take back, resume, orphans,
per-stage histories, the stage process's epochs, and the logged and registered classifier."""

import mlflow
import pytest

from lib.recipe import Recipe
from lib.train.trainer import EpochStats
from tasks import tracking

pytestmark = pytest.mark.usefixtures("prefect_harness")

RECIPE = Recipe().updated({"experiment": "lifecycle", "arch": "resnet18", "bs": 8})


def row(epoch: int, valid_loss: float) -> EpochStats:
    return EpochStats(
        phase="unfrozen", epoch=epoch, epochs=3, train_loss=1.0, train_loss_mean=1.0, valid_loss=valid_loss,
        error_rate=0.5, accuracy=0.5, seconds=1.0, images_per_second=10.0, lr=1e-3,
    )  # fmt: skip


def tags(flow_run_id: str) -> dict[str, str]:
    return {tracking.FLOW_RUN_TAG: flow_run_id, "arch": "resnet18"}


def status(run_id: str) -> str:
    return mlflow.MlflowClient(tracking.tracking_uri()).get_run(run_id).info.status


def test_a_training_run_ends_finished_failed_or_killed_and_keeps_what_it_logged(mlflow_uri):
    with tracking.training_run(RECIPE, "ok", tags("flow-1")) as run:
        tracking.log_metrics(run.run_id, {"x": 1.0})
        assert status(run.run_id) == "RUNNING"
    assert status(run.run_id) == "FINISHED"

    with pytest.raises(ValueError), tracking.training_run(RECIPE, "bad", tags("flow-2")) as failed:
        tracking.log_metrics(failed.run_id, {"x": 2.0})
        raise ValueError("boom")
    assert status(failed.run_id) == "FAILED"
    assert mlflow.MlflowClient(mlflow_uri).get_run(failed.run_id).data.metrics == {"x": 2.0}

    with pytest.raises(KeyboardInterrupt), tracking.training_run(RECIPE, "ctrl-c", tags("flow-3")) as killed:
        raise KeyboardInterrupt
    assert status(killed.run_id) == "KILLED"


def test_the_same_flow_run_gets_its_mlflow_run_back_and_an_orphan_is_marked_failed(mlflow_uri):
    first = tracking.start_run("lifecycle", "a", tags("flow-9"), recipe=RECIPE)
    tracking.log_params(first.run_id, {"base_lr": 0.01, "base_lr_source": "lr_find valley"})
    assert tracking.fail_orphaned_runs("lifecycle", "flow-9") == [first.run_id]
    assert tracking.fail_orphaned_runs("lifecycle", "flow-9") == []  # only RUNNING ones
    assert tracking.fail_orphaned_runs("no-such-experiment", "flow-9") == []
    assert status(first.run_id) == "FAILED"

    again = tracking.start_run("lifecycle", "a", tags("flow-9"), recipe=RECIPE)  # `prefect flow-run retry`
    assert again.run_id == first.run_id and status(first.run_id) == "RUNNING"
    assert again.chosen_lr() == (0.01, "lr_find valley")  # the finder is not run twice
    other = tracking.start_run("lifecycle", "b", tags("flow-10"), recipe=RECIPE)
    assert other.run_id != first.run_id and other.chosen_lr() is None


def test_resume_takes_back_an_interrupted_run_with_its_recipe_and_refuses_anything_else(mlflow_uri, tmp_path):
    with pytest.raises(KeyboardInterrupt), tracking.training_run(RECIPE, "r", tags("flow-20")) as run:
        run.log_recipe(RECIPE, tmp_path)
        raise KeyboardInterrupt
    assert tracking.logged_recipe(run.run_id) == RECIPE

    resumed = tracking.start_run("lifecycle", "r", tags("flow-21"), recipe=RECIPE, resume=run.run_id)
    assert resumed.run_id == run.run_id and status(run.run_id) == "RUNNING"
    client = mlflow.MlflowClient(mlflow_uri)
    assert client.get_run(run.run_id).data.tags[tracking.FLOW_RUN_TAG] == "flow-21"  # its on_crashed finds it

    tracking.end_run(run.run_id, "KILLED")  # interrupted again (a RUNNING run this process trains is not resumable)
    with pytest.raises(tracking.ResumeRefusedError, match=r"data.bs 8 -> 16"):
        tracking.resumable_run(run.run_id, RECIPE.updated({"bs": 16}))
    tracking.end_run(run.run_id, "FINISHED")
    with pytest.raises(tracking.ResumeRefusedError, match="is FINISHED, not interrupted"):
        tracking.resumable_run(run.run_id)
    with pytest.raises(tracking.ResumeRefusedError, match="no such run"):
        tracking.resumable_run("0" * 32)


def test_the_logged_recipe_never_holds_a_token(mlflow_uri, tmp_path):
    recipe = RECIPE.updated({"data_url": "https://user:s3cr3t@data.test/pets.tgz?sig=abc"})
    run = tracking.start_run("lifecycle", "t", tags("flow-30"), recipe=recipe)
    run.log_recipe(recipe, tmp_path)
    params = mlflow.MlflowClient(mlflow_uri).get_run(run.run_id).data.params
    assert "s3cr3t" not in params["data.url"] and "abc" not in params["data.url"]
    assert "s3cr3t" not in (tmp_path / tracking.RECIPE_ARTIFACT).read_text()
    assert tracking.logged_recipe(run.run_id).data.url == params["data.url"]


def test_per_stage_histories_and_the_stage_process_epochs_are_logged_once_per_step(mlflow_uri, caplog):
    from prefect import flow

    from tasks.training import _progress_reporter

    run = tracking.start_run("lifecycle", "h", tags("flow-40"), recipe=RECIPE)
    tracking.log_history(run.run_id, "final", [row(0, 0.9), row(1, 0.8)])
    assert tracking.logged_steps(run.run_id, "final/valid_loss") == {0, 1}
    assert tracking.metric_history(run.run_id, "final/valid_loss") == [0.9, 0.8]

    @flow
    def two_attempts() -> None:
        # A stage process reports every epoch of its stage, restored ones included: steps MLflow has are not repeated.
        report = _progress_reporter(run.run_id, "probe", total_epochs=3)
        report(row(0, 0.7), 0)
        second_attempt = _progress_reporter(run.run_id, "probe", total_epochs=3)  # after a kill and a retry
        for step, loss in enumerate([0.7, 0.6, 0.5]):
            second_attempt(row(step, loss), step)

    two_attempts()
    history = mlflow.MlflowClient(mlflow_uri).get_metric_history(run.run_id, "probe/valid_loss")
    assert sorted((point.step, point.value) for point in history) == [(0, 0.7), (1, 0.6), (2, 0.5)]
    assert set(tracking.epoch_metrics(row(0, 0.7), "probe")) == {f"probe/{key}" for key in tracking.EPOCH_METRICS}
    # One line per epoch and attempt in the run's log, 4 significant digits; the epoch the retry restored says so.
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("probe epoch")]
    assert lines == [
        "probe epoch 1/3 (unfrozen 1/3): train_loss 1.000, valid_loss 0.7000, error_rate 0.5000, time 00:01",
        "probe epoch 1/3 (unfrozen 1/3): train_loss 1.000, valid_loss 0.7000, error_rate 0.5000, time 00:01 "
        "(restored from the checkpoint of an earlier attempt)",
        "probe epoch 2/3 (unfrozen 2/3): train_loss 1.000, valid_loss 0.6000, error_rate 0.5000, time 00:01",
        "probe epoch 3/3 (unfrozen 3/3): train_loss 1.000, valid_loss 0.5000, error_rate 0.5000, time 00:01",
    ]


def test_a_new_run_records_its_source_commit_and_gets_its_name_when_the_data_is_known(mlflow_uri):
    import subprocess

    run = tracking.start_run("lifecycle", "resnet18 · 12-02 00:14", tags("flow-45"), recipe=RECIPE)
    recorded = mlflow.MlflowClient(mlflow_uri).get_run(run.run_id)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tracking.PROJECT_ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a checkout: its commit, and whether it has changes
        assert recorded.data.tags[tracking.GIT_COMMIT_TAG] == head.stdout.strip()
        assert recorded.data.tags[tracking.GIT_DIRTY_TAG] in ("true", "false")
    else:
        assert tracking.GIT_COMMIT_TAG not in recorded.data.tags
    assert recorded.info.start_time == run.start_time and recorded.info.run_name == "resnet18 · 12-02 00:14"

    run.rename("resnet18 · pets 3fa2c1 · 12-02 00:14")
    renamed = mlflow.MlflowClient(mlflow_uri).get_run(run.run_id)
    assert renamed.info.run_name == "resnet18 · pets 3fa2c1 · 12-02 00:14"
    assert renamed.data.tags["mlflow.runName"] == renamed.info.run_name


def test_a_run_logged_before_a_setting_existed_resumes_with_that_settings_default(mlflow_uri):
    run = tracking.start_run("lifecycle", "old", tags("flow-30"), recipe=RECIPE)
    newer = "data.max_archive_bytes"  # as if the run had been logged by a version without this setting
    tracking.log_params(run.run_id, {key: value for key, value in RECIPE.params().items() if key != newer})
    tracking.end_run(run.run_id, "KILLED")
    assert tracking.resumable_run(run.run_id, RECIPE).info.run_id == run.run_id
    with pytest.raises(tracking.ResumeRefusedError, match=rf"{newer} 20000000000 -> 5\b"):
        tracking.resumable_run(run.run_id, RECIPE.updated({"max_archive_bytes": 5}))
