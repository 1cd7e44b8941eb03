"""The training stages' process, from the Prefect tasks' side: one per flow run, replaced when killed, and how a
stage's failure comes back from it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib.serve.inference import read_export
from lib.train.stages import serve
from lib.train.trainer import NonFiniteLossError
from tasks.training import StageFailedError, _rebuilt, run_stage_process, stage_process
from tests.support.pets import stage_inputs
from tests.support.processes import has_exited, is_reapable, stage_process_ids


def test_the_projects_and_pythons_errors_come_back_with_their_own_type_and_message():
    error = _rebuilt({"type": "lib.train.trainer.NonFiniteLossError", "message": "The training loss became nan"})
    assert type(error) is NonFiniteLossError and str(error) == "The training loss became nan"
    error = _rebuilt({"type": "builtins.ValueError", "message": "Lower --bs"})
    assert type(error) is ValueError and str(error) == "Lower --bs"


def test_other_errors_are_named_in_the_message_and_no_other_module_is_imported():
    import sys

    error = _rebuilt({"type": "torch.OutOfMemoryError", "message": "CUDA out of memory"})
    assert type(error) is StageFailedError and str(error) == "torch.OutOfMemoryError: CUDA out of memory"
    error = _rebuilt({"type": "antigravity.Fly", "message": "up"})  # a module the stage's output names is not run
    assert type(error) is StageFailedError and "antigravity" not in sys.modules


def test_a_user_error_whose_constructor_takes_more_comes_back_as_itself():
    from lib.common.errors import UserError
    from lib.train.weights import WeightsUnavailableError

    message = "Pretrained weights are not available: offline. Download it, or --no-pretrained."
    error = _rebuilt({"type": "lib.train.weights.WeightsUnavailableError", "message": message})

    assert type(error) is WeightsUnavailableError and isinstance(error, UserError) and str(error) == message


# -- the flow's stage process -----------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def request_for(tmp_path_factory):
    """Write a stage's request file under a runs folder, as the fine-tuning task does; return its path."""
    inputs = stage_inputs(tmp_path_factory.mktemp("pets"))

    def request(runs_dir: Path, stage: str, *, base_lr: float = 1e-3) -> Path:
        stage_dir = runs_dir / "run" / stage
        stage_dir.mkdir(parents=True)
        values = {
            **inputs, "stage_dir": str(stage_dir), "epochs": 1, "base_lr": base_lr, "freeze_epochs": 1, "lr_mult": 100,
        }  # fmt: skip
        path = stage_dir / "request.json"
        path.write_text(json.dumps(values))
        return path

    return request


def spawned(folder: Path) -> list[int]:
    """The stage processes under `folder`, once they show their command line (a process just started may not yet)."""
    deadline = time.monotonic() + 10
    while not (found := stage_process_ids(folder)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def test_one_stage_process_trains_every_stage_and_a_killed_one_is_replaced_by_an_equal_one(request_for, tmp_path):
    runs = tmp_path / "runs"
    epochs = []
    with stage_process(runs):
        (started,) = spawned(runs)  # started before the first stage is asked for
        baseline = run_stage_process(request_for(runs, "baseline", base_lr=2e-3), lambda row, step: None)
        probe = run_stage_process(request_for(runs, "probe"), lambda row, step: epochs.append(step))
        assert stage_process_ids(runs) == [started]  # the same process trained both, and waits for the next
        os.kill(started, signal.SIGKILL)  # killed while it waits (the OOM killer, a preempted host)
        while not is_reapable(started):  # a kill during the request's hand-over is a StageKilledError, retried
            time.sleep(0.05)
        final = run_stage_process(request_for(runs, "final"), lambda row, step: None)  # the probe's request again
        (replacement,) = spawned(runs)
        assert replacement != started
    assert stage_process_ids(runs) == [] and has_exited(replacement)  # stopped with the block

    assert epochs == [0, 1] and baseline["resumed_epochs"] == probe["resumed_epochs"] == 0
    # A stage trained in a process that trained another before gives what a fresh process gives.
    assert probe["valid_loss"] == final["valid_loss"] and probe["error_rate"] == final["error_rate"]
    reused = read_export(Path(probe["model"])).model.state_dict()
    for name, tensor in read_export(Path(final["model"])).model.state_dict().items():
        assert torch.equal(tensor, reused[name]), name


def test_leaving_the_block_with_an_error_stops_the_stage_process(tmp_path):
    with pytest.raises(RuntimeError, match="the data stage failed"), stage_process(tmp_path):
        (started,) = spawned(tmp_path)
        raise RuntimeError("the data stage failed")
    assert has_exited(started)


def test_a_stage_process_trains_only_requests_under_its_folder(request_for, tmp_path):
    sent = []
    elsewhere = request_for(tmp_path / "elsewhere", "probe")
    assert serve(tmp_path / "runs", sent.append, [f"{elsewhere}\n"]) == 1
    (message,) = sent
    assert message["error"]["type"] == "builtins.ValueError" and "is not under" in message["error"]["message"]
    assert not (elsewhere.parent / "checkpoints").exists()  # nothing was trained


def test_a_stage_process_whose_flow_died_while_it_started_trains_nothing(request_for, tmp_path):
    # The flow sends its first stage and dies (killed outright) while the stage process is still loading torch.
    runs = tmp_path / "runs"
    request = request_for(runs, "baseline")
    flow = (
        "import os, sys\nfrom tasks.training import StageProcess\n"
        "process = StageProcess(sys.argv[1])\nprocess.process.stdin.write(sys.argv[2] + '\\n')\n"
        "process.process.stdin.flush()\nprint(process.pid, flush=True)\nos._exit(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", flow, str(runs), str(request)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    orphan = int(done.stdout.strip())
    deadline = time.monotonic() + 120
    while not has_exited(orphan):
        assert time.monotonic() < deadline, "the stage process outlived its flow by 120 s"
        time.sleep(0.1)
    assert not (request.parent / "checkpoints").exists()  # it stopped before training a single epoch
