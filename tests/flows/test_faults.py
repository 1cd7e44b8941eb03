"""Faults during training: a stage process killed outright (preemption, the OOM killer), the flow run's own process
killed under a real worker, and Ctrl-C (once, twice, in the data stage and the LR finder).

Real processes and real signals: the training flow runs against a Prefect server (the test's, or one with a worker)
and an MLflow sqlite store, and the test finds the stage process the way `ps` would (its command line in /proc)
before signalling it.
"""

import contextlib
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
from lib.serve.inference import read_export
from lib.train.stages import fine_tune_stage, last_checkpoint
from tasks import tracking
from tests.flows.test_cli import invoke
from tests.flows.test_train_flow import TINY, task_runs, tiny
from tests.support.http_server import serve_directory
from tests.support.pets import pets_archive
from tests.support.processes import parent_pid, stage_process_ids, start_time

pytestmark = pytest.mark.usefixtures("prefect_harness")

FREEZE_EPOCHS, EPOCHS = TINY["freeze_epochs"], 3
WAIT_SECONDS = 180


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    return pets_archive(root, breeds=4, images_per_breed=10, max_side=96)


def wait_for_first_checkpoint(out_dir: Path, stage: str) -> Path:
    """Return the stage's last.pt as soon as the stage's first epoch has written it."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        found = list(out_dir.glob(f"*/{stage}/checkpoints/last.pt"))
        if found:
            return found[0]
        time.sleep(0.005)
    raise AssertionError(f"no {stage} checkpoint appeared under {out_dir} in {WAIT_SECONDS} s")


@pytest.mark.slow  # 20-40 s of real processes: CI runs it (make test-slow)
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


INTERRUPT_SECONDS = 5  # Ctrl-C ends the command this fast, its processes and the MLflow run included (issue 17)
TINY_OPTIONS = [
    "--arch", "resnet18", "--no-pretrained", "--presize", "48", "--size", "32", "--bs", "8", "--no-fp16",
    "--workers", "0", "--threads", "1", "--freeze-epochs", str(FREEZE_EPOCHS), "--no-baseline",
    "--experiment", "pets-test",
]  # fmt: skip
STOPPING = "Stopping (Ctrl-C again quits at once) ...\n"  # what the command says as the first Ctrl-C arrives


class PetsCommand:
    """`pets train` in a process group of its own, as a terminal's foreground job: Ctrl-C reaches every process in
    it. Runs against the temporary Prefect API the command starts itself, as on a user's machine."""

    def __init__(self, tmp_path: Path, mlflow_uri: str, *options: str):
        self.out_dir = (tmp_path / "runs").resolve()
        command = [sys.executable, "-m", "flows", "train", *TINY_OPTIONS, "--epochs", str(EPOCHS)]
        command += ["--out-dir", str(self.out_dir), "--cache-dir", str(tmp_path / "cache"), *options]
        environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
        environment["MLFLOW_TRACKING_URI"] = mlflow_uri
        self.process = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not any(text in line for line in self.lines):
            assert self.process.poll() is None, f"pets train ended before {text!r}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in {WAIT_SECONDS} s:\n{self.output[-3000:]}"
            time.sleep(0.02)

    def helpers(self) -> dict[int, str]:
        """The processes the command started (the temporary Prefect API, the stage process), with their start."""
        return {pid: start_time(pid) for pid in child_pids(self.process.pid)}

    def ctrl_c(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)

    def stop_with_ctrl_c(self) -> None:
        """Press Ctrl-C once: the command must exit 130 within INTERRUPT_SECONDS, its processes stopped on the way."""
        helpers = self.helpers()
        interrupted = time.monotonic()
        self.ctrl_c()
        code = self.wait(timeout=60)
        seconds = time.monotonic() - interrupted
        assert code == 130, self.output[-3000:]
        assert seconds < INTERRUPT_SECONDS, f"{seconds:.1f} s"
        wait_until_gone(helpers, 0.5)  # stopped by the command on its way out, not left to notice it is gone

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout=10)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def child_pids(parent: int) -> list[int]:
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and parent_pid(int(entry.name)) == parent
    ]


def wait_until_gone(processes: dict[int, str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while survivors := [pid for pid, started in processes.items() if start_time(pid) == started]:
        assert time.monotonic() < deadline, f"still running {seconds} s after the command: {survivors}"
        time.sleep(0.05)


@pytest.fixture
def pets_command(tmp_path, mlflow_uri):
    started = []

    def start(*options: str) -> PetsCommand:
        started.append(PetsCommand(tmp_path, mlflow_uri, *options))
        return started[-1]

    yield start
    for command in started:
        command.close()


def only_run(client):
    (run,) = client.search_runs([client.get_experiment_by_name("pets-test").experiment_id])
    return run


def test_ctrl_c_ends_the_command_within_seconds_marks_the_run_killed_and_says_how_to_resume(
    archive, mlflow_uri, pets_command
):
    pets = pets_command("--data-url", archive.as_uri(), "--base-lr", "1e-3")
    pets.wait_for_line("probe epoch 1/")  # the first epoch is checkpointed and logged; the next one trains
    checkpoint = wait_for_first_checkpoint(pets.out_dir, "probe")
    assert len(pets.helpers()) == 2 and stage_process_ids(pets.out_dir)  # the temporary Prefect API, the stage process
    pets.stop_with_ctrl_c()
    with pytest.raises(ProcessLookupError):
        os.killpg(pets.process.pid, 0)

    client = mlflow.MlflowClient(mlflow_uri)
    run = only_run(client)
    assert run.info.status == "KILLED"
    assert client.get_metric_history(run.info.run_id, "probe/valid_loss")  # what it had is kept
    assert client.search_registered_models() == []
    after = pets.output.split(STOPPING, 1)[1]
    assert "Traceback" not in after and "ConnectError" not in after and "Crash detected" not in after
    (told,) = [line for line in after.splitlines() if line.strip()]  # one line, after the one saying it stops
    assert told.startswith("Interrupted.") and f"`pets train --resume {run.info.run_id}`" in told

    # The checkpoint is usable: the run can be continued with the recipe it logged, and only with it.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["plan"]["kind"] == "fine_tune" and state["epochs_done"] >= 1
    assert last_checkpoint(checkpoint.parents[1]) == checkpoint
    refused = invoke("train", "--resume", run.info.run_id, "--epochs", str(EPOCHS + 1))
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert refused.output.count("Error:") == 1 and f"schedule.epochs {EPOCHS} -> {EPOCHS + 1}" in refused.output


@pytest.mark.slow  # 20-40 s of real processes: CI runs it (make test-slow)
def test_a_second_ctrl_c_quits_at_once_and_the_next_command_fails_the_run_it_left_then_resumes_it(
    archive, mlflow_uri, pets_command, caplog
):
    pets = pets_command("--data-url", archive.as_uri(), "--base-lr", "1e-3")
    pets.wait_for_line("probe epoch 1/")
    checkpoint = wait_for_first_checkpoint(pets.out_dir, "probe")
    helpers = pets.helpers()
    pets.ctrl_c()
    pets.wait_for_line(STOPPING)
    pets.ctrl_c()
    assert pets.wait(timeout=10) == 130
    assert "Interrupted again: quitting at once." in pets.output
    wait_until_gone(helpers, 5)  # each notices its parent is gone (within a second) and stops
    client = mlflow.MlflowClient(mlflow_uri)
    left = only_run(client)
    assert left.info.status == "RUNNING"  # nobody was left to end it: the next command does
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epochs_done"] >= 1

    resumed = invoke("train", "--resume", left.info.run_id, "--json")
    assert resumed.exit_code == 0, resumed.output
    told = [record.getMessage() for record in caplog.records if f"MLflow run {left.info.run_id}" in record.getMessage()]
    assert len(told) == 1 and "was RUNNING but its process" in told[0] and "is gone: marked FAILED" in told[0]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["run_id"] == left.info.run_id
    finished = only_run(client)
    assert finished.info.status == "FINISHED" and finished.data.tags["model_version"] == "1"
    assert tracking.FAILURE_TAG not in finished.data.tags  # taken back: the abandoned reason is gone
    steps = [point.step for point in client.get_metric_history(left.info.run_id, "probe/valid_loss")]
    assert sorted(steps) == list(range(FREEZE_EPOCHS + EPOCHS))  # each epoch once: the restored ones not again
    history = json.loads((checkpoint.parents[1] / "history.json").read_text())
    assert len(history) == FREEZE_EPOCHS + EPOCHS

    again = invoke("train", "--resume", left.info.run_id)
    assert again.exit_code == 2 and "is FINISHED, not interrupted" in again.output


@pytest.mark.slow
@pytest.mark.parametrize("during", ["download", "lr_find"])
def test_ctrl_c_during_the_data_stage_or_the_lr_finder_ends_the_command_within_seconds(
    archive, tmp_path, mlflow_uri, pets_command, during
):
    with contextlib.ExitStack() as stack:
        if during == "download":  # a server that has not answered yet: the command waits in the download
            server = stack.enter_context(serve_directory(archive.parent))
            server.delay_seconds = WAIT_SECONDS
            pets = pets_command("--data-url", server.url(archive.name), "--base-lr", "1e-3")
            deadline = time.monotonic() + WAIT_SECONDS
            while server.requests == 0:
                assert time.monotonic() < deadline and pets.process.poll() is None, pets.output[-3000:]
                time.sleep(0.02)
        else:
            pets = pets_command("--data-url", archive.as_uri())
            pets.wait_for_line("lr_find: sweeping learning rates")
        pets.stop_with_ctrl_c()
    run = only_run(mlflow.MlflowClient(mlflow_uri))
    assert run.info.status == "KILLED"
    after = pets.output.split(STOPPING, 1)[1]
    (told,) = [line for line in after.splitlines() if line.strip()]
    assert told.startswith("Interrupted.") and f"`pets train --resume {run.info.run_id}`" in told


@pytest.mark.slow
def test_a_command_whose_temporary_prefect_api_dies_ends_at_once_with_one_line(archive, mlflow_uri, pets_command):
    pets = pets_command("--data-url", archive.as_uri(), "--base-lr", "1e-3")
    pets.wait_for_line("probe epoch 1/")
    helpers = pets.helpers()
    (api,) = [pid for pid in helpers if "flows.prefect_api" in Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(api, signal.SIGKILL)  # the OOM killer's choice, say
    assert pets.wait(timeout=30) == 1, pets.output[-3000:]  # before: silent retries of the dead API for minutes
    (told,) = [line for line in pets.output.splitlines() if "Error:" in line]
    assert f"the temporary Prefect API (process {api}) died (killed by SIGKILL)" in told
    assert "Traceback" not in pets.output
    wait_until_gone(helpers, 5)  # the stage process stops when the command is gone
    run = only_run(mlflow.MlflowClient(mlflow_uri))
    assert run.info.status == "RUNNING"  # until the next command looks: its process is gone
    assert [run.info.run_id in message for message in tracking.fail_abandoned_runs()] == [True]


CONCURRENT_RUNS = 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_pets_train_started_at_once_on_new_stores_all_finish_with_their_own_model_versions(archive, tmp_path):
    """A new MLflow sqlite store and a new Prefect home, raced by four commands (each with its temporary API)."""
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    environment.update(MLFLOW_TRACKING_URI=uri, PREFECT_HOME=str(tmp_path / "prefect-home"))
    commands = []
    for index in range(CONCURRENT_RUNS):
        command = [sys.executable, "-m", "flows", "train", "--data-url", archive.as_uri(), *TINY_OPTIONS]
        command += ["--epochs", "1", "--base-lr", "1e-3"]
        command += ["--out-dir", str(tmp_path / f"runs-{index}"), "--cache-dir", str(tmp_path / "cache"), "--json"]
        commands.append(command)
    racers = [
        subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    try:
        outcomes = [racer.communicate(timeout=800) for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
    assert [racer.returncode for racer in racers] == [0] * CONCURRENT_RUNS, "\n".join(e[-2000:] for _, e in outcomes)
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outcomes]
    assert sorted(int(result["model_version"]) for result in results) == list(range(1, CONCURRENT_RUNS + 1))
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pets-test").experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(result["run_id"] for result in results)
    for run in runs:  # complete: finished, every epoch, the model
        assert run.info.status == "FINISHED" and run.data.metrics["error_rate"] >= 0
        steps = [point.step for point in client.get_metric_history(run.info.run_id, "probe/valid_loss")]
        assert sorted(steps) == list(range(FREEZE_EPOCHS + 1))
    versions = client.search_model_versions("name = 'pets-classifier'")
    assert sorted(version.run_id for version in versions) == sorted(run.info.run_id for run in runs)


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
        server.create_work_pools()
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
