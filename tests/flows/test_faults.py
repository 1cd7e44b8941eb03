"""Faults during training: a stage process killed outright (preemption, the OOM killer) and Ctrl-C.

Real processes and real signals: the training flow runs against the test's Prefect server and MLflow sqlite store,
and the test finds the stage process the way `ps` would (its command line in /proc) before signalling it.
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
from lib.inference import read_export
from lib.stages import fine_tune_stage, last_checkpoint
from lib.synthetic import make_pets_dataset, pack_tgz
from tests.flows.test_train_flow import TINY, task_runs

pytestmark = pytest.mark.usefixtures("prefect_harness")

FREEZE_EPOCHS, EPOCHS = TINY["freeze_epochs"], 3
WAIT_SECONDS = 180


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    images = make_pets_dataset(root / "pets", breeds=4, images_per_breed=10, max_side=96)
    return pack_tgz(images, root / "served" / "pets.tgz")


def stage_process_ids(out_dir: Path) -> list[int]:
    """PIDs of the `python -m lib.stages` processes training under out_dir, read from /proc as `ps` does."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended while we looked
            continue
        if "lib.stages" in arguments and any(argument.startswith(str(out_dir)) for argument in arguments):
            found.append(int(entry.name))
    return found


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
    state = train(
        **TINY, data_url=archive.as_uri(), epochs=EPOCHS, base_lr=1e-3, baseline=False,
        retrain=False, out_dir=str(out_dir), cache_dir=str(tmp_path / "cache"), return_state=True,
    )  # fmt: skip
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

    # The checkpoint is usable: the stage's own request resumes from it and finishes.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["plan"]["kind"] == "fine_tune" and state["epochs_done"] >= 1
    stage_dir = checkpoint.parents[1]
    assert last_checkpoint(stage_dir) == checkpoint
    finished = fine_tune_stage(json.loads((stage_dir / "request.json").read_text()))
    assert 0 < finished["resumed_epochs"] < FREEZE_EPOCHS + EPOCHS
    assert len(json.loads(Path(finished["history"]).read_text())) == FREEZE_EPOCHS + EPOCHS
