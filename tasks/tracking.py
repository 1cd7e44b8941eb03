"""Where and how runs are tracked in MLflow. The only module of the project that talks to MLflow.

One MLflow run per training flow run: the flow opens it with `training_run` (a context manager that ends it FINISHED,
FAILED or KILLED), passes its `run_id` to every step, and every write names that `run_id` through `MlflowClient`, so
steps can run in any thread or process (MLflow 3.17 docs, `mlflow.client`). The one exception is `log_classifier`:
`mlflow.pytorch.log_model` logs to the fluent API's active run, so it re-enters the run by id for that call alone.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lib.common.download import redact_url
from lib.common.errors import InputError, UserError
from lib.common.processes import ProcessIdentity
from lib.recipe import CHAMPION_ALIAS, Recipe
from tasks.mlflow_ui import ui_url as _ui_url

if TYPE_CHECKING:  # the CLI checks the tracking store with this module as it starts: torch and pandas load later
    import pandas as pd

    from lib.train.trainer import EpochStats

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The repository's mlflow/ folder: sqlite store and artifacts, both git-ignored (MLflow 3.17 refuses ./mlruns).
MLFLOW_DIR = PROJECT_ROOT / "mlflow"

# Per-epoch metric names, identical in every run and every stage (MLflow 3.17 UI: runs are compared per metric key).
EPOCH_METRICS = ("train_loss", "valid_loss", "error_rate", "accuracy", "lr", "epoch_seconds", "images_per_second")
DATASET_NAME = "pets-labels"
MODEL_NAME = "model"  # the LoggedModel's name inside the run
EXAMPLE_IMAGES = 2  # pt2 export: an input example with batch > 1 keeps the batch dim dynamic (MLflow 3.17 pytorch)
MAX_BATCH = 1000  # MlflowClient.log_batch takes at most 1000 metrics per call (MLflow 3.17 REST API docs, log-batch)


def tracking_uri() -> str:
    """Return $MLFLOW_TRACKING_URI, or the sqlite store in the repository's mlflow/ folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or _default_uri()


def artifact_location(uri: str) -> str | None:
    """Return the artifact root for experiments created in a sqlite store: artifacts/ beside the database.

    A tracking server chooses its own artifact root, so None is returned for any other URI.
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()


STORE_CHECK_SECONDS = 5  # a tracking server that does not answer /health this fast is treated as down


class TrackingStoreUnavailableError(UserError, RuntimeError):
    """The MLflow tracking store cannot be reached or opened: raised before anything trains."""


def check_tracking_store(uri: str | None = None) -> None:
    """Fail within seconds, naming the URI, when the tracking store is down or cannot exist.

    MLflow's own client retries an unreachable server with backoff for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES),
    and a sqlite URI in a missing folder fails only at the first write. Checked before any data or training step.
    """
    uri = uri or tracking_uri()
    shown = redact_url(uri)
    fix = (
        "Start the tracking server, or set MLFLOW_TRACKING_URI to one that runs (unset it to use the local store "
        f"{_default_uri()})."
    )
    if uri.startswith(("http://", "https://")):
        try:
            response = httpx.get(uri.rstrip("/") + "/health", timeout=STORE_CHECK_SECONDS)
        except httpx.HTTPError as error:
            raise TrackingStoreUnavailableError(
                f"The MLflow tracking server {shown} is not reachable ({type(error).__name__}: {error}). {fix}"
            ) from None
        if response.status_code != 200:
            raise TrackingStoreUnavailableError(
                f"The MLflow tracking server {shown} answered /health with HTTP {response.status_code}. {fix}"
            )
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingStoreUnavailableError(
                f"The MLflow tracking store {shown} cannot be opened: the folder {folder} does not exist or is not "
                f"writable. Create it, or fix MLFLOW_TRACKING_URI. {fix}"
            )


def _default_uri() -> str:
    return f"sqlite:///{MLFLOW_DIR / 'mlflow.db'}"


_PREPARED_STORES: set[str] = set()  # the stores this process has opened once under the store lock


def _client():
    import mlflow

    uri = tracking_uri()
    if uri not in _PREPARED_STORES:
        prepare_store(uri)
    return mlflow.MlflowClient(uri)


STORE_LOCK_SECONDS = 300  # creating a new store runs ~60 migrations, seconds each on a slow disk (measured here: 2-3 s)


def prepare_store(uri: str) -> None:
    """Open the tracking store once in this process, creating its tables (and migrating them) under a file lock.

    MLflow 3.17 creates the tables of a new database store as it first opens it (SqlAlchemyStore.__init__ calls
    mlflow/store/db/utils.py `_initialize_tables` without a lock), so two processes opening a new sqlite store at once
    both run the alembic migrations and fail ("Online migration expected to match one row ... 0 found", "duplicate
    column name"). Here the first opening of a sqlite store, by any process, holds `<database>.lock` beside it; the
    registry's store is opened under the same lock. Once opened, MLflow's sessions wait for sqlite's write lock
    themselves (`PRAGMA busy_timeout = 20000`, mlflow/store/db/utils.py).
    """
    import mlflow
    from filelock import FileLock, Timeout

    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        try:
            with FileLock(f"{database}.lock", timeout=STORE_LOCK_SECONDS):
                client = mlflow.MlflowClient(uri)  # opens the tracking store: creates and migrates its tables
                client.search_registered_models(max_results=1)  # opens the registry's store of the same database
        except Timeout:
            raise TrackingStoreUnavailableError(
                f"The MLflow tracking store {uri} was held for {STORE_LOCK_SECONDS} s by another process creating "
                f"it (it holds {database}.lock; `fuser {database}.lock` names it). Let it finish, then try again."
            ) from None
    _PREPARED_STORES.add(uri)


def ensure_experiment(name: str) -> str:
    """Create the experiment with an explicit artifact location if it is missing; return its id."""
    uri = tracking_uri()
    check_tracking_store(uri)
    client = _client()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except MlflowException as error:  # another run created it between our read and our write
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


# -- the run ----------------------------------------------------------------------------------------------------------
FLOW_RUN_TAG = "prefect.flow_run_id"  # the Prefect flow run an MLflow run belongs to: one MLflow run per flow run
RECIPE_ARTIFACT = "recipe.yaml"  # the run's resolved recipe: `pets train --recipe` repeats the run from it
RESUMABLE = ("RUNNING", "FAILED", "KILLED")  # an interrupted run; a FINISHED one is never trained into again
FAILURE_TAG = "pets.failure"  # why a FAILED run failed: the error's type and message
MAX_TAG_LENGTH = 8000  # MLflow 3.17 utils/validation.py MAX_TAG_VAL_LENGTH
# The process training a RUNNING run, so a later command can tell a run whose process is gone (killed outright, its
# machine lost) from one still training: its host, PID and start time, and a heartbeat it refreshes while it runs.
HOST_TAG, PID_TAG, PROCESS_START_TAG = "pets.host", "pets.pid", "pets.process_start"
HEARTBEAT_TAG = "pets.heartbeat"  # unix seconds
HEARTBEAT_SECONDS = 60
# A run on another host is given up after this long without a heartbeat: a process stopped longer than this (a
# suspended laptop) that wakes up finds its run FAILED and can continue it with --resume.
HEARTBEAT_TIMEOUT_SECONDS = 15 * 60


class ResumeRefusedError(UserError, ValueError):
    """`--resume RUN_ID` names a run that cannot be continued, or asks for another recipe than the run's."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run: it is KILLED in MLflow and can be continued; the message says how."""


@dataclass(frozen=True)
class TrainingRun:
    """The flow run's MLflow run: its ids, its params so far (a resumed run has some) and where to open it."""

    run_id: str
    experiment_id: str
    params: dict[str, str]
    start_time: int = 0  # ms since the epoch, when the run was created (a resumed run keeps its own)

    @property
    def url(self) -> str:
        return run_url({"run_id": self.run_id, "experiment_id": self.experiment_id})

    def chosen_lr(self) -> tuple[float, str] | None:
        """The base LR an earlier attempt of this run already chose, and how (a resumed run keeps it)."""
        if "base_lr" not in self.params:
            return None
        return float(self.params["base_lr"]), self.params["base_lr_source"]

    def log_recipe(self, recipe: Recipe, folder: Path) -> None:
        """Record the recipe twice: as dotted params to compare runs by, and as the file that repeats the run.

        A URL's credentials are never recorded (`redact_url`); such a run is repeated by giving the URL again.
        """
        recipe = recorded(recipe)
        log_params(self.run_id, recipe.params())
        log_files(self.run_id, [recipe.save(Path(folder) / RECIPE_ARTIFACT)])

    def log_stage(self, stage: Mapping[str, Any], *, name: str | None = None) -> None:
        """File a finished training stage's loss curves under its name (or `name`: the probe can be the final)."""
        log_files(self.run_id, [stage["loss_curves"]], name or stage["stage"])

    def rename(self, name: str) -> None:
        """Give the run the name the runs table shows (MLflow keeps it as the `mlflow.runName` tag too)."""
        _client().update_run(self.run_id, name=name)


# The code a run trained with, under the tags MLflow's own git context writes (MLflow 3.17 mlflow/utils/mlflow_tags.py:
# MLFLOW_GIT_COMMIT, MLFLOW_GIT_BRANCH, MLFLOW_GIT_DIRTY; "true"/"false" as mlflow/genai/git_versioning writes it).
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_BRANCH_TAG = "mlflow.source.git.branch"
GIT_DIRTY_TAG = "mlflow.source.git.dirty"
GIT_SECONDS = 5  # `git status` answers in milliseconds; a hung one (a stale NFS lock) must not hold up training


def source_tags(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Return the checkout's commit, branch and whether tracked files differ from the commit; {} outside a checkout.

    One `git status` (porcelain v2 prints the commit and branch as headers): no GitPython, whose import costs seconds.
    Untracked files do not make the tree dirty, as in MLflow's git context. The search stops at `root`, so a checkout
    the project merely sits inside (a home directory under git) is never taken for the project's.
    """
    command = ["git", "-C", str(root), "status", "--porcelain=v2", "--branch", "--untracked-files=no"]
    environment = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(root).resolve().parent)}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=GIT_SECONDS, env=environment)
    except (OSError, subprocess.TimeoutExpired):  # no git installed, or it hung
        return {}
    if done.returncode != 0:  # not a git checkout, or one git refuses (another owner's: "dubious ownership")
        return {}
    headers, changed = {}, False
    for line in done.stdout.splitlines():
        if line.startswith("# "):
            key, _, value = line[2:].partition(" ")
            headers[key] = value
        elif line:
            changed = True
    commit = headers.get("branch.oid", "(initial)")
    if commit == "(initial)":  # a repository without a commit yet
        return {}
    tags = {GIT_COMMIT_TAG: commit, GIT_DIRTY_TAG: str(changed).lower()}
    if headers.get("branch.head", "(detached)") != "(detached)":
        tags[GIT_BRANCH_TAG] = headers["branch.head"]
    return tags


@task(cache_policy=NO_CACHE)
def start_run(
    experiment: str, run_name: str, tags: Mapping[str, str], *, recipe: Recipe, resume: str | None = None
) -> TrainingRun:
    """Create the flow run's MLflow run (status RUNNING), or take back the one it continues.

    A flow run Prefect runs again (`prefect flow-run retry` after a crash) gets back the MLflow run it had, and
    `resume` (`pets train --resume RUN_ID`) names an interrupted run to continue. Either is set RUNNING again and
    trained into, instead of leaving a second, half-finished run beside it.
    """
    experiment_id = ensure_experiment(experiment)
    for message in fail_abandoned_runs():
        get_run_logger().warning(message)
    client = _client()
    owner = owner_tags()
    if resume is not None:
        run = resumable_run(resume, recipe)
        # on_crashed of this flow run finds it; this process owns it now (set before RUNNING: never RUNNING unowned)
        set_tags(run.info.run_id, {FLOW_RUN_TAG: tags[FLOW_RUN_TAG], **owner})
        client.update_run(run.info.run_id, status="RUNNING")
    elif earlier := runs_of_flow_run(experiment_id, tags[FLOW_RUN_TAG]):
        run = earlier[0]
        set_tags(run.info.run_id, owner)
        client.update_run(run.info.run_id, status="RUNNING")
    else:  # a new run records the code it trains with; one taken back keeps what it recorded
        tags = {**source_tags(), **tags, **owner}
        run = client.create_run(experiment_id, run_name=run_name, tags={key: str(v) for key, v in tags.items()})
    if FAILURE_TAG in run.data.tags:  # a failed run taken back: it is running again
        client.delete_tag(run.info.run_id, FAILURE_TAG)
    return TrainingRun(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        params=dict(run.data.params),
        start_time=run.info.start_time,
    )


def recorded(recipe: Recipe) -> Recipe:
    """The recipe as a run records it: the data URL and a labels CSV's URL without their credentials."""
    return recipe.updated({"data_url": redact_url(recipe.data.url), "labels_csv": redact_url(recipe.data.labels_csv)})


def resumable_run(run_id: str, recipe: Recipe | None = None):
    """Return the interrupted MLflow run `run_id`, checking it can be continued with `recipe` (if given)."""
    from mlflow.exceptions import MlflowException

    try:
        run = _client().get_run(run_id)
    except MlflowException:
        raise ResumeRefusedError(
            f"--resume {run_id}: no such run in the tracking store {redact_url(tracking_uri())}."
        ) from None
    if run.info.status not in RESUMABLE:
        raise ResumeRefusedError(
            f"--resume {run_id}: the run is {run.info.status}, not interrupted; train a new run instead."
        )
    if run.info.status == "RUNNING" and abandoned_because(run.data.tags) is None and HOST_TAG in run.data.tags:
        raise ResumeRefusedError(
            f"--resume {run_id}: the run is still being trained by process {run.data.tags[PID_TAG]} on "
            f"{run.data.tags[HOST_TAG]}; wait for it, or stop it (Ctrl-C) and resume then."
        )
    if recipe is not None:
        refuse_changed_recipe(run, recipe)
    return run


def refuse_changed_recipe(run, recipe: Recipe) -> None:
    """Refuse to continue `run` with a recipe other than the one its params record, naming each difference."""
    asked = {key: describe(value) for key, value in recorded(recipe).params().items()}
    defaults = {key: describe(value) for key, value in Recipe().params().items()}
    # A setting added after the run was logged is not in its params: the run trained with what is now its default.
    logged = {key: run.data.params.get(key, defaults[key]) for key in asked}
    changed = [f"{key} {logged[key]} -> {asked[key]}" for key in asked if logged[key] != asked[key]]
    if changed:
        raise ResumeRefusedError(
            f"--resume {run.info.run_id}: the recipe differs from the run's ({'; '.join(changed)}); a resumed run "
            "continues with its own recipe, so drop those options or train a new run."
        )


def logged_recipe(run_id: str) -> Recipe:
    """Read back the recipe a run logged (its `recipe.yaml` artifact)."""
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            return Recipe.load(_client().download_artifacts(run_id, RECIPE_ARTIFACT, folder))
        except (MlflowException, OSError) as error:  # it died before logging its recipe
            raise ResumeRefusedError(
                f"--resume {run_id}: the run has no readable {RECIPE_ARTIFACT} ({error}); train a new run instead."
            ) from None


def runs_of_flow_run(experiment_id: str, flow_run_id: str, *, status: str | None = None) -> list:
    """Return the MLflow runs a Prefect flow run created in the experiment (optionally only those with a status)."""
    query = f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'" + (f" and attributes.status = '{status}'" if status else "")
    return _client().search_runs([experiment_id], filter_string=query)


def fail_orphaned_runs(experiment: str, flow_run_id: str) -> list[str]:
    """Mark the flow run's MLflow runs that are still RUNNING as FAILED (its process died); return their ids."""
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    orphans = [run.info.run_id for run in runs_of_flow_run(found.experiment_id, flow_run_id, status="RUNNING")]
    for run_id in orphans:
        client.set_terminated(run_id, status="FAILED")
    return orphans


def owner_tags() -> dict[str, str]:
    """The tags naming this process as the one training a run, with a fresh heartbeat."""
    me = ProcessIdentity.current()
    heartbeat = str(int(time.time()))
    return {HOST_TAG: me.host, PID_TAG: str(me.pid), PROCESS_START_TAG: me.started, HEARTBEAT_TAG: heartbeat}


def abandoned_because(tags: Mapping[str, str], now: float | None = None) -> str | None:
    """Why a RUNNING run's process is known to be gone, or None while it may still be training.

    On the run's own host the process is looked up (PID and start time); a run from another host is given up when
    its heartbeat is older than HEARTBEAT_TIMEOUT_SECONDS. A run without the tags (logged by another program, or
    before they existed) is never judged.
    """
    if HOST_TAG not in tags or PID_TAG not in tags:
        return None
    owner = ProcessIdentity(host=tags[HOST_TAG], pid=int(tags[PID_TAG]), started=tags.get(PROCESS_START_TAG, ""))
    if owner.on_this_host():
        return None if owner.is_alive() else f"its process {owner.pid} on this host ({owner.host}) is gone"
    silent = (time.time() if now is None else now) - float(tags.get(HEARTBEAT_TAG, 0))
    if silent <= HEARTBEAT_TIMEOUT_SECONDS:
        return None
    return f"its process {owner.pid} on {owner.host} has sent no heartbeat for {round(silent / 60)} min"


def fail_abandoned_runs() -> list[str]:
    """Mark every RUNNING run whose process is gone FAILED, with the reason as its `pets.failure` tag.

    Called as a command starts using the store; returns one line per run marked, for the command to show.
    """
    client = _client()
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    if not experiment_ids:
        return []
    messages = []
    for run in client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'"):
        reason = abandoned_because(run.data.tags)
        if reason is None:
            continue
        end_run.fn(run.info.run_id, "FAILED", failure=f"abandoned: {reason}")
        messages.append(
            f"MLflow run {run.info.run_id} ({run.info.run_name}) was RUNNING but {reason}: marked FAILED. "
            f"`pets train --resume {run.info.run_id}` continues it from its last complete epoch."
        )
    return messages


class Heartbeat:
    """Refresh a run's heartbeat tag every HEARTBEAT_SECONDS from a thread of its own, while the block runs."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            with suppress(Exception):  # a missed beat (a busy store) is made up by the next one
                set_tags(self.run_id, {HEARTBEAT_TAG: int(time.time())})


@task(cache_policy=NO_CACHE)
def end_run(run_id: str, status: str = "FINISHED", failure: str | None = None) -> None:
    """Mark the run FINISHED, FAILED or KILLED: a run is never left RUNNING by a flow that stopped.

    `failure` (the error that ended a FAILED run) is recorded as the tag `pets.failure`.
    """
    client = _client()
    if failure is not None:
        client.set_tag(run_id, FAILURE_TAG, failure[:MAX_TAG_LENGTH])
    client.set_terminated(run_id, status=status)


@contextmanager
def training_run(
    recipe: Recipe, run_name: str, tags: Mapping[str, str], *, resume: str | None = None
) -> Iterator[TrainingRun]:
    """Open the flow run's MLflow run for the block, and end it FINISHED, FAILED, or KILLED on Ctrl-C.

    Whatever was logged before a failure stays: the run says what happened instead of staying RUNNING.
    """
    run = start_run(recipe.tracking.experiment, run_name, tags, recipe=recipe, resume=resume)
    try:
        with Heartbeat(run.run_id):
            yield run
    except KeyboardInterrupt as error:
        end_run(run.run_id, "KILLED")
        raise RunInterrupted(
            f"MLflow run {run.run_id} is KILLED, with every complete epoch kept: `pets train --resume {run.run_id}` "
            "continues it from the last one."
        ) from error
    except BaseException as error:
        end_run(run.run_id, "FAILED", failure=f"{type(error).__name__}: {error}")
        raise
    end_run(run.run_id, "FINISHED")


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log parameters in one call: lists and dicts as JSON, everything else (None included) as str."""
    from mlflow.entities import Param

    _client().log_batch(run_id, params=[Param(key, describe(value)) for key, value in params.items()])


def log_metrics(run_id: str, metrics: Mapping[str, float], *, step: int = 0) -> None:
    """Log numbers at one step in one call."""
    _client().log_batch(run_id, metrics=_metric_rows(metrics, step))


def _metric_rows(metrics: Mapping[str, float], step: int) -> list:
    """Return MLflow Metric entities for numbers at one step, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in metrics.items()]


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set run tags (as strings)."""
    from mlflow.entities import RunTag

    _client().log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def epoch_metrics(row: EpochStats, stage: str) -> dict[str, float]:
    """Name one epoch's numbers `<stage>/<metric>`: the UI charts each stage as its own section."""
    values = {
        "train_loss": row.train_loss,
        "valid_loss": row.valid_loss,
        "error_rate": row.error_rate,
        "accuracy": row.accuracy,
        "lr": row.lr,
        "epoch_seconds": row.seconds,
        "images_per_second": row.images_per_second,
    }
    return {f"{stage}/{key}": values[key] for key in EPOCH_METRICS}


def metric_history(run_id: str, key: str) -> list[float]:
    """Return the run's values of a metric in step order (the last one logged at a step)."""
    points = sorted(_client().get_metric_history(run_id, key), key=lambda point: (point.step, point.timestamp))
    return list({point.step: point.value for point in points}.values())


def logged_steps(run_id: str, key: str) -> set[int]:
    """Return the steps at which the run has logged the metric."""
    return {point.step for point in _client().get_metric_history(run_id, key)}


def log_history(run_id: str, stage: str, history: Sequence[EpochStats]) -> None:
    """Log a whole stage's epochs at once (used when the final model is the probe's and is not retrained)."""
    rows = [metric for step, row in enumerate(history) for metric in _metric_rows(epoch_metrics(row, stage), step)]
    client = _client()
    for start in range(0, len(rows), MAX_BATCH):
        client.log_batch(run_id, metrics=rows[start : start + MAX_BATCH])


def log_files(run_id: str, paths: Sequence[str | Path], artifact_path: str | None = None) -> None:
    """Copy files into the run's artifacts (under artifact_path)."""
    client = _client()
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def log_table(run_id: str, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
    """Log rows as an MLflow table artifact (JSON the UI shows as a table)."""
    import pandas as pd

    _client().log_table(run_id, pd.DataFrame(list(rows)), artifact_file)


def log_dataset(run_id: str, manifest_path: str, *, source: str) -> str:
    """Log the labelled dataset (file, label, split) as the run's training input; return its digest."""
    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    manifest = pd.read_csv(manifest_path)
    columns = [column for column in ("path", "label", "split") if column in manifest.columns]
    with warnings.catch_warnings():  # a local path as source "can be interpreted in multiple ways" (mlflow.data, 3.17)
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(manifest[columns], source=source, name=DATASET_NAME, targets="label")
        entity = dataset._to_mlflow_entity()
    context = InputTag(key="mlflow.data.context", value="training")
    _client().log_inputs(run_id, datasets=[DatasetInput(dataset=entity, tags=[context])])
    return dataset.digest


# -- the model --------------------------------------------------------------------------------------------------------
def pip_requirements() -> list[str]:
    """Pin what loading the model needs, so MLflow skips its slow requirement inference (MLflow 3.17 log_model docs)."""
    import pandas as pd
    import PIL
    import torch
    import torchvision

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"pillow=={PIL.__version__}",
    ]


# The contract's modules (lib/serve/contract.py and what it imports from the project), carried by the registered model
# as code paths so it loads where the project is not installed (MLflow 3.17 docs, "Models From Code", code_paths).
CONTRACT_MODULES = (
    "lib/__init__.py",
    "lib/data/__init__.py",
    "lib/data/images.py",
    "lib/data/pictures.py",
    "lib/serve/__init__.py",
    "lib/serve/contract.py",
)
SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")
EXAMPLE_JPEG_QUALITY = 90  # the input example's pictures: small enough for the UI, a real JPEG to decode


def serving_signature():
    """The served model's signature: an `image` column of encoded images in; label, probability, top_k, error out.

    `top_k` (default 5) and `probabilities` (every class's probability, default off) are request params.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Map

    from lib.serve.contract import DEFAULT_TOP_K, IMAGE_COLUMN

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label", required=False),
                ColSpec(DataType.double, "probability", required=False),
                ColSpec(Map(DataType.double), "top_k", required=False),
                ColSpec(DataType.string, "error", required=False),
                ColSpec(Map(DataType.double), "probabilities", required=False),
            ]
        ),
        params=ParamSchema(
            [ParamSpec("top_k", DataType.long, DEFAULT_TOP_K), ParamSpec("probabilities", DataType.boolean, False)]
        ),
    )


def contract_code(folder: Path) -> Path:
    """Copy the contract's modules into `folder`, their packages kept; return the `lib` folder to log as code."""
    for module in CONTRACT_MODULES:
        target = folder / module
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((PROJECT_ROOT / module).read_bytes())
    return folder / "lib"


def example_request(images: Sequence[str], presize: int):
    """The input example: the pictures as validation sees them (presize centre squares), encoded as JPEG."""
    import io

    import pandas as pd
    from torchvision.transforms.v2.functional import to_pil_image

    from lib.serve.contract import IMAGE_COLUMN
    from lib.serve.inference import prepare_image

    encoded = []
    for image in images:
        buffer = io.BytesIO()
        to_pil_image(prepare_image(image, presize)).save(buffer, format="JPEG", quality=EXAMPLE_JPEG_QUALITY)
        encoded.append(buffer.getvalue())
    return pd.DataFrame({IMAGE_COLUMN: encoded})


def export_network(exported, example_images: Sequence[str], path: Path) -> Path:
    """Write the serving network (uint8 presize pictures in, logits out) as a pt2 program with a dynamic batch.

    torch.export specialises a dimension of size 1, so the example holds two pictures (MLflow 3.17 mlflow/pytorch
    exports its pt2 models the same way, with `Dim.AUTO`).
    """
    import torch
    from torch.export import Dim

    from lib.serve.serving import serving_batch, serving_model

    example = torch.from_numpy(serving_batch(list(example_images)[:EXAMPLE_IMAGES], exported.presize))
    program = torch.export.export(serving_model(exported), (example,), dynamic_shapes=({0: Dim.AUTO},))
    torch.export.save(program, path)
    return path


@task(cache_policy=NO_CACHE)
def log_classifier(run_id: str, model_path: str, example_images: Sequence[str], *, registered_model: str, step: int):
    """Log the exported classifier as the run's model and register it; return its URIs and version.

    The model is a pyfunc from code (tasks/served_model.py) serving lib/serve/contract.py: encoded images of any size
    in, class names and probabilities out. Its network is a pt2 program (torch.export, pickle-free) that does the
    validation resize and normalisation itself; decoding and the presize crop run in the contract's modules, which
    the model carries. The vocab and sizes are the model's config and metadata. MLflow 3.17 loads the logged model
    once and serves it the example (`Model.log`, mlflow/models/model.py: `_validate_serving_input`), so a model that
    cannot serve is never registered.
    """
    import tempfile

    import mlflow
    import mlflow.pyfunc

    from lib.serve.inference import read_export
    from tasks.served_model import NETWORK_ARTIFACT

    exported = read_export(Path(model_path))
    config = {
        "vocab": list(exported.vocab),
        "arch": exported.arch,
        "size": exported.size,
        "presize": exported.presize,
    }
    mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory() as folder, mlflow.start_run(run_id=run_id):
        network = export_network(exported, example_images, Path(folder) / "network.pt2")
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(SERVED_MODEL_CODE),
            artifacts={NETWORK_ARTIFACT: str(network)},
            code_paths=[str(contract_code(Path(folder) / "code"))],
            model_config=config,
            input_example=example_request(list(example_images)[:EXAMPLE_IMAGES], exported.presize),
            signature=serving_signature(),
            pip_requirements=pip_requirements(),
            metadata=config,
            step=step,
        )
        # The class names on the version itself, where the registry's UI shows them (too many for a tag: the count).
        classes = json.dumps(list(exported.vocab), ensure_ascii=False)
        if len(classes) > MAX_TAG_LENGTH:
            classes = f"{len(exported.vocab)} classes: the model's metadata holds their names (vocab)"
        version = mlflow.register_model(
            info.model_uri, registered_model, tags={"arch": exported.arch, "classes": classes}
        )
    set_tags(run_id, {"registered_model": registered_model, "model_version": version.version})
    return {"model_uri": info.model_uri, "model_id": info.model_id, "model_version": version.version}


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI as the registry resolved it: the registered model, its version, and the alias asked for."""

    uri: str  # models:/<name>/<version> for a registered model (an alias moved later does not change it)
    registered_model: str | None = None
    version: str | None = None
    alias: str | None = None


def resolve_model(model_uri: str) -> ResolvedModel:
    """Resolve models:/<name>@<alias> and models:/<name>/<version> to a version now, once.

    A missing model, alias or version is a PromotionError naming the registered model's versions and aliases. Other
    URIs (models:/m-<id>, runs:/, a path) come back as they are.
    """
    name, alias, version = _registry_parts(model_uri)
    if name is None:
        return ResolvedModel(uri=model_uri)
    client = _client()
    if alias is not None:
        model = _registered_model(client, name)
        if alias not in model.aliases:
            raise PromotionError(
                f"The registered model {name!r} has no alias {alias!r}; it has "
                f"{_what_it_has(model, _version_numbers(client, name))}. Name one of them, or set the alias with "
                "`pets promote VERSION`."
            )
        version = str(model.aliases[alias])
    else:
        version = _existing_version(client, name, version)
    return ResolvedModel(uri=f"models:/{name}/{version}", registered_model=name, version=version, alias=alias)


def _registry_parts(model_uri: str) -> tuple[str | None, str | None, str | None]:
    """Split models:/<name>@<alias> or models:/<name>/<version> into (name, alias, version); Nones otherwise."""
    if not model_uri.startswith("models:/"):
        return None, None, None
    path = model_uri.removeprefix("models:/").strip("/")
    if "@" in path:
        name, alias = path.rsplit("@", 1)
        return name, alias, None
    if "/" in path:
        name, version = path.rsplit("/", 1)
        return name, None, version
    return None, None, None  # models:/m-<id>, a logged model


def load_served_model(model_uri: str):
    """Load a logged or registered model for prediction; return (pyfunc model, its metadata dict).

    A registered model's alias or version that does not exist is a PromotionError naming what the model has.
    """
    import mlflow
    import mlflow.pyfunc

    resolved = resolve_model(model_uri)
    mlflow.set_tracking_uri(tracking_uri())
    model = mlflow.pyfunc.load_model(resolved.uri)
    return model, dict(model.metadata.metadata or {})


# -- comparisons ------------------------------------------------------------------------------------------------------
COMPARISON_TAG = "comparison"


def comparison_runs(experiment: str, comparison: str) -> list:
    """Return the MLflow runs of one comparison (tag comparison=<id>); the compare flow ranks them itself."""
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.{COMPARISON_TAG} = '{comparison}'",
    )


# -- the registry's champion -------------------------------------------------------------------------------------------
# On the promoted model version: its latest promotion (when, from which version, why, by whom, to which alias).
PROMOTED_AT_TAG, PROMOTED_FROM_TAG = "pets.promoted_at", "pets.promoted_from"
PROMOTION_REASON_TAG, PROMOTED_BY_TAG, PROMOTED_AS_TAG = "pets.promotion_reason", "pets.promoted_by", "pets.promoted_as"
MAX_REASON_LENGTH = 500  # a reason is a sentence; a long one would crowd the history out of its tag
# The history tag is capped below MAX_TAG_LENGTH: MLflow 3.17 validates registered-model tag values up to 100,000
# characters, but its database column holds 5000 (store/model_registry/dbmodels/models.py, SqlRegisteredModelTag:
# `value = Column(String(5000))`), which MySQL and PostgreSQL enforce. A compare flow's entry is ~210 characters, so
# ~23 promotions fit; past the cap the oldest entries are dropped (each version's tags still hold its latest one).
MAX_HISTORY_LENGTH = 5000
HISTORY_FIELDS = ("version", "previous", "time", "reason", "by")  # one history entry


class PromotionError(InputError):
    """A promotion names a registered model or version the registry does not have, or an unusable reason."""


@dataclass(frozen=True)
class Promotion:
    """One move of a registry alias: to `version` from `previous` (None: the alias was unset), when, why and by whom.

    `moved` is False when the version already held the alias: nothing was recorded.
    """

    alias: str
    version: str
    previous: str | None
    time: str  # ISO 8601, UTC
    reason: str
    by: str  # user@host
    moved: bool = True

    def entry(self) -> dict[str, str | None]:
        """The history entry (the alias is the tag's own)."""
        return {field: getattr(self, field) for field in HISTORY_FIELDS}


def history_tag(alias: str) -> str:
    """The registered-model tag holding the alias's history, e.g. pets.champion_history."""
    return f"pets.{alias}_history"


def promote(registered_model: str, version: str | int, *, reason: str, alias: str = CHAMPION_ALIAS) -> Promotion:
    """Move `alias` to `version` and record why: tags on the version, an entry in the registered model's history.

    A version that already holds the alias is left as it is (`moved` False). The history is one JSON list in a
    registered-model tag (MLflow tags are key/value only), read, appended to and written back under a file lock
    beside a sqlite store; on a tracking server two promotions at the same instant could lose one history entry
    (the alias and the version tags are still right).
    """
    reason = " ".join(reason.split())  # one line in the history table
    if not reason or len(reason) > MAX_REASON_LENGTH:
        raise PromotionError(
            f"The promotion reason is {len(reason)} characters; give --reason a sentence of 1 to {MAX_REASON_LENGTH}."
        )
    client = _client()
    version = _existing_version(client, registered_model, version)
    with _registry_lock():
        model = client.get_registered_model(registered_model)
        previous = model.aliases.get(alias)
        previous = None if previous is None else str(previous)
        promotion = Promotion(
            alias=alias,
            version=version,
            previous=previous,
            time=datetime.now(UTC).isoformat(timespec="seconds"),
            reason=reason,
            by=_who(),
            moved=previous != version,
        )
        if not promotion.moved:
            return promotion
        client.set_registered_model_alias(registered_model, alias, version)
        tags = {
            PROMOTED_AT_TAG: promotion.time,
            PROMOTED_FROM_TAG: previous or "",
            PROMOTION_REASON_TAG: reason,
            PROMOTED_BY_TAG: promotion.by,
            PROMOTED_AS_TAG: alias,
        }
        for key, value in tags.items():
            client.set_model_version_tag(registered_model, version, key, value)
        entries = [*_history_entries(model.tags.get(history_tag(alias)), registered_model, alias), promotion.entry()]
        client.set_registered_model_tag(registered_model, history_tag(alias), _capped_history(entries))
    return promotion


def champion_history(registered_model: str, alias: str = CHAMPION_ALIAS) -> list[Promotion]:
    """Return the alias's recorded promotions, newest first (empty if it was never promoted through `promote`)."""
    model = _registered_model(_client(), registered_model)
    entries = _history_entries(model.tags.get(history_tag(alias)), registered_model, alias)
    return [
        Promotion(alias=alias, **{field: entry.get(field) for field in HISTORY_FIELDS}) for entry in reversed(entries)
    ]


def alias_version(registered_model: str, alias: str = CHAMPION_ALIAS) -> str | None:
    """Return the version the alias points at, or None when it is unset; a missing model is a PromotionError."""
    version = _registered_model(_client(), registered_model).aliases.get(alias)
    return None if version is None else str(version)


def set_champion(registered_model: str, version: str, alias: str = CHAMPION_ALIAS, *, reason: str) -> Promotion:
    """Point the registry alias at a model version (an alias names exactly one version; setting it moves it).

    The move is recorded like any other promotion (`promote`), with the caller's reason.
    """
    return promote(registered_model, version, reason=reason, alias=alias)


def champion_version(registered_model: str, alias: str = CHAMPION_ALIAS) -> str:
    """Return the version the alias points at, as a string like the model_version run tag (MLflow returns an int)."""
    return str(_client().get_model_version_by_alias(registered_model, alias).version)


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = sorted(model.name for model in client.search_registered_models(max_results=100))
    known = f"registered models: {', '.join(names)}" if names else "it has no registered models"
    raise PromotionError(
        f"The registry at {redact_url(tracking_uri())} has no registered model {name!r} ({known}); name one of them, "
        "or register one with `pets train`."
    ) from None


def _existing_version(client, registered_model: str, version: str | int) -> str:
    """Return the version as MLflow spells it ("3" from 3, "3" or "v3"); refuse one the model does not have."""
    model = _registered_model(client, registered_model)
    wanted = str(version).strip().removeprefix("v")
    versions = _version_numbers(client, registered_model)
    if wanted in versions:
        return wanted
    raise PromotionError(
        f"The registered model {registered_model!r} has no version {version!r}; it has "
        f"{_what_it_has(model, versions)}. Pass one of them."
    )


def _version_numbers(client, registered_model: str) -> list[str]:
    """The registered model's version numbers, as strings, in numeric order."""
    found = client.search_model_versions(f"name = '{registered_model}'")
    return sorted((str(version.version) for version in found), key=int)


def _what_it_has(model, versions: Sequence[str]) -> str:
    """e.g. `versions 1, 2 (aliases: champion -> v2)`, for a refusal naming what a registered model offers."""
    aliases = ", ".join(f"{alias} -> v{number}" for alias, number in sorted(model.aliases.items()))
    has = f"versions {', '.join(versions)}" if versions else "no versions"
    return f"{has} (aliases: {aliases})" if aliases else has


def _history_entries(value: str | None, registered_model: str, alias: str) -> list[dict]:
    """The entries of a history tag, oldest first; one edited by hand into something else is refused."""
    try:
        entries = json.loads(value) if value else []
    except json.JSONDecodeError:
        entries = None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) and "version" in entry for entry in entries):
        raise PromotionError(
            f"The tag {history_tag(alias)} of the registered model {registered_model!r} is not the JSON list of "
            "promotions `pets promote` writes; fix or delete it in the MLflow UI."
        )
    return entries


def _capped_history(entries: list[dict]) -> str:
    """The entries as JSON, the oldest dropped until it fits MAX_HISTORY_LENGTH (the newest always fits)."""
    while True:
        value = json.dumps(entries, ensure_ascii=False, separators=(",", ":"))
        if len(value) <= MAX_HISTORY_LENGTH or len(entries) == 1:
            return value
        entries = entries[1:]


@contextmanager
def _registry_lock() -> Iterator[None]:
    """Serialise promotions on a sqlite store (another process may promote at once); a server's store is not locked."""
    from filelock import FileLock

    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield
        return
    with FileLock(f"{uri.removeprefix('sqlite:///')}.promote.lock", timeout=STORE_LOCK_SECONDS):
        yield


def _who() -> str:
    """user@host of this process (the login name from the environment, else the uid's name; `getpass.getuser`)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry, as in some containers (Python 3.11 getpass docs)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def run_url(run: Mapping[str, str]) -> str:
    """Return the run's page in the MLflow UI (`ui_url`)."""
    return f"{ui_url()}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"


def describe(value: Any) -> str:
    """Render a value for a param: JSON for lists and dicts, str otherwise."""
    return json.dumps(value) if isinstance(value, list | dict | tuple) else str(value)


def ui_url() -> str:
    """Return the MLflow UI's address: $PETS_MLFLOW_UI_URL, else the tracking server, else what `pets ui` serves."""
    return _ui_url(tracking_uri())


def compare_url(experiment_id: str, run_ids: Sequence[str]) -> str:
    """Return the UI's compare-runs page for these runs (JSON arrays in a hash-routed URL; MLflow 3.17 MlflowRouter)."""
    runs = quote(json.dumps(list(run_ids)))
    experiments = quote(json.dumps([experiment_id]))
    return f"{ui_url()}/#/compare-runs?runs={runs}&experiments={experiments}"


# -- batch prediction -------------------------------------------------------------------------------------------------
# A prediction run's links, as params (compared in the runs table) and tags (searched): the model version it used,
# how it was named, and the digest of what it labelled (lib/serve/inputs.py `input_digest`).
CACHE_HIT_TAG = "pets.cache_hit"  # "true" when the predictions were the Prefect cache's, not computed by this run


def resolve_model_version(registered_model: str, *, alias: str = CHAMPION_ALIAS, version: str | None = None) -> dict:
    """Return the model version a prediction uses: `version` when given, else the one `alias` points at now.

    An unknown model, alias or version is a PromotionError in one line naming the registered model with the aliases
    and versions it has (`resolve_model`).
    """
    named = f"models:/{registered_model}/{version}" if version is not None else f"models:/{registered_model}@{alias}"
    resolved = resolve_model(named)
    found = _client().get_model_version(registered_model, resolved.version)
    return {
        "registered_model": registered_model,
        "version": resolved.version,
        "alias": resolved.alias,
        "model_uri": resolved.uri,
        "model_id": found.model_id or _logged_model_id(found.source),
    }


def _logged_model_id(source: str) -> str | None:
    """The logged model a version was registered from, by its source `models:/m-<id>`: MLflow 3.17's sqlite registry
    keeps no model_id column (store/model_registry/dbmodels/models.py), so the version's own field is None there."""
    name = source.removeprefix("models:/")
    return name if source.startswith("models:/") and name.startswith("m-") and "/" not in name else None


def download_network(model_uri: str, folder: Path) -> dict:
    """Download a registered model into `folder`; return its pt2 network's path and its metadata (vocab, sizes)."""
    import mlflow
    from mlflow.models import Model

    from tasks.served_model import NETWORK_ARTIFACT

    mlflow.set_tracking_uri(tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder)))
    model = Model.load(local)
    network = model.flavors["python_function"]["artifacts"][NETWORK_ARTIFACT]["path"]
    return {"network": str(local / network), **(model.metadata or {})}


@contextmanager
def prediction_run(experiment: str, run_name: str, tags: Mapping[str, str]) -> Iterator[TrainingRun]:
    """Open an MLflow run for a batch prediction, ended FINISHED, or FAILED (KILLED on Ctrl-C) with the error."""
    experiment_id = ensure_experiment(experiment)
    run = _client().create_run(
        experiment_id, run_name=run_name, tags={key: str(value) for key, value in {**source_tags(), **tags}.items()}
    )
    started = TrainingRun(run.info.run_id, experiment_id, {}, run.info.start_time)
    try:
        yield started
    except KeyboardInterrupt:
        end_run.fn(started.run_id, "KILLED")
        raise
    except BaseException as error:
        end_run.fn(started.run_id, "FAILED", failure=f"{type(error).__name__}: {error}")
        raise
    end_run.fn(started.run_id, "FINISHED")


def log_predictions(
    run_id: str,
    *,
    model: Mapping[str, Any],
    source: str,
    input_digest: str,
    settings: Mapping[str, Any],
    stats: Mapping[str, Any],
    cached: bool,
    files: Sequence[str | Path],
) -> None:
    """Record a batch prediction: the model version (also as the run's input model) and the input's digest as
    params, its counts and throughput as metrics, predictions.csv and the class histogram as artifacts."""
    from mlflow.entities import LoggedModelInput

    links = {
        "registered_model": model["registered_model"],
        "model_version": model["version"],
        "model_alias": model["alias"],
        "model_id": model["model_id"],
        "model_uri": model["model_uri"],
        "input": redact_url(source),
        "input_digest": input_digest,
    }
    log_params(run_id, {**links, **settings, "device": stats["device"], "precision": stats["precision"]})
    set_tags(run_id, {**{key: links[key] for key in ("registered_model", "model_version", "input_digest")},
                      CACHE_HIT_TAG: str(cached).lower()})  # fmt: skip
    counts = ("images", "unreadable", "images_per_second", "seconds")
    log_metrics(run_id, {name: stats[name] for name in counts})
    if model["model_id"]:  # the run's page lists the logged model as its input (MLflow 3.17 `log_inputs(models=)`)
        _client().log_inputs(run_id, models=[LoggedModelInput(model["model_id"])])
    log_files(run_id, files)


class ReviewNotFoundError(InputError):
    """The MLflow run does not exist, or logged no review."""


def logged_review(run_id: str, uri: str | None = None) -> pd.DataFrame:
    """Read back the review table an MLflow run logged (review/review.csv), from the store at `uri` (default:
    `tracking_uri()`); a store that does not answer is a TrackingStoreUnavailableError."""
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from lib.evaluate.review import REVIEW_CSV, REVIEW_DIR

    uri = uri or tracking_uri()
    check_tracking_store(uri)
    client = mlflow.MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ReviewNotFoundError(
            f"No MLflow run {run_id} in the tracking store {redact_url(uri)}: give a training run's id, or "
            "point --tracking-uri at the store that holds it."
        ) from None
    logged = f"{REVIEW_DIR}/{REVIEW_CSV}"
    # one small file: MLflow's download progress bar (mlflow 3.17 mlflow/environment_variables.py) would only come
    # between the command and its output
    with tempfile.TemporaryDirectory() as folder, _environment("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
        try:
            path = client.download_artifacts(run_id, logged, folder)
        except (MlflowException, OSError):
            raise ReviewNotFoundError(
                f"MLflow run {run_id} logged no {logged}: train with a baseline (--baseline) and --label-review "
                "losses to get one."
            ) from None
        return pd.read_csv(path, keep_default_na=False)


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """Set one environment variable for the block, then restore what it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
