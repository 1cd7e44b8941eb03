"""The project's entry points: prefect.yaml deployments and `make ui`."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml
from prefect.flows import Flow, load_flow_from_entrypoint

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_entrypoint_is_a_flow():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert isinstance(flow, Flow), deployment["name"]
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_make_ui_serves_the_mlflow_ui_on_loopback(tmp_path):
    port = _free_port()
    command = ["make", "-s", "ui", f"UI_PORT={port}", f"MLFLOW_DIR={tmp_path}"]
    ui = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and ui.poll() is None and status != 200:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    status = response.status
            except OSError:
                time.sleep(0.5)
        assert status == 200, ui.stderr.read().decode() if ui.poll() is not None else "no answer in 120 s"
        assert (tmp_path / "mlflow.db").is_file()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # make, mlflow and its uvicorn worker share the session we started
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
