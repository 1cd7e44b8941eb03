import inspect
import os
import subprocess
from pathlib import Path

from tasks import tracking


def test_default_store_is_the_sqlite_db_in_the_repository_mlflow_folder(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = Path(__file__).resolve().parents[2]
    assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}"
    assert tracking.artifact_location(tracking.tracking_uri()) == (repo / "mlflow" / "artifacts").as_uri()


def test_environment_overrides_the_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5055")
    assert tracking.tracking_uri() == "http://127.0.0.1:5055"
    assert tracking.artifact_location("http://127.0.0.1:5055") is None


def test_ensure_experiment_creates_it_once_with_artifacts_beside_the_db(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = tracking.ensure_experiment("pets")
    assert tracking.ensure_experiment("pets") == first
    experiment = mlflow.MlflowClient(tracking.tracking_uri()).get_experiment(first)
    assert experiment.artifact_location == (tmp_path / "artifacts").as_uri()


def test_an_unreachable_tracking_server_fails_within_seconds_naming_it():
    import time

    import pytest

    from tests.support.http_server import refused_port

    with refused_port() as port:
        uri = f"http://ci:s3cr3t@127.0.0.1:{port}"
        started = time.perf_counter()
        with pytest.raises(tracking.TrackingStoreUnavailableError) as caught:
            tracking.check_tracking_store(uri)
    assert time.perf_counter() - started < 10
    message = str(caught.value)
    assert f"http://ci:<redacted>@127.0.0.1:{port}" in message and "s3cr3t" not in message
    assert "MLFLOW_TRACKING_URI" in message


def test_a_server_that_answers_health_passes_and_one_that_does_not_is_named(tmp_path):
    import pytest

    from tests.support.http_server import serve_directory

    with serve_directory(tmp_path) as server:
        with pytest.raises(tracking.TrackingStoreUnavailableError, match="HTTP 404"):
            tracking.check_tracking_store(server.url(""))
        (tmp_path / "health").write_text("OK")
        tracking.check_tracking_store(server.url(""))  # no error: the server is up


def test_a_sqlite_store_in_a_missing_folder_is_refused_before_use(tmp_path, mlflow_uri):
    import pytest

    with pytest.raises(tracking.TrackingStoreUnavailableError, match="does not exist or is not writable"):
        tracking.check_tracking_store(f"sqlite:///{tmp_path}/missing/mlflow.db")
    tracking.check_tracking_store(mlflow_uri)  # the test's own store exists


def test_links_point_at_the_configured_ui_else_the_tracking_server_else_what_pets_ui_serves(monkeypatch):
    from flows.cli import ui
    from tasks.mlflow_ui import UI_URL_VARIABLE, local_ui_url

    monkeypatch.delenv(UI_URL_VARIABLE, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/store/mlflow.db")
    defaults = {name: parameter.default for name, parameter in inspect.signature(ui).parameters.items()}
    assert tracking.ui_url() == local_ui_url(defaults["host"], defaults["port"])  # what `pets ui` serves
    assert tracking.run_url({"experiment_id": "3", "run_id": "abc"}) == f"{tracking.ui_url()}/#/experiments/3/runs/abc"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ci:s3cr3t@mlflow.example:8443/prefix/")
    assert tracking.ui_url() == "https://mlflow.example:8443/prefix"  # the server's UI, without its credentials

    monkeypatch.setenv(UI_URL_VARIABLE, "http://127.0.0.1:5055/")
    assert tracking.ui_url() == "http://127.0.0.1:5055"
    url = tracking.compare_url("2", ["r1", "r2"])
    assert url == "http://127.0.0.1:5055/#/compare-runs?runs=%5B%22r1%22%2C%20%22r2%22%5D&experiments=%5B%222%22%5D"


def _git(folder, *arguments):
    identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
    environment = {"PATH": os.environ["PATH"], "HOME": str(folder), **identity}  # no user config of this machine
    done = subprocess.run(["git", "-C", str(folder), *arguments], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_run_records_the_commit_and_whether_tracked_files_changed_and_nothing_outside_a_checkout(tmp_path):
    from mlflow.utils import mlflow_tags

    assert (tracking.GIT_COMMIT_TAG, tracking.GIT_BRANCH_TAG, tracking.GIT_DIRTY_TAG) == (
        mlflow_tags.MLFLOW_GIT_COMMIT, mlflow_tags.MLFLOW_GIT_BRANCH, mlflow_tags.MLFLOW_GIT_DIRTY,
    )  # fmt: skip
    assert tracking.source_tags(tmp_path) == {}  # not a checkout
    checkout = tmp_path / "project"
    checkout.mkdir()
    _git(checkout, "init", "-q", "-b", "main")
    assert tracking.source_tags(checkout) == {}  # no commit yet
    (checkout / "train.py").write_text("print(1)\n")
    _git(checkout, "add", "train.py")
    _git(checkout, "commit", "-q", "-m", "first")
    commit = _git(checkout, "rev-parse", "HEAD")
    clean = {tracking.GIT_COMMIT_TAG: commit, tracking.GIT_BRANCH_TAG: "main", tracking.GIT_DIRTY_TAG: "false"}
    assert tracking.source_tags(checkout) == clean
    (checkout / "notes.txt").write_text("untracked\n")  # as MLflow's git context: untracked files are not a change
    assert tracking.source_tags(checkout) == clean
    (checkout / "train.py").write_text("print(2)\n")
    assert tracking.source_tags(checkout) == {**clean, tracking.GIT_DIRTY_TAG: "true"}
    # A folder inside the checkout is not a checkout of its own: the project must not take its parent's commit.
    (checkout / "inner").mkdir()
    assert tracking.source_tags(checkout / "inner") == {}
