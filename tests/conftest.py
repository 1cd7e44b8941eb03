"""Test-session settings: offline, telemetry off, Prefect and MLflow state in temporary folders.

The environment is set before anything imports prefect or mlflow, because both read parts of it at import time
(Prefect 3.9 builds its settings from the environment when
`prefect` is imported; MLflow 3.17 decides on telemetry at import time).
"""

import os
import tempfile
from pathlib import Path

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="pets-tests-"))
os.environ.update(
    {
        "PREFECT_HOME": str(_SESSION_TMP / "prefect-home"),
        # Persisted task results would otherwise survive across pytest sessions (Prefect 3.9 results settings).
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_SESSION_TMP / "prefect-results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PETS_HOME": str(_SESSION_TMP / "pets-home"),
        # Pretrained weights: never read or write the user's torch cache from tests.
        "TORCH_HOME": str(_SESSION_TMP / "torch-home"),
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
)
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """Start one temporary Prefect API server for the whole session (startup costs about 10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory):
    """Migrate one empty MLflow sqlite store per session (2-7 s, measured here); tests copy it."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch, _mlflow_template_db):
    """Point tracking at a fresh sqlite store in tmp_path (artifacts beside it) for one test; return its URI."""
    import shutil

    import mlflow

    store = tmp_path / "mlflow"
    store.mkdir()
    shutil.copy(_mlflow_template_db, store / "mlflow.db")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    while mlflow.active_run():  # never leak a run into the next test
        mlflow.end_run(status="KILLED")
    mlflow.set_tracking_uri(None)
