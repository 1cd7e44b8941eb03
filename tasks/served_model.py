"""The registered model's code, as MLflow loads it: the pyfunc serving `lib/serve/contract.py` (models-from-code).

`tasks.tracking.log_classifier` logs this file as the model (MLflow 3.17 "Models From Code": the file calls
`mlflow.models.set_model`), with the network as a pt2 artifact (torch.export, pickle-free) and the contract's
modules as code paths. MLflow runs it wherever the model is loaded, so it imports MLflow, torch and those modules
alone, never the rest of the project.
"""

from __future__ import annotations

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from lib.serve.contract import DEFAULT_TOP_K, PictureClassifier, RequestError

NETWORK_ARTIFACT = "network"  # the pt2 program: uint8 N x presize x presize x 3 pictures in, logits out


class ServedClassifier(PythonModel):
    """Encoded images in; label, probability and top-k classes per image out (lib/serve/contract.py)."""

    def load_context(self, context) -> None:
        program = torch.export.load(context.artifacts[NETWORK_ARTIFACT])
        config = context.model_config
        self.classifier = PictureClassifier(
            network=program.module(), vocab=tuple(config["vocab"]), presize=int(config["presize"])
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        try:
            return self.classifier.predict(
                model_input,
                top_k=params.get("top_k", DEFAULT_TOP_K),
                probabilities=bool(params.get("probabilities", False)),
            )
        except RequestError as error:  # MLflow's scoring server answers an MlflowException with its message, HTTP 400
            raise MlflowException.invalid_parameter_value(str(error)) from None


mlflow.models.set_model(ServedClassifier())
