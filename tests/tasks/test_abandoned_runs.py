"""Runs whose process is gone, and processes racing for a new store (tasks/tracking.py), against real sqlite stores
and real processes: a run is never left RUNNING by a process that died, and a new store is created once."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from lib.common.processes import ProcessIdentity, start_ticks
from lib.recipe import Recipe
from tasks import tracking

pytestmark = pytest.mark.usefixtures("prefect_harness")

RECIPE = Recipe().updated({"experiment": "abandoned", "arch": "resnet18", "bs": 8})
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def identity_tags(owner: ProcessIdentity, heartbeat: float) -> dict[str, str]:
    return {
        tracking.HOST_TAG: owner.host,
        tracking.PID_TAG: str(owner.pid),
        tracking.PROCESS_START_TAG: owner.started,
        tracking.HEARTBEAT_TAG: str(int(heartbeat)),
    }


def exited_process() -> ProcessIdentity:
    """The identity of a real process of this host that has since exited (killed outright, as by the OOM killer)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    deadline = time.monotonic() + 10
    while (started := start_ticks(process.pid)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.kill()
    process.wait()
    return ProcessIdentity(host=socket.gethostname(), pid=process.pid, started=started)


def test_running_runs_whose_process_is_gone_are_failed_with_the_reason_and_live_ones_are_left(mlflow_uri):
    client = mlflow.MlflowClient(mlflow_uri)
    experiment = tracking.ensure_experiment("abandoned")
    now = time.time()
    me = ProcessIdentity.current()
    owners = {
        "killed here": identity_tags(exited_process(), now),
        "pid reused": identity_tags(ProcessIdentity(me.host, me.pid, started="1"), now),  # this PID, a later process
        "silent elsewhere": identity_tags(
            ProcessIdentity("gpu-node-7", 4242), now - 2 * tracking.HEARTBEAT_TIMEOUT_SECONDS
        ),
        "alive here": identity_tags(me, now - 2 * tracking.HEARTBEAT_TIMEOUT_SECONDS),  # its own host looks it up
        "beating elsewhere": identity_tags(ProcessIdentity("gpu-node-7", 4243), now),
        "not ours": {},
    }
    runs = {name: client.create_run(experiment, run_name=name, tags=tags).info.run_id for name, tags in owners.items()}
    finished = client.create_run(experiment, run_name="finished", tags=identity_tags(exited_process(), now))
    client.set_terminated(finished.info.run_id, "FINISHED")

    messages = tracking.fail_abandoned_runs()

    statuses = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert statuses == {
        "killed here": "FAILED", "pid reused": "FAILED", "silent elsewhere": "FAILED", "alive here": "RUNNING",
        "beating elsewhere": "RUNNING", "not ours": "RUNNING",
    }  # fmt: skip
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"
    assert len(messages) == 3 and all("\n" not in message for message in messages)
    for name in ("killed here", "pid reused", "silent elsewhere"):
        (message,) = [message for message in messages if runs[name] in message]
        assert f"`pets train --resume {runs[name]}`" in message and "marked FAILED" in message
        assert client.get_run(runs[name]).data.tags[tracking.FAILURE_TAG].startswith("abandoned: its process")
    assert (
        "has sent no heartbeat for 30 min" in client.get_run(runs["silent elsewhere"]).data.tags[tracking.FAILURE_TAG]
    )
    assert tracking.fail_abandoned_runs() == []  # each is told once


def test_a_run_records_the_process_training_it_and_a_live_one_is_never_resumed_twice(mlflow_uri):
    with tracking.training_run(RECIPE, "live", {tracking.FLOW_RUN_TAG: "flow-1"}) as run:
        tags = mlflow.MlflowClient(mlflow_uri).get_run(run.run_id).data.tags
        assert tags[tracking.PID_TAG] == str(os.getpid()) and tags[tracking.HOST_TAG] == socket.gethostname()
        assert tags[tracking.PROCESS_START_TAG] == start_ticks(os.getpid())
        assert abs(float(tags[tracking.HEARTBEAT_TAG]) - time.time()) < 60
        assert tracking.fail_abandoned_runs() == []  # this process is training it
        with pytest.raises(tracking.ResumeRefusedError, match=f"still being trained by process {os.getpid()}"):
            tracking.resumable_run(run.run_id)
    assert mlflow.MlflowClient(mlflow_uri).get_run(run.run_id).info.status == "FINISHED"


def test_the_heartbeat_is_refreshed_while_the_run_trains(mlflow_uri, monkeypatch):
    monkeypatch.setattr(tracking, "HEARTBEAT_SECONDS", 0.05)
    with tracking.training_run(RECIPE, "beating", {tracking.FLOW_RUN_TAG: "flow-2"}) as run:
        client = mlflow.MlflowClient(mlflow_uri)
        first = client.get_run(run.run_id).data.tags[tracking.HEARTBEAT_TAG]
        deadline = time.monotonic() + 10
        while client.get_run(run.run_id).data.tags[tracking.HEARTBEAT_TAG] == first:
            assert time.monotonic() < deadline, "the heartbeat never moved"
            time.sleep(0.1)


RACER = """
import sys, time
uri, start, name = sys.argv[1], float(sys.argv[2]), sys.argv[3]
from tasks import tracking
print("on time" if time.time() < start else "late")  # late: it would not have raced the others
while time.time() < start:
    time.sleep(0.001)
client = tracking._client()  # the first opening of the store by this process
experiment = tracking.ensure_experiment("race")
run = client.create_run(experiment, run_name=name)
client.set_terminated(run.info.run_id, "FINISHED")
"""


@pytest.mark.slow  # 20-40 s of real processes: CI runs it (make test-slow)
def test_four_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """MLflow 3.17 migrates a new store without a lock: four at once all failed here before `prepare_store`."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    environment = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(PROJECT_ROOT)}
    start = time.time() + 8  # every process has imported MLflow by then (2-4 s each on two busy CPUs)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, uri, str(start), f"racer-{index}"],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for index in range(4)
    ]
    outcomes = [racer.communicate(timeout=120) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0, 0, 0], "\n".join(err[-1500:] for _, err in outcomes)
    assert [out.strip() for out, _ in outcomes] == ["on time"] * 4
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(run.info.run_name for run in runs) == [f"racer-{index}" for index in range(4)]
