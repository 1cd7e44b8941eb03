"""`pets demo` (what `make demo` runs) end to end, twice at once in two environments that make torch compute
differently, the way two machines would: the same numbers, the best epoch's choice in the output, one line per
epoch."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from flows.defaults import DEMO_EPOCHS, DEMO_EXPERIMENT, DEMO_SETTINGS

pytestmark = pytest.mark.usefixtures("prefect_harness")

ROOT = Path(__file__).resolve().parents[2]
# What a machine changes about torch's arithmetic: its core count (torch's default thread count) and its instruction
# set (an AVX2-only CPU, as ATen and MKL would see one; oneDNN the demo caps itself).
MACHINES = {
    "one-core": {"OMP_NUM_THREADS": "1"},
    "two-cores-avx2": {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
DEMO_SECONDS = 900  # about 3 minutes each on two busy cores, side by side (one thread each)


def start_demo(folder: Path, machine: dict[str, str], template_db: Path) -> subprocess.Popen:
    """Start `python -m flows demo` with its own MLflow store and cache, its output in a file (not a terminal)."""
    from prefect.settings import PREFECT_API_URL

    folder.mkdir()
    shutil.copy(template_db, folder / "mlflow.db")
    environment = {
        **os.environ,
        **machine,
        "PREFECT_API_URL": PREFECT_API_URL.value(),  # the session's server: no temporary one to start
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
    }
    with (folder / "output.txt").open("w") as output:
        command = [sys.executable, "-m", "flows", "demo", "--out-dir", str(folder / "demo")]
        return subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.mark.slow
@pytest.mark.timeout(DEMO_SECONDS + 120)
def test_the_demo_gives_the_same_result_on_two_machines_and_says_what_its_best_epoch_decided(
    tmp_path, _mlflow_template_db
):
    demos = {name: start_demo(tmp_path / name, machine, _mlflow_template_db) for name, machine in MACHINES.items()}
    try:
        for demo in demos.values():
            demo.wait(timeout=DEMO_SECONDS)
    finally:
        for demo in demos.values():
            if demo.poll() is None:
                os.killpg(demo.pid, 9)  # the flow and its stage process, started in the demo's own session
                demo.wait()
    outputs = {name: (tmp_path / name / "output.txt").read_text() for name in MACHINES}
    for name, demo in demos.items():
        assert demo.returncode == 0, outputs[name][-3000:]

    runs = {}
    for name in MACHINES:
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        (runs[name],) = client.search_runs([client.get_experiment_by_name(DEMO_EXPERIMENT).experiment_id])
    metrics = {name: run.data.metrics for name, run in runs.items()}
    first, second = metrics.values()
    assert round(first["error_rate"], 3) == round(second["error_rate"], 3), metrics
    assert first["base_lr"] == second["base_lr"] and first["best_epoch"] == second["best_epoch"]  # the LR finder too

    best = int(first["best_epoch"])
    # Which branch runs depends on the CPU family's numbers (README, "The same numbers on every machine"): an AMD
    # EPYC's best epoch was the 5th of 8 (retrained), an Intel Xeon's the 8th (the probe is the final model).
    retrained = best < DEMO_EPOCHS
    assert first["epochs_trained"] == (best if retrained else DEMO_EPOCHS)
    for name, output in outputs.items():
        assert "\r" not in output, name  # no progress bar redrawn into a file
        told = f"after {best} of {DEMO_EPOCHS} epochs: retraining from scratch for {best}."  # the flow's log
        assert (told in output) == retrained, name
        final = f"retrained from scratch for {best} epochs" if retrained else "the probe is the final model"
        assert f"best epoch {best} of {DEMO_EPOCHS}, so {final}" in output, name  # the CLI's
        stages = {"baseline": 1 + DEMO_SETTINGS["baseline_epochs"], "probe": 1 + DEMO_EPOCHS}
        if retrained:
            stages["final"] = 1 + best
        for stage, epochs in stages.items():  # one line per epoch, from the flow's log, in the terminal
            counts = [len(re.findall(rf" - {stage} epoch {step}/{epochs} \(", output)) for step in range(1, epochs + 1)]
            assert counts == [1] * epochs, (name, stage, counts)
        assert not re.search(r"^\s*(frozen|unfrozen)\s+\d", output, re.MULTILINE), name  # no stage-process table row
        assert "MLflow run 'resnet18 · synthetic-pets-" in output and runs[name].info.run_name in output
