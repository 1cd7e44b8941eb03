"""Where MLflow tracks runs. The only module of the project that talks to MLflow."""

from __future__ import annotations

import os
from pathlib import Path

# The repository's mlflow/ folder: sqlite store and artifacts, both git-ignored (MLflow 3.17 refuses ./mlruns).
MLFLOW_DIR = Path(__file__).resolve().parents[1] / "mlflow"


def tracking_uri() -> str:
    """Return $MLFLOW_TRACKING_URI, or the sqlite store in the repository's mlflow/ folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLFLOW_DIR / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Return the artifact root for experiments created in a sqlite store: artifacts/ beside the database.

    A tracking server chooses its own artifact root, so None is returned for any other URI.
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()


def ensure_experiment(name: str) -> str:
    """Create the experiment with an explicit artifact location if it is missing; return its id."""
    import mlflow

    uri = tracking_uri()
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))
