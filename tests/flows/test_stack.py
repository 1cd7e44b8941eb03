"""`pets stack up` / `pets stack down` for real: PostgreSQL from initdb, a Prefect server and an MLflow tracking server
on it, prefect.yaml deployed, a worker; a tiny training run through them, checked over Prefect's and MLflow's REST APIs
and in the databases themselves; then every recorded process is gone.

The stack runs as separate processes that outlive the `pets stack up` command, as in production; the test ends them
with `pets stack down` (by their recorded PIDs and start times) whatever happens in between.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from lib.common.processes import start_ticks
from tests.flows.test_deployments import SMOKE_PARAMETERS
from tests.support.prefect_server import FINAL_STATES, _free_port

ROOT = Path(__file__).resolve().parents[2]
DEMO_EXPERIMENT = "pets-demo"  # flows/defaults.py DEMO_SETTINGS: the smoke deployment's experiment and model
DEMO_MODEL = "pets-demo-classifier"


@pytest.fixture
def state_dir():
    # Not pytest's tmp_path: as root the cluster runs as the `postgres` account (lib/ops/stack.py), which cannot enter
    # pytest's folders (mode 0700); a folder of /tmp it may enter is made here instead.
    folder = Path(tempfile.mkdtemp(prefix="pets-stack-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _environment(state_dir: Path) -> dict[str, str]:
    """This environment without Prefect or MLflow targets, offline, with the pipeline's caches in the state folder."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        {
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PETS_HOME": str(state_dir / "pets-home"),
            "TORCH_HOME": str(state_dir / "torch-home"),
        }
    )
    return env


def _pets(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _logs(state_dir: Path) -> str:
    parts = []
    for log in sorted((state_dir / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-40:]
        parts.append(f"--- {log.name} ---\n" + "\n".join(lines))
    return "\n".join(parts)


def _wait_for_final_state(api_url: str, flow_run_id: str, timeout: float, state_dir: Path) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=30).json()
        if run["state_type"] in FINAL_STATES:
            return run
        assert time.monotonic() < deadline, f"flow run still {run['state_type']} after {timeout} s\n{_logs(state_dir)}"
        time.sleep(2)


def _mlflow(tracking_uri: str, method: str, path: str, **kwargs) -> dict:
    response = httpx.request(method, f"{tracking_uri}/api/2.0/{path}", timeout=30, **kwargs)
    assert response.status_code == 200, f"{method} {path} -> {response.status_code}: {response.text}"
    return response.json()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_stack_runs_a_tiny_training_deployment_on_postgresql_with_proxied_artifacts_and_down_stops_every_process(
    state_dir,
):
    env = _environment(state_dir)
    pg_port, prefect_port, mlflow_port = _free_port(), _free_port(), _free_port()
    ports = ["--pg-port", str(pg_port), "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    record = None
    try:
        up = _pets("stack", "up", "--state-dir", str(state_dir), *ports, env=env, timeout=900)
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}\n{_logs(state_dir)}"
        record = json.loads((state_dir / "pids.json").read_text())
        assert [entry["name"] for entry in record["processes"]] == [
            "postgres",
            "prefect-server",
            "mlflow-server",
            "worker",
        ]
        exports = dict(
            line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines() if line.startswith("export ")
        )
        api_url, tracking_uri = exports["PREFECT_API_URL"], exports["MLFLOW_TRACKING_URI"]
        assert (api_url, tracking_uri) == (f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}")

        smoke = httpx.get(f"{api_url}/deployments/name/demo-pets/smoke", timeout=30).json()
        parameters = {**SMOKE_PARAMETERS, "out_dir": str(state_dir / "run"), "cache_dir": str(state_dir / "pets-home")}
        flow_run = httpx.post(
            f"{api_url}/deployments/{smoke['id']}/create_flow_run", json={"parameters": parameters}, timeout=30
        ).json()
        final = _wait_for_final_state(api_url, flow_run["id"], 10 * 60, state_dir)
        assert final["state_type"] == "COMPLETED", f"{final['state']}\n{_logs(state_dir)}"

        experiment = _mlflow(
            tracking_uri, "GET", "mlflow/experiments/get-by-name", params={"experiment_name": DEMO_EXPERIMENT}
        )
        found = _mlflow(
            tracking_uri, "POST", "mlflow/runs/search",
            json={"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 100},
        )["runs"]  # fmt: skip
        runs = {run["info"]["run_id"]: run["info"] for run in found}
        assert runs and all(info["status"] == "FINISHED" for info in runs.values()), runs
        # Proxied artifacts: the server stores them, the runs only know the mlflow-artifacts: scheme.
        assert all(info["artifact_uri"].startswith("mlflow-artifacts:") for info in runs.values()), runs
        listed = {
            run_id: _mlflow(tracking_uri, "GET", "mlflow/artifacts/list", params={"run_id": run_id}).get("files", [])
            for run_id in runs
        }
        assert any(listed.values()), listed
        stored = [path for path in (state_dir / "artifacts").rglob("*") if path.is_file()]
        assert stored, "nothing under the server's --artifacts-destination"

        model = _mlflow(tracking_uri, "GET", "mlflow/registered-models/get", params={"name": DEMO_MODEL})
        versions = model["registered_model"].get("latest_versions", [])
        assert versions and versions[0]["run_id"] in runs, model

        # Both servers keep their state in the stack's PostgreSQL, not in a file of their own.
        server = f"postgresql://pets@127.0.0.1:{pg_port}"
        with psycopg.connect(f"{server}/prefect") as connection:
            (state,) = connection.execute("SELECT state_type FROM flow_run WHERE id = %s", (flow_run["id"],)).fetchone()
        assert state == "COMPLETED"
        with psycopg.connect(f"{server}/mlflow") as connection:
            stored_runs = {row[0] for row in connection.execute("SELECT run_uuid FROM runs WHERE status = 'FINISHED'")}
        assert set(runs) <= stored_runs
    finally:
        down = _pets("stack", "down", "--state-dir", str(state_dir), env=env, timeout=300)
    assert down.returncode == 0, f"{down.stdout}\n{down.stderr}"
    left = [entry for entry in record["processes"] if start_ticks(entry["pid"]) == entry["started"]]
    assert not left, f"still running after `pets stack down`: {left}\n{down.stdout}"
    assert not (state_dir / "pids.json").exists()
    again = _pets("stack", "down", "--state-dir", str(state_dir), env=env, timeout=120)
    assert again.returncode == 0 and "nothing to stop" in again.stdout, again.stdout + again.stderr


@pytest.mark.timeout(120)
def test_stack_up_against_a_postgresql_url_that_does_not_answer_is_one_line_naming_it_and_starts_nothing(state_dir):
    url = f"postgresql://127.0.0.1:{_free_port()}/x"  # a port nothing listens on
    env = _environment(state_dir)
    up = _pets("stack", "up", "--state-dir", str(state_dir / "stack"), "--pg-url", url, env=env, timeout=90)
    assert up.returncode == 2, up.stdout + up.stderr
    lines = up.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: PostgreSQL at {url} does not answer"), up.stderr
    assert "Traceback" not in up.stderr
    assert not (state_dir / "stack").exists()  # checked before anything was made or started
    status = _pets("stack", "status", "--state-dir", str(state_dir / "stack"), env=env, timeout=60)
    assert status.returncode == 0 and "No stack recorded" in status.stdout, status.stdout + status.stderr


@pytest.mark.timeout(60)
def test_down_stops_a_recorded_process_and_spares_one_whose_pid_now_names_another_process(state_dir):
    from lib.ops.stack import down

    recorded, reused = (subprocess.Popen(["sleep", "120"], start_new_session=True) for _ in range(2))
    try:
        record = {
            "postgres": {"url": None, "local": False},
            "processes": [
                {"name": "worker", "pid": recorded.pid, "started": start_ticks(recorded.pid), "log": ""},
                # A start time that is not the live process's: the recorded one ended and its PID was reused.
                {"name": "mlflow-server", "pid": reused.pid, "started": "1", "log": ""},
            ],
        }
        (state_dir / "pids.json").write_text(json.dumps(record))
        messages = down(state_dir)
        assert recorded.wait(timeout=30) == -signal.SIGTERM
        assert reused.poll() is None, "down signalled a process it never started"
        assert messages == [
            f"mlflow-server (PID {reused.pid}) had stopped already",
            f"worker (PID {recorded.pid}) stopped",
        ]
        assert down(state_dir) == [f"No stack recorded in {state_dir.resolve()}: nothing to stop."]
    finally:
        for process in (recorded, reused):
            process.kill()
            process.wait()
