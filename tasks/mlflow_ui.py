"""Where the MLflow UI is: `pets ui` serves it on UI_HOST:UI_PORT, and every link to a run points at `ui_url()`;
`pets serve` serves models on UI_HOST:SERVE_PORT.

A deployment setting, not part of the recipe: the address a person opens runs at changes nothing a run computes (and
one run can be opened from several places, e.g. through a tunnel), so it is an environment variable beside
MLFLOW_TRACKING_URI rather than a recipe field that MLflow would record and `--resume` would compare. Standard
library only, so `pets --help` reads the defaults without loading MLflow.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

UI_HOST = "127.0.0.1"  # loopback only: the UI has no authentication (MLflow 3.17: only with --app-name basic-auth)
UI_PORT = 5000  # MLflow's default port (`mlflow ui --port`, MLflow 3.17)
UI_URL_VARIABLE = "PETS_MLFLOW_UI_URL"  # e.g. http://mlflow.internal:5000 or http://127.0.0.1:5055
# `pets serve` (mlflow models serve) listens beside the UI: MLflow's default port 5000 is the UI's here.
SERVE_PORT = 5001


def local_ui_url(host: str = UI_HOST, port: int = UI_PORT) -> str:
    """The address `pets ui --host HOST --port PORT` serves."""
    return f"http://{host}:{port}"


def ui_url(tracking_uri: str) -> str:
    """Return the MLflow UI's address: $PETS_MLFLOW_UI_URL when set, else the tracking server when the tracking URI
    is one (a tracking server serves its UI at its own address), else what `pets ui` serves by default.

    Credentials in a tracking URI (`https://user:token@host`) never end up in a printed or stored link.
    """
    configured = os.environ.get(UI_URL_VARIABLE, "").strip()
    if configured:
        return configured.rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return local_ui_url()
