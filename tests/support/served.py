"""A registered classifier without training: a random-init resnet18 over synthetic breeds, logged by log_classifier."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

PRESIZE, SIZE = 40, 32


@dataclass(frozen=True)
class RegisteredClassifier:
    """What `register_classifier` made: the store, the presized data it was built on, the export and the version."""

    uri: str
    manifest: pd.DataFrame
    vocab: tuple[str, ...]
    export: Path
    name: str
    version: str
    root: Path

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_classifier(root: Path, template_db: Path, name: str) -> RegisteredClassifier:
    """Log and register the classifier in a fresh sqlite store under root (MLFLOW_TRACKING_URI must point at it).

    The caller sets MLFLOW_TRACKING_URI to `sqlite:///<root>/mlflow/mlflow.db` first: log_classifier reads it.
    """
    import mlflow
    import torch

    from lib.serve.inference import export_classifier
    from lib.train.model import create_model
    from tasks import tracking
    from tests.support.pets import presized_pets

    uri = store_uri(root)
    Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template_db, uri.removeprefix("sqlite:///"))
    manifest, vocab = presized_pets(root, breeds=3, images_per_breed=8, presize=PRESIZE)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = create_model("resnet18", len(vocab), pretrained=False)
    export = export_classifier(root / "model.pth", net, arch="resnet18", vocab=vocab, size=SIZE, presize=PRESIZE)
    run = mlflow.MlflowClient(uri).create_run(tracking.ensure_experiment("served"))
    examples = manifest["path"].head(2).tolist()
    info = tracking.log_classifier.fn(run.info.run_id, str(export), examples, registered_model=name, step=1)
    return RegisteredClassifier(uri, manifest, tuple(vocab), export, name, str(info["model_version"]), root)


def store_uri(root: Path) -> str:
    """The sqlite store `register_classifier` fills under root."""
    return f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
