"""Train several architectures on the same data and settings, tabulate them, and crown the best in the registry.

fastbook ch. 5 ends by trying a deeper resnet; this flow makes that comparison repeatable: one training flow run (and
one MLflow run) per architecture, tied together by a comparison id, then one table and one registry alias.
"""

from __future__ import annotations

import csv
import math
import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.futures import wait

from flows.train import train
from lib.common.errors import InputError, UserError
from lib.common.numbers import rounded, significant
from lib.common.paths import default_output_dir
from lib.evaluate.comparison import COMPARISON_METRICS, plot_comparison
from lib.recipe import CHAMPION_ALIAS, DEFAULT_ARCHS, Architecture, Recipe
from tasks import tracking

CHAMPION_TAG = "champion"  # run tag: true on the run whose model version the alias points at
TABLE_ARTIFACT = "comparison.json"  # MLflow table artifact on every child run
CHART_FILE = "comparison.png"  # beside comparison.md, and an artifact of every child run
RUN_FLOW_TAG = "prefect.flow_run_id"  # the train flow tags its MLflow run with its Prefect flow run id
COLUMNS = (
    "arch", "error_rate", "valid_loss", "accuracy", "train_seconds", "images_per_second", "parameters",
    "model_size_mb", "epochs_trained", "model_version", "run_id",
)  # fmt: skip
METRIC_COLUMNS = (
    "error_rate", "valid_loss", "accuracy", "train_seconds", "images_per_second", "parameters", "model_size_mb",
    "epochs_trained",
)  # fmt: skip
# What Prefect puts before an exception in a failed state's message: noise in a list of failures.
STATE_MESSAGE_PREFIXES = ("Flow run encountered an exception: ", "Task run encountered an exception ")
COUNT_COLUMNS = ("parameters", "epochs_trained")  # MLflow stores every metric as a float; these are counts


class TrainingsFailedError(UserError, RuntimeError):
    """Trainings of a comparison failed, each with an error the user can fix; the message names each one."""


@flow(name="compare-pets", log_prints=True)
def compare(
    archs: list[Architecture] = DEFAULT_ARCHS,  # a tuple: an immutable default, a list once Prefect validates it
    recipe: Recipe = Recipe(),
    train_deployment: str | None = None,
) -> dict:
    """Train every architecture with the same recipe, tabulate them best first, and crown the best.

    1. check the architectures before anything trains (Prefect has validated the recipe already);
    2. name the comparison (every child's MLflow run is tagged comparison=<id>) and create the MLflow experiment;
    3. train each architecture (the recipe with its `model.arch` replaced): as subflows one after another, or, with
       `train_deployment` (e.g. "train-pets/train-{arch}"), as runs of that deployment in parallel, one per GPU worker;
    4. read the children's MLflow runs back: they hold every number, whichever way the children ran;
    5. tabulate best first by (error_rate, valid_loss) and chart each final model's epochs: a Prefect table
       artifact and a link to MLflow's compare page, `comparison.json` and `comparison.png` on every child run, and
       comparison.md / .csv / .png under `<runtime.out_dir>/<id>/` (default ./outputs/compare);
    6. if every child succeeded, move the registry alias `champion` to the best model version, recorded as a
       promotion (`tasks.tracking.promote`: the reason names the comparison, `pets champion` shows it), and tag the
       runs champion=true/false; otherwise fail, naming the failed architectures, and leave the alias where it was.
    """
    check_archs(archs)
    experiment, registered_model = recipe.tracking.experiment, recipe.tracking.registered_model
    comparison = new_comparison_id()
    parameters = {arch: child_parameters(arch, recipe, comparison) for arch in archs}
    # Created here, once: parallel children would race to create the experiment (and a fresh sqlite store's tables).
    tracking.ensure_experiment(experiment)
    print(f"Comparison {comparison}: training {', '.join(archs)} in MLflow experiment {experiment!r}.")

    if train_deployment is None:
        children = train_locally(parameters, comparison)
    else:
        children = train_deployments(train_deployment, parameters, comparison)
    runs = finished_runs(experiment, comparison, children)
    rows = rank([table_row(run) for run in runs.values()])

    folder = Path(recipe.runtime.out_dir or default_output_dir() / "compare").resolve() / comparison
    table = write_tables(rows, folder)
    chart = write_chart(rows, folder) if rows else None
    failed = [child for child in children if child["arch"] not in runs]
    champion = None if failed or not rows else rows[0]
    compare_url = publish(rows, runs, comparison, experiment, champion, registered_model, chart)
    print(f"Comparison {comparison}, best first:\n{markdown_table(rows)}")
    if compare_url:
        print(f"MLflow compare page: {compare_url}\nChart: {chart}")
    if failed:
        fixable = all(child.get("user_error") for child in failed)  # else a bug, or a child that never started
        raise (TrainingsFailedError if fixable else RuntimeError)(failure_message(failed, len(children), table))
    tracking.set_champion(
        registered_model, champion["model_version"], CHAMPION_ALIAS, reason=champion_reason(comparison, rows)
    )
    print(f"{registered_model}@{CHAMPION_ALIAS} -> v{champion['model_version']} ({champion['arch']}).")
    return {
        "comparison": comparison,
        "champion": champion["arch"],
        "champion_version": champion["model_version"],
        "runs": rows,
        "table": str(table),
        "chart": str(chart),
        "compare_url": compare_url,
        "experiment": experiment,
    }


# -- 1-2. the architectures and the comparison id ----------------------------------------------------------------------
def check_archs(archs: Sequence[str]) -> None:
    """Refuse an empty list and repeated architectures (two children would share a name and a table row)."""
    if not archs:
        raise InputError("archs is empty: name at least one architecture to train.")
    repeated = sorted({arch for arch in archs if list(archs).count(arch) > 1})
    if repeated:
        raise InputError(f"archs lists {', '.join(repeated)} more than once; each architecture is trained once.")


def new_comparison_id() -> str:
    """Return e.g. cmp-20250102-030405-a1b2: sortable by start time, unique, and a valid Prefect artifact key."""
    return f"cmp-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def child_parameters(arch: str, recipe: Recipe, comparison: str) -> dict[str, Any]:
    """Return one child's training parameters: the recipe with its architecture, and the comparison id."""
    return {"recipe": recipe.updated({"arch": arch}).model_dump(mode="json"), "comparison": comparison}


# -- 3. the children --------------------------------------------------------------------------------------------------
def train_locally(parameters: Mapping[str, dict], comparison: str) -> list[dict]:
    """Run each training as a subflow, one after another; a failed child is recorded and the next one still runs."""
    children = []
    for arch, child in parameters.items():
        named = train.with_options(flow_run_name=f"{arch}-{comparison}")
        state = named(**child, return_state=True)
        outcome = child_outcome(arch, str(state.state_details.flow_run_id), state)
        outcome["user_error"] = state.is_failed() and isinstance(state.result(raise_on_failure=False), UserError)
        children.append(outcome)
    return children


@task(cache_policy=NO_CACHE, task_run_name="run-{flow_run_name}")
def run_training_deployment(deployment: str, parameters: dict[str, Any], flow_run_name: str) -> dict:
    """Run one training deployment and wait for its final state; return its flow run id and that state."""
    flow_run = run_deployment(deployment, parameters=parameters, timeout=None, flow_run_name=flow_run_name)
    # run_deployment never raises when the child fails (PrefectHQ/prefect issue #11435): the caller reads the state.
    return child_outcome(parameters["recipe"]["model"]["arch"], str(flow_run.id), flow_run.state)


def train_deployments(deployment: str, parameters: Mapping[str, dict], comparison: str) -> list[dict]:
    """Start every training as a run of the deployment at once (the work pool spreads them over GPUs); wait for all."""
    names = {arch: deployment.format(arch=arch) for arch in parameters}
    futures = {
        arch: run_training_deployment.submit(names[arch], child, f"{arch}-{comparison}")
        for arch, child in parameters.items()
    }
    wait(list(futures.values()))
    children = []
    for arch, future in futures.items():
        if future.state.is_completed():
            children.append(future.result())
        else:  # the child could not even be started, e.g. no such deployment
            child = child_outcome(arch, None, future.state)
            child["message"] = f"could not run deployment {names[arch]!r}: {child['message']}"
            children.append(child)
    return children


def child_outcome(arch: str, flow_run_id: str | None, state) -> dict:
    """Describe how a child ended with plain values: whether it completed, its state's name and message."""
    return {
        "arch": arch,
        "flow_run_id": flow_run_id,
        "completed": bool(state and state.is_completed()),
        "state": state.name if state else "unknown",
        "message": (state.message or "") if state else "",
    }


# -- 4. the children's MLflow runs ------------------------------------------------------------------------------------
def finished_runs(experiment: str, comparison: str, children: Sequence[dict]) -> dict[str, Any]:
    """Return {arch: MLflow run} for the children that completed and whose run FINISHED.

    A run is matched to its child by the Prefect flow run id it is tagged with, so a stray run with the same
    comparison tag never enters the table, and a retried child's FAILED first attempt is passed over.
    """
    finished = [run for run in tracking.comparison_runs(experiment, comparison) if run.info.status == "FINISHED"]
    by_flow_run = {run.data.tags.get(RUN_FLOW_TAG): run for run in finished}
    runs = {}
    for child in children:
        run = by_flow_run.get(child["flow_run_id"]) if child["completed"] else None
        if run is not None:
            runs[child["arch"]] = run
        elif child["completed"]:  # it says Completed, yet has nothing to show: count it as failed
            child["message"] = f"no FINISHED MLflow run tagged {RUN_FLOW_TAG}={child['flow_run_id']}"
    return runs


def table_row(run) -> dict[str, Any]:
    """Return one table row from an MLflow run: its summary metrics, arch and model version (missing -> None)."""
    metrics, tags = run.data.metrics, run.data.tags
    row: dict[str, Any] = {column: metrics.get(column) for column in METRIC_COLUMNS}
    for column in COUNT_COLUMNS:
        if row[column] is not None:
            row[column] = int(row[column])
    row.update(arch=tags.get("arch"), model_version=tags.get("model_version"), run_id=run.info.run_id)
    return {column: row[column] for column in COLUMNS}


def rank(rows: Sequence[dict]) -> list[dict]:
    """Sort best first: lowest error rate, ties broken by lowest validation loss; missing numbers sort last."""

    def key(row: dict) -> tuple[float, float]:
        return tuple(math.inf if row[name] is None else row[name] for name in ("error_rate", "valid_loss"))

    return sorted(rows, key=key)


def champion_reason(comparison: str, rows: Sequence[dict]) -> str:
    """The promotion reason of the best row (rows ranked best first), e.g. `compare cmp-...: lowest error_rate ...`."""
    best = rows[0]
    return (
        f"compare {comparison}: lowest error_rate {significant(best['error_rate'])} of {len(rows)} architectures "
        f"({best['arch']}, valid_loss {significant(best['valid_loss'])})"
    )


# -- 5. the table -----------------------------------------------------------------------------------------------------
def write_tables(rows: Sequence[dict], folder: Path) -> Path:
    """Write comparison.md and comparison.csv into folder; return the markdown file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "comparison.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = folder / "comparison.md"
    table.write_text(markdown_table(rows) + "\n")
    return table


def markdown_table(rows: Sequence[dict]) -> str:
    """Render rows as a markdown table, numbers to 4 significant digits."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(significant(row[column]) for column in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def write_chart(rows: Sequence[dict], folder: Path) -> Path:
    """Draw comparison.png: each architecture's final model, epoch by epoch, best first in the legend."""
    history = tracking.metric_history
    curves = {row["arch"]: {m: history(row["run_id"], f"final/{m}") for m in COMPARISON_METRICS} for row in rows}
    return plot_comparison(curves, folder / CHART_FILE)


def publish(
    rows: list[dict],
    runs: Mapping[str, Any],
    comparison: str,
    experiment: str,
    champion: dict | None,
    registered_model: str,
    chart: Path | None,
) -> str | None:
    """Put the table where people look: the Prefect UI, every child's MLflow run, and a champion tag per run.

    Returns the address of MLflow's compare page for the runs (None when no run finished).
    """
    verdict = (
        f"champion: {champion['arch']} ({registered_model} v{champion['model_version']})"
        if champion
        else "no champion: not every training succeeded"
    )
    description = f"Comparison {comparison} in MLflow experiment {experiment!r}, best first; {verdict}."
    shown = [{column: rounded(value) for column, value in row.items()} for row in rows]  # 4 significant digits
    create_table_artifact(shown, key=f"comparison-{comparison}", description=description)
    for run in runs.values():
        tracking.log_table(run.info.run_id, rows, TABLE_ARTIFACT)
        if chart is not None:
            tracking.log_files(run.info.run_id, [chart])
        is_champion = champion is not None and run.info.run_id == champion["run_id"]
        tracking.set_tags(run.info.run_id, {CHAMPION_TAG: str(is_champion).lower()})
    if not runs:
        return None
    experiment_id = next(iter(runs.values())).info.experiment_id
    url = tracking.compare_url(experiment_id, [row["run_id"] for row in rows])
    create_link_artifact(url, link_text=f"MLflow: compare {comparison}", key="mlflow-comparison")
    return url


def failure_message(failed: Sequence[dict], total: int, table: Path) -> str:
    """Name each failed architecture with its flow run state, and say what was and was not done."""
    lines = [f"{len(failed)} of {total} trainings failed:"]
    for child in failed:
        flow_run = f" (flow run {child['flow_run_id']})" if child["flow_run_id"] else ""
        reason = (child["message"].strip().splitlines() or [""])[0]  # the first line: the exception and its message
        for prefix in STATE_MESSAGE_PREFIXES:
            reason = reason.removeprefix(prefix)
        lines.append(f"  {child['arch']}: {child['state']}{flow_run}" + (f": {reason}" if reason else ""))
    others = f"The table of the others is in {table}; t" if len(failed) < total else "T"
    lines.append(f"{others}he alias {CHAMPION_ALIAS!r} was not moved.")
    return "\n".join(lines)
