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
