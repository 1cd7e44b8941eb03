"""Fixed cost of a tiny `pets train`: its wall time against the training inside it, and where the rest goes.

Runs `pets train` as a user would, in a subprocess (the CLI, no PREFECT_API_URL: Prefect's temporary local API), on
a generated archive, with a fresh PREFECT_HOME, MLflow sqlite store and PETS_HOME in a temporary folder: resnet18,
random init, 32 px, 1 frozen + 2 unfrozen epochs per stage, on the CPU. `--runs 2` (the default) trains a second
time with the same folders, as someone iterating does: Prefect's database, the MLflow store and the presize cache
then exist, so the difference between the two runs is the one-time cost of creating them.

The phases are read back from what the run leaves, with no instrumentation of its own: the arrival time of each of
its output lines (the temporary server's start and stop messages), Prefect's task runs (their start and end, from
the database in PREFECT_HOME) and MLflow's per-epoch metrics (each epoch's `epoch_seconds`, logged when the epoch
ended). Training is the sum of the epochs' own seconds; the fixed cost is wall time minus training.

    python -m bench.overhead                  # two runs of the issue-16 setting; prints one JSON line
    python -m bench.overhead --runs 1 --table # one fresh run and a table of its phases on stderr
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, emit, rounded

TARGET_FIXED_SECONDS = 15.0  # issue 16: at most 15 s of fixed cost on 2 cores
ROOT = Path(__file__).resolve().parents[1]
# The setting: a tiny run people iterate with.
TRAIN_OPTIONS = [
    "--arch", "resnet18", "--no-pretrained", "--presize", "64", "--size", "32", "--bs", "16", "--freeze-epochs", "1",
    "--epochs", "2", "--device", "cpu",
]  # fmt: skip
DATA_TASKS = ("download_dataset", "label_images", "clean_images", "split_dataset", "presize_images", "summarize_data")
STAGES = ("baseline", "probe", "final")
# What Prefect 3.9 logs when get_client starts its temporary server (server/api/server.py, SubprocessASGIServer.start)
PREFECT_SERVER_STARTING = "Starting temporary server on"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--breeds", type=int, default=6, help="generated breeds")
    parser.add_argument("--per-breed", type=int, default=20, help="generated pictures per breed")
    parser.add_argument("--runs", type=int, default=2, choices=(1, 2), help="1: a fresh run; 2: then a repeat")
    parser.add_argument("--table", action="store_true", help="also print a table of the phases on stderr")
    parser.add_argument("--data-dir", type=Path, default=BENCH_DIR, help="where the generated archive lives")
    parser.add_argument(
        "--project", type=Path, default=ROOT, help="the checkout whose `pets train` runs (another commit's worktree)"
    )
    parser.add_argument("train_options", nargs="*", help="more `pets train` options, after --")
    args = parser.parse_args(argv)
    archive = _archive(args.data_dir, breeds=args.breeds, per_breed=args.per_breed)
    runs = []
    with tempfile.TemporaryDirectory(dir=args.data_dir, prefix="overhead-") as scratch:
        for number in range(1, args.runs + 1):
            runs.append(_measure(args.project.resolve(), Path(scratch), archive, number, args.train_options))
    for name, run in zip(("fresh", "repeat"), runs, strict=False):
        if args.table:
            print(table(run, f"{name} run"), file=sys.stderr)
    figures: dict[str, Any] = {
        "images": args.breeds * args.per_breed,
        "options": " ".join(TRAIN_OPTIONS + args.train_options),
        "project": str(args.project.resolve()),
    }
    for name, run in zip(("fresh", "repeat"), runs, strict=False):
        figures[name] = rounded(run)
    last = runs[-1]
    figures["fixed_seconds"] = round(last["fixed_seconds"], 3)
    figures["fixed_share_of_wall"] = round(last["fixed_seconds"] / last["wall_seconds"], 3)
    if len(runs) == 2:
        figures["one_time_seconds"] = round(runs[0]["fixed_seconds"] - runs[1]["fixed_seconds"], 3)
    targets = {f"fixed_at_most_{TARGET_FIXED_SECONDS:g}_s": last["fixed_seconds"] <= TARGET_FIXED_SECONDS}
    import torch

    return emit("overhead", torch.device("cpu"), figures, targets)


def _archive(data_dir: Path, *, breeds: int, per_breed: int) -> Path:
    """A generated Oxford-style archive, made once per size under data_dir."""
    from lib.data.synthetic import make_pets_dataset, pack_tgz

    archive = Path(data_dir) / f"overhead-pets-{breeds}x{per_breed}.tgz"
    if not archive.exists():
        with tempfile.TemporaryDirectory(dir=data_dir) as folder:
            images = make_pets_dataset(Path(folder) / "pets", breeds=breeds, images_per_breed=per_breed)
            pack_tgz(images, archive)
    return archive


def _measure(project: Path, scratch: Path, archive: Path, number: int, more_options: list[str]) -> dict[str, float]:
    """Run `pets train` once with the scratch folder's homes; return its wall time and phases in seconds."""
    environment = {
        **os.environ,
        "PREFECT_HOME": str(scratch / "prefect-home"),
        "PETS_HOME": str(scratch / "pets-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow' / 'mlflow.db'}",
        "PYTHONPATH": os.pathsep.join([str(project), os.environ.get("PYTHONPATH", "")]),
    }
    environment.setdefault("DO_NOT_TRACK", "1")  # offline: no analytics (Prefect 3.9 prefect/_internal/analytics)
    environment.pop("PREFECT_API_URL", None)  # the temporary local API, as for a user who set up nothing
    (scratch / "mlflow").mkdir(exist_ok=True)
    command = [sys.executable, "-m", "flows", "train", "--data-url", archive.resolve().as_uri(), *TRAIN_OPTIONS]
    command += ["--out-dir", str(scratch / f"runs{number}"), "--json", *more_options]
    cpu_before = _children_cpu_seconds()
    started = time.time()
    process = subprocess.Popen(command, cwd=project, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[tuple[float, str]] = []
    streams = (process.stdout, process.stderr)
    readers = [threading.Thread(target=_read_lines, args=(stream, lines)) for stream in streams]
    for reader in readers:
        reader.start()
    returncode = process.wait()
    ended = time.time()
    cpu_seconds = _children_cpu_seconds() - cpu_before  # the command and every process it started and waited for
    for reader in readers:
        reader.join()
    output = "\n".join(line for _, line in lines)
    if returncode != 0:
        raise RuntimeError(f"pets train exited with {returncode}:\n{output[-4000:]}")
    result = json.loads([line for _, line in lines if line.startswith("{")][-1])
    figures = phases(
        started=started,
        ended=ended,
        lines=lines,
        tasks=_task_runs(scratch / "prefect-home" / "prefect.db"),
        epochs=_epochs(environment["MLFLOW_TRACKING_URI"], result["run_id"]),
    )
    return {**figures, "cpu_seconds": cpu_seconds}


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's children that have ended, and of theirs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _read_lines(stream, lines: list[tuple[float, str]]) -> None:
    """Collect (arrival time, line) for every line of a stream until it closes."""
    for raw in stream:
        lines.append((time.time(), raw.decode(errors="replace").rstrip("\n")))
    stream.close()


def _task_runs(database: Path) -> dict[str, tuple[float, float]]:
    """The last flow run's span (key `flow`) and each of its task runs' (start, end), from Prefect's database."""
    connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        flow_id, flow_start, flow_end = connection.execute(
            "SELECT id, start_time, end_time FROM flow_run ORDER BY start_time DESC LIMIT 1"
        ).fetchone()
        rows = connection.execute(
            "SELECT name, start_time, end_time FROM task_run WHERE flow_run_id = ?", (flow_id,)
        ).fetchall()
    finally:
        connection.close()
    runs = {"flow": (_utc_seconds(flow_start), _utc_seconds(flow_end))}
    for name, start, end in rows:
        runs[_task_key(name)] = (_utc_seconds(start), _utc_seconds(end))
    return runs


def _task_key(name: str) -> str:
    """`fine-tune-probe` stays as it is; `download_dataset-e9d` loses Prefect's random suffix."""
    return name if name.startswith("fine-tune-") else name.rsplit("-", 1)[0]


def _utc_seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp()


def _epochs(tracking_uri: str, run_id: str) -> dict[str, list[tuple[float, float]]]:
    """Each stage's epochs as (end time, own seconds), from the run's `<stage>/epoch_seconds` metric."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    epochs = {}
    for stage in STAGES:
        history = sorted(client.get_metric_history(run_id, f"{stage}/epoch_seconds"), key=lambda point: point.step)
        epochs[stage] = [(point.timestamp / 1000, point.value) for point in history]
    return epochs


def phases(
    *,
    started: float,
    ended: float,
    lines: list[tuple[float, str]],
    tasks: dict[str, tuple[float, float]],
    epochs: dict[str, list[tuple[float, float]]],
) -> dict[str, float]:
    """Split one run's wall time into its phases (seconds); what no phase covers is `other`."""

    def span(name: str) -> float:
        begun, finished = tasks[name]
        return finished - begun

    figures: dict[str, float] = {"wall_seconds": ended - started}
    flow_started = tasks["flow"][0]
    server_starting = next((at for at, line in lines if PREFECT_SERVER_STARTING in line), None)
    if server_starting is not None:  # Prefect's own temporary server, started when the flow first needs it
        figures["cli_import"] = server_starting - started  # interpreter, imports, the recipe's validation
        figures["prefect_server_start"] = flow_started - server_starting
    else:  # the API started by the command, or a configured one
        figures["cli_import_and_prefect_api"] = flow_started - started
    figures["mlflow_store"] = span("start_run")
    figures["data_stage"] = tasks[DATA_TASKS[-1]][1] - tasks[DATA_TASKS[0]][0]
    training = 0.0
    for stage in STAGES:
        task = f"fine-tune-{stage}"
        if task not in tasks:  # not run (no baseline, or the probe is the final model: its rows are copies)
            continue
        begun, finished = tasks[task]
        rows = epochs[stage]
        first_start = rows[0][0] - rows[0][1]
        seconds = sum(own for _, own in rows)
        training += seconds
        figures[f"{stage}_start_to_first_epoch"] = first_start - begun
        figures[f"{stage}_between_epochs"] = (rows[-1][0] - first_start) - seconds
        figures[f"{stage}_after_last_epoch"] = finished - rows[-1][0]
    if "find_learning_rate" in tasks:
        figures["lr_finder"] = span("find_learning_rate")
    figures["evaluation"] = span("evaluate_classifier")
    figures["export_log_register"] = span("log_classifier")
    result_printed = [at for at, line in lines if line.startswith("{")][-1]  # `--json`: the command's last output
    figures["exit_after_result"] = ended - result_printed  # the temporary server's stop and the interpreter's exit
    figures["other"] = (
        figures["wall_seconds"] - training - sum(value for key, value in figures.items() if key != "wall_seconds")
    )
    figures["training_seconds"] = training
    figures["fixed_seconds"] = figures["wall_seconds"] - training
    return figures


def table(run: dict[str, float], title: str) -> str:
    """A markdown table of one run's phases: seconds and share of the wall time."""
    wall = run["wall_seconds"]
    rows = [
        f"{title}: wall {wall:.1f} s, training {run['training_seconds']:.1f} s, fixed {run['fixed_seconds']:.1f} s, "
        f"CPU {run['cpu_seconds']:.1f} s"
    ]
    rows += ["| phase | seconds | share of wall |", "|---|---|---|"]
    for key, value in run.items():
        if key not in ("wall_seconds", "fixed_seconds", "cpu_seconds"):
            rows.append(f"| {key} | {value:.2f} | {value / wall:.1%} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
