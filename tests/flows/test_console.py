"""What `pets` prints when something is wrong: each user error once, as one line, and no telemetry.

Bad option values run through the real CLI in this process (they stop before any Prefect server or flow); a bad
label pattern and a diverging learning rate run `pets` as a real process, so every line it and its children print
is seen.
"""

import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from flows.console import TELEMETRY_OFF
from lib.common.errors import DEBUG_VARIABLE
from lib.data.synthetic import make_pets_dataset

ROOT = Path(__file__).resolve().parents[2]
# The tiny recipe of tests/flows/test_cli.py: random-init resnet18 at 32 px on the CPU, seconds per stage.
TINY = [
    "--arch", "resnet18", "--no-pretrained", "--presize", "48", "--size", "32", "--bs", "8", "--freeze-epochs", "1",
    "--epochs", "1", "--no-fp16", "--device", "cpu", "--workers", "0", "--experiment", "console",
]  # fmt: skip
PROCESS_SECONDS = 240


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "200", **(env or {})})


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    return path


BAD_VALUES = [
    (["--bs", "0"], "--bs"),
    (["--bs", "many"], "--bs"),
    (["--valid-pct", "1.5"], "--valid-pct"),
    (["--epochs", "0"], "--epochs"),
    (["--freeze-epochs", "-1"], "--freeze-epochs"),
    (["--min-scale", "0"], "--min-scale"),
    (["--workers", "-1"], "--workers"),
    (["--base-lr", "inf"], "--base-lr"),
    (["--base-lr", "nan"], "--base-lr"),
    (["--base-lr", "-1"], "--base-lr"),
    (["--base-lr", "0"], "--base-lr"),
    (["--lr-mult", "0"], "--lr-mult"),
    (["--presize", "32", "--size", "64"], "--size 64 is larger than --presize 32"),
    (["--arch", "nope"], "--arch"),
    (["--label-pattern", "("], "--label-pattern"),
    (["--label-pattern", "no-group"], "--label-pattern"),
    (["--sha256", "abc"], "--sha256"),
    (["--labels", "nope"], "--labels"),
    (["--labels", "csv"], "--labels csv needs --labels-csv FILE"),
    (["--max-unlabelled", "2"], "--max-unlabelled"),
    (["--valid-folders", ""], "--valid-folders"),
    (["--experiment", ""], "--experiment"),
    (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder"),
    (["--data-dir", "{file}"], "--data-dir"),
    (["--data-url", "file:///x.tgz", "--data-dir", "{tmp}"], "--data-url or --data-dir"),
    (["--out-dir", "{file}"], "--out-dir"),
    (["--cache-dir", "{file}/cache"], "--cache-dir"),
    (["--device", "cuda:99"], "--device cuda:99"),  # no machine has a hundredth GPU
    pytest.param(["--device", "cuda"], "--device cuda", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="")),
    pytest.param(
        ["--device", "mps"], "--device mps", marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="")
    ),
    (["--device", "gpu"], "--device gpu"),
    (["--no-such-option"], "--no-such-option"),
]


@pytest.mark.parametrize(
    ("options", "named"), BAD_VALUES, ids=lambda value: " ".join(value) if isinstance(value, list) else ""
)
def test_a_bad_value_is_one_error_line_naming_its_option_before_anything_starts(
    options, named, a_file, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)  # the default out-dir, ./outputs, must not appear either
    options = [option.format(file=a_file, tmp=tmp_path) for option in options]
    store = tmp_path / "mlflow"
    store.mkdir()

    result = invoke("train", *options, env={"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"})

    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: ") and named in line and result.stdout == ""
    assert not [record for record in caplog.records if record.name.startswith("prefect")]  # no server, no flow run
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mlflow", "notes.txt"] and not any(store.iterdir())


def test_a_malformed_recipe_file_is_one_line_naming_the_file_and_where(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {bs: 16\nschedule: [\n")

    result = invoke("train", "--recipe", recipe)

    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: {recipe} is not valid YAML at line 2")


def test_debug_shows_the_traceback_of_a_user_error(monkeypatch):
    monkeypatch.setenv(DEBUG_VARIABLE, "")  # restored when the test ends: `--debug` sets it for the stage processes

    result = invoke("--debug", "train", "--bs", "0")

    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "RecipeError" in result.stderr
    assert result.stderr.splitlines()[-1] == "Error: --bs: Input should be greater than or equal to 1"
    assert os.environ[DEBUG_VARIABLE] == "1"


def test_the_cli_turns_telemetry_off_for_its_children_unless_the_user_opted_in():
    probe = "import os, flows.cli; print([os.environ[name] for name in sorted(flows.console.TELEMETRY_OFF)])"
    environment = {key: value for key, value in os.environ.items() if key not in TELEMETRY_OFF}
    environment["MLFLOW_DISABLE_TELEMETRY"] = "false"  # the user's own choice is kept

    shown = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=environment, capture_output=True, text=True, check=True
    )

    assert shown.stdout.strip() == str(["true", "false", "false"])  # DO_NOT_TRACK, MLFLOW_..., PREFECT_SERVER_...


def pets(*args, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `pets` as a real process from the repository root (subprocess.run ends it, even on a timeout)."""
    command = [sys.executable, "-m", "flows", *(str(arg) for arg in args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=PROCESS_SECONDS)


@pytest.mark.slow  # a real `pets train` in a subprocess up to the labelling: CI runs it (make test-slow)
def test_a_pattern_that_matches_no_file_is_one_line_with_no_traceback_and_no_telemetry(tmp_path, mlflow_uri):
    images = make_pets_dataset(tmp_path / "pets", breeds=2, images_per_breed=4, max_side=96)
    # As a user starts it: none of the variables that turn telemetry off (this session sets them, and MLflow also
    # counts PYTEST_CURRENT_TEST as a test run), no Prefect server given (so `pets` starts its temporary API).
    unset = {*TELEMETRY_OFF, "PREFECT_API_URL", "PYTEST_CURRENT_TEST", "CI"}
    environment = {key: value for key, value in os.environ.items() if key not in unset}
    environment["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # the temporary server's database goes here

    done = pets(
        "train", "--data-dir", images, "--label-pattern", r"^zzz(\d+)", *TINY, "--out-dir", tmp_path / "out",
        "--cache-dir", tmp_path / "cache", env=environment,
    )  # fmt: skip

    assert done.returncode == 2, done.stderr[-3000:]
    assert "Starting a temporary Prefect API" in done.stderr  # the real flow ran, with the command's own API
    errors = [line for line in done.stderr.splitlines() if "Error:" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: 8 of 8 images (100%) got no label")
    assert "8 do not match the label pattern" in errors[0] and "--label-pattern" in errors[0]
    assert "Traceback" not in done.stderr + done.stdout and "LabelGateError" not in done.stderr
    assert "telemetry" not in done.stderr.lower()
    # Prefect 3.9 server/services/telemetry.py records its session before it sends the first heartbeat.
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as database:
        keys = [key for (key,) in database.execute("SELECT key FROM configuration")]
    assert "TELEMETRY_SESSION" not in keys
    (run,) = mlflow.MlflowClient(mlflow_uri).search_runs(
        [mlflow.MlflowClient(mlflow_uri).get_experiment_by_name("console").experiment_id]
    )
    assert run.info.status == "FAILED" and "do not match the label pattern" in run.data.tags["pets.failure"]


@pytest.mark.usefixtures("prefect_harness")
def test_a_diverging_learning_rate_stops_the_stage_with_one_line_and_keeps_the_good_checkpoints(tmp_path, mlflow_uri):
    from prefect.settings import PREFECT_API_URL

    images = make_pets_dataset(tmp_path / "pets", breeds=4, images_per_breed=10, max_side=96)
    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # this session's server: no start-up
    out_dir = tmp_path / "out"

    done = pets(
        "train", "--data-dir", images, *TINY, "--baseline-epochs", "1", "--base-lr", "1e6", "--out-dir", out_dir,
        "--cache-dir", tmp_path / "cache", env=environment,
    )  # fmt: skip

    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "Error:" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: The probe stage stopped: the "), errors
    assert "loss became" in errors[0] and "learning rate" in errors[0] and "--base-lr" in errors[0]
    assert "epoch 1/" in errors[0] and "--no-fp16" in errors[0]
    assert "Traceback" not in done.stderr and "NonFiniteLossError" not in done.stderr
    client = mlflow.MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("console").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["pets.failure"] == "NonFiniteLossError: " + errors[0].removeprefix("Error: ")
    # The baseline's last epoch is kept, and no checkpoint holds the diverged weights.
    checkpoints = sorted((out_dir / run.info.run_id).glob("*/checkpoints/last.pt"))
    assert [path.parents[1].name for path in checkpoints][:1] == ["baseline"]
    for path in checkpoints:
        weights = torch.load(path, map_location="cpu", weights_only=True)["model"]
        assert all(torch.isfinite(tensor).all() for tensor in weights.values() if tensor.is_floating_point()), path
    assert math.isfinite(float(run.data.metrics["baseline/valid_loss"]))


def test_an_unreachable_tracking_server_is_one_line_before_any_server_starts(tmp_path, caplog):
    from tests.support.http_server import refused_port

    images = make_pets_dataset(tmp_path / "pets", breeds=2, images_per_breed=4, max_side=96)
    with refused_port() as port:
        result = invoke("train", "--data-dir", images, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})

    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: The MLflow tracking server http://127.0.0.1:{port} is not reachable")
    assert not [record for record in caplog.records if record.name.startswith("prefect")]  # no server, no flow
