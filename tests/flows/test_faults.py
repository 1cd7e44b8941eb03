"""Faults during training: a stage process killed outright (preemption, the OOM killer), the flow run's own process
killed under a real worker, and Ctrl-C.

Real processes and real signals: the training flow runs against a Prefect server (the test's, or one with a worker)
and an MLflow sqlite store, and the test finds the stage process the way `ps` would (its command line in /proc)
before signalling it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from flows.train import train
from lib.data.synthetic import make_pets_dataset, pack_tgz
from lib.serve.inference import read_export
from lib.train.stages import fine_tune_stage, last_checkpoint
from tests.flows.test_cli import invoke
from tests.flows.test_train_flow import TINY, task_runs, tiny
from tests.support.processes import parent_pid, stage_process_ids

pytestmark = pytest.mark.usefixtures("prefect_harness")

FREEZE_EPOCHS, EPOCHS = TINY["freeze_epochs"], 3
WAIT_SECONDS = 180


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    images = make_pets_dataset(root / "pets", breeds=4, images_per_breed=10, max_side=96)
    return pack_tgz(images, root / "served" / "pets.tgz")


def wait_for_first_checkpoint(out_dir: Path, stage: str) -> Path:
    """Return the stage's last.pt as soon as the stage's first epoch has written it."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        found = list(out_dir.glob(f"*/{stage}/checkpoints/last.pt"))
        if found:
            return found[0]
        time.sleep(0.005)
    raise AssertionError(f"no {stage} checkpoint appeared under {out_dir} in {WAIT_SECONDS} s")


def test_a_stage_killed_mid_training_is_retried_by_prefect_and_resumes_to_the_uninterrupted_model(
    archive, tmp_path, mlflow_uri, caplog
):
    out_dir = (tmp_path / "runs").resolve()
    kill = {}

    def preempt_the_probe() -> None:
        checkpoint = wait_for_first_checkpoint(out_dir, "probe")
        (pid,) = stage_process_ids(out_dir)
        os.kill(pid, signal.SIGSTOP)  # hold it where it is, so the epoch it was training stays unfinished
        kill["epochs_done"] = len(torch.load(checkpoint, map_location="cpu", weights_only=True)["history"])
        kill["checkpoint"] = checkpoint
        os.kill(pid, signal.SIGKILL)
        kill["pid"] = pid

    killer = threading.Thread(target=preempt_the_probe, daemon=True)
    killer.start()
    recipe = tiny(
        data_url=archive.as_uri(), epochs=EPOCHS, base_lr=1e-3, baseline=False, retrain=False, out_dir=str(out_dir),
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    state = train(recipe, return_state=True)
    killer.join(timeout=WAIT_SECONDS)
    assert state.is_completed(), state.message
    result = state.result()
    assert kill["pid"] and kill["epochs_done"] == FREEZE_EPOCHS  # killed in the first unfrozen epoch
    assert kill["pid"] not in stage_process_ids(out_dir)

    # Prefect retried the task: one task run, two attempts, completed.
    (probe,) = [run for run in task_runs(state) if run.name == "fine-tune-probe"]
    assert probe.state.is_completed() and probe.run_count == 2
    assert "(probe stage) was killed by SIGKILL" in caplog.text and "Retry 1/2" in caplog.text
    assert f"probe: resumed after {FREEZE_EPOCHS} complete epochs" in caplog.text

    # One MLflow run, FINISHED, each epoch logged once at its step (the killed epoch only by the retry).
    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pets-test").experiment_id])
    assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
    steps = [point.step for point in client.get_metric_history(run.info.run_id, "probe/valid_loss")]
    assert sorted(steps) == list(range(FREEZE_EPOCHS + EPOCHS))

    # The model equals an uninterrupted run of the same stage (same request, a fresh folder, no checkpoint).
    stage_dir = kill["checkpoint"].parents[1]
    request = json.loads((stage_dir / "request.json").read_text())
    reference = fine_tune_stage({**request, "stage_dir": str(tmp_path / "uninterrupted")})
    assert reference["resumed_epochs"] == 0
    resumed_model = read_export(stage_dir / "model.pth").model.state_dict()
    reference_model = read_export(Path(reference["model"])).model.state_dict()
    for name, tensor in reference_model.items():
        torch.testing.assert_close(resumed_model[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    history = json.loads((stage_dir / "history.json").read_text())
    assert [row["valid_loss"] for row in history] == pytest.approx(
        [row["valid_loss"] for row in json.loads(Path(reference["history"]).read_text())], rel=1e-5
    )


def test_ctrl_c_stops_every_process_marks_the_run_killed_and_leaves_a_resumable_checkpoint(
    archive, tmp_path, mlflow_uri
):
    from prefect.settings import PREFECT_API_URL

    out_dir = (tmp_path / "runs").resolve()
    command = [sys.executable, "-m", "flows", "train", "--data-url", archive.as_uri(), "--arch", "resnet18"]
    command += ["--no-pretrained", "--presize", "48", "--size", "32", "--bs", "8", "--no-fp16", "--workers", "0"]
    command += ["--freeze-epochs", str(FREEZE_EPOCHS), "--epochs", str(EPOCHS), "--base-lr", "1e-3"]
    command += ["--no-baseline", "--experiment", "pets-test", "--out-dir", str(out_dir)]
    command += ["--cache-dir", str(tmp_path / "cache")]
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": mlflow_uri}
    # Its own process group, like a terminal's foreground job: Ctrl-C sends SIGINT to every process in it.
    pets = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, start_new_session=True)
    try:
        checkpoint = wait_for_first_checkpoint(out_dir, "probe")
        client = mlflow.MlflowClient(mlflow_uri)
        deadline = time.monotonic() + WAIT_SECONDS
        while not client.search_runs([client.get_experiment_by_name("pets-test").experiment_id])[0].data.metrics:
            assert time.monotonic() < deadline, "the first probe epoch never reached MLflow"
            time.sleep(0.05)
        assert stage_process_ids(out_dir)  # the stage process is training the next epoch
        os.killpg(pets.pid, signal.SIGINT)
        _, errors = pets.communicate(timeout=120)
    finally:
        if pets.poll() is None:
            os.killpg(pets.pid, signal.SIGKILL)
            pets.wait()
    assert pets.returncode != 0, errors.decode(errors="replace")[-2000:]
    with pytest.raises(ProcessLookupError):
        os.killpg(pets.pid, 0)  # nothing of the group is left running
    assert stage_process_ids(out_dir) == []

    (run,) = client.search_runs([client.get_experiment_by_name("pets-test").experiment_id])
    assert run.info.status == "KILLED"
    assert client.get_metric_history(run.info.run_id, "probe/valid_loss")  # what it had is kept
    assert client.search_registered_models() == []

    # The checkpoint is usable: `pets train --resume` continues the run from it, with the recipe the run logged.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["plan"]["kind"] == "fine_tune" and state["epochs_done"] >= 1
    assert last_checkpoint(checkpoint.parents[1]) == checkpoint
    refused = invoke("train", "--resume", run.info.run_id, "--epochs", str(EPOCHS + 1))
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert refused.output.count("Error:") == 1 and f"schedule.epochs {EPOCHS} -> {EPOCHS + 1}" in refused.output

    resumed = invoke("train", "--resume", run.info.run_id, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["run_id"] == run.info.run_id
    (finished,) = client.search_runs([client.get_experiment_by_name("pets-test").experiment_id])
    assert finished.info.status == "FINISHED" and finished.data.tags["model_version"] == "1"
    steps = [point.step for point in client.get_metric_history(run.info.run_id, "probe/valid_loss")]
    assert sorted(steps) == list(range(FREEZE_EPOCHS + EPOCHS))  # each epoch once: the restored ones not again
    history = json.loads((checkpoint.parents[1] / "history.json").read_text())
    assert len(history) == FREEZE_EPOCHS + EPOCHS

    again = invoke("train", "--resume", run.info.run_id)
    assert again.exit_code == 2 and "is FINISHED, not interrupted" in again.output


def worker_done_with_crash(log: Path) -> bool:
    """The worker's own handling of the crashed process has ended (it logs this last, after the on_crashed hooks)."""
    last_line = "prefect.flow_runs.worker - Check whether the flow run exceeded its memory"
    return last_line in log.read_text(errors="replace")


def wait_until(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.2)
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_deployment_run_whose_process_is_killed_crashes_fails_its_mlflow_run_and_prefect_retry_resumes_it(
    archive, tmp_path, mlflow_uri
):
    """The flow run's own process is SIGKILLed under a real worker (the host's OOM killer, a lost machine)."""
    from tests.support.prefect_server import prefect_server

    out_dir = (tmp_path / "runs").resolve()
    worker_env = {
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PETS_HOME": str(tmp_path / "pets-home"),
        "TORCH_HOME": str(tmp_path / "torch-home"),
    }
    recipe = tiny(
        data_url=archive.as_uri(), epochs=EPOCHS, base_lr=1e-3, baseline=False, retrain=False, out_dir=str(out_dir),
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    parameters = {"recipe": recipe.model_dump(mode="json")}
    client = mlflow.MlflowClient(mlflow_uri)

    def mlflow_runs():
        experiment = client.get_experiment_by_name("pets-test")
        return client.search_runs([experiment.experiment_id]) if experiment else []

    with prefect_server(tmp_path / "prefect") as server:
        for pool in ("gpu", "cpu"):
            server.cli("work-pool", "create", pool, "--type", "process", "--overwrite")
        server.cli("--no-prompt", "deploy", "--all")
        (deployment,) = server.post("/deployments/filter", {"deployments": {"name": {"any_": ["train-resnet50"]}}})
        server.start_worker("gpu", work_queue="training", extra_env=worker_env)
        flow_run = server.post(f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})

        wait_for_first_checkpoint(out_dir, "probe")
        (stage_pid,) = stage_process_ids(out_dir)
        flow_run_pid = parent_pid(stage_pid)
        os.kill(flow_run_pid, signal.SIGKILL)

        crashed = server.wait_for_final_state(flow_run["id"], timeout=120)
        assert crashed["state_type"] == "CRASHED", f"{crashed['state']}\n{server.diagnostics()}"
        wait_until(lambda: not stage_process_ids(out_dir), "the stage process dying with its parent", 10)
        # The worker ran the flow's on_crashed hook: the MLflow run is not left RUNNING.
        (run,) = wait_until(lambda: [r for r in mlflow_runs() if r.info.status == "FAILED"], "the run FAILED")
        checkpoint = last_checkpoint(out_dir / run.info.run_id / "probe")
        epochs_done = len(torch.load(checkpoint, map_location="cpu", weights_only=True)["history"])
        assert 1 <= epochs_done < FREEZE_EPOCHS + EPOCHS

        # When the worker is done with the dead process (after the hooks) it proposes Crashed once more: a retry
        # scheduled before then is overwritten (seen with Prefect 3.9.1), so retry after it, as a user would.
        (worker,) = server.workers
        wait_until(lambda: worker_done_with_crash(worker.log), "the worker's end of the crashed run", 60)
        server.cli("flow-run", "retry", flow_run["id"])  # Prefect's own retry: same flow run, scheduled again
        final = server.wait_for_final_state(flow_run["id"], timeout=300)
        assert final["state_type"] == "COMPLETED", f"{final['state']}\n{server.diagnostics()}"
        assert final["run_count"] == 2
        logs = server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}})

    # One MLflow run for the flow run: the same one, resumed and FINISHED; every probe epoch logged once.
    (resumed,) = mlflow_runs()
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    steps = [point.step for point in client.get_metric_history(run.info.run_id, "probe/valid_loss")]
    assert sorted(steps) == list(range(FREEZE_EPOCHS + EPOCHS))
    assert resumed.data.tags["model_version"] == "1"
    messages = "\n".join(entry["message"] for entry in logs)
    assert f"probe: resumed after {epochs_done} complete epochs" in messages
