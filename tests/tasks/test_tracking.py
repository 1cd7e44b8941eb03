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
