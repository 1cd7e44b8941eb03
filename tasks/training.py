"""Prefect tasks of the training stage: each runs one lib step over the presized manifest, writes its outputs under
`<out_dir>/<stage>/` and returns paths and small numbers (never a model or a loader).

`recipe` is the run's `lib.recipe.Recipe`: every stage reads its data, model and runtime settings from it. The
fine-tuning stages run in a process apart from the flow's, so a stage killed mid-epoch is retried and resumes (see
`fine_tune_classifier`); `stage_process` starts that process ahead of the first stage and serves every stage of a
flow run from it, with one more process for each stage that trains at the same time as another.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from functools import partial
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from lib.common.errors import UserError
from lib.common.files import write_text_atomically
from lib.common.numbers import significant
from lib.evaluate.evaluation import validation_images, validation_predictions
from lib.evaluate.interpret import Predictions, write_interpretation
from lib.evaluate.tta import tta_predictions
from lib.recipe import Recipe
from lib.train.checkpoint import previous_checkpoint
from lib.train.distributed import RankDiedError
from lib.train.lr_finder import lr_find, plot_lr_find
from lib.train.stages import SERVE, build_trainer, cpu_threads, last_checkpoint, release_device_memory
from lib.train.trainer import EpochStats
from tasks import tracking
from tasks.progress import ProgressArtifact

LR_FIND_METHODS = ("valley", "steep", "minimum", "slide")  # valley first: fastai 2.8's default suggestion
REQUEST_FILE = "request.json"

# A stage whose process is killed outright (the OOM killer, a preempted host, `kill -9`) is retried by Prefect and
# resumes from the checkpoint of its last complete epoch. Twice is enough for a transient kill; a stage that is
# killed every time (memory that never suffices) then fails instead of looping.
STAGE_RETRIES = 2
STAGE_RETRY_DELAY_SECONDS = 2
STOP_GRACE_SECONDS = 10  # how long a stage process that failed gets to exit by itself before it is stopped
# How long a training stage process gets to stop between batches after SIGINT before it is killed: Ctrl-C must end
# the whole command within 5 s, and the checkpoint of the last complete epoch is on disk already.
INTERRUPT_GRACE_SECONDS = 3
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])  # where `python -m lib.train.stages` finds the lib package


class StageKilledError(UserError, RuntimeError):
    """The training stage's process was killed by a signal; the retry resumes from the stage's `last.pt`."""


class StageFailedError(RuntimeError):
    """The training stage's process failed with an exception this process cannot rebuild; the message has it."""


def _retry_when_killed(task, task_run, state) -> bool:
    """Retry only kills (of the stage process, or of a data-parallel rank): an exception in the stage (a diverging LR,
    a bad manifest) or nodes that never met (their rendezvous waited its timeout already) would happen again."""
    return isinstance(state.data, (StageKilledError, RankDiedError))


def _progress_reporter(run_id: str, stage: str, total_epochs: int) -> Callable[[EpochStats, int], None]:
    """Log each epoch to MLflow at its step within the stage, as one line to the run's log, and move a Prefect
    progress bar for the stage.

    Steps MLflow already has (logged by an attempt that was then killed) are not logged twice; epochs a resumed
    stage restores that MLflow lacks (the attempt died between its checkpoint and its report) are filled in.
    """
    logger = get_run_logger()  # the terminal and the flow run's log in Prefect
    progress_id = create_progress_artifact(0.0, description=f"{stage}: epochs done")
    logged = tracking.logged_steps(run_id, f"{stage}/{tracking.EPOCH_METRICS[0]}")

    def report(row: EpochStats, step: int) -> None:
        restored = step in logged
        if not restored:
            tracking.log_metrics(run_id, tracking.epoch_metrics(row, stage), step=step)
            logged.add(step)
        logger.info(epoch_line(row, stage=stage, step=step, steps=total_epochs, restored=restored))
        update_progress_artifact(progress_id, 100.0 * (step + 1) / total_epochs)

    return report


def epoch_line(row: EpochStats, *, stage: str, step: int, steps: int, restored: bool = False) -> str:
    """One epoch as one log line: the stage, the epoch (and its phase), the losses, the error rate and the time."""
    minutes, seconds = divmod(round(row.seconds), 60)
    line = (
        f"{stage} epoch {step + 1}/{steps} ({row.phase} {row.epoch + 1}/{row.epochs}): "
        f"train_loss {significant(row.train_loss)}, valid_loss {significant(row.valid_loss)}, "
        f"error_rate {significant(row.error_rate)}, time {minutes:02d}:{seconds:02d}"
    )
    return line + (" (restored from the checkpoint of an earlier attempt)" if restored else "")


def seeded_for_run(recipe: Recipe, run_id: str) -> Recipe:
    """The recipe with a seed: its own, or without one a seed drawn from the MLflow run's id, so that a resumed
    attempt draws what the first one drew (one seed per MLflow run)."""
    return recipe if recipe.data.seed is not None else recipe.updated({"seed": int(run_id[:15], 16)})


@task(
    cache_policy=NO_CACHE,
    task_run_name="fine-tune-{stage}",
    retries=STAGE_RETRIES,
    retry_delay_seconds=STAGE_RETRY_DELAY_SECONDS,
    retry_condition_fn=_retry_when_killed,
)
def fine_tune_classifier(
    manifest_path: str,
    vocab_path: str,
    out_dir: str,
    recipe: Recipe,
    *,
    stage: str,
    epochs: int,
    base_lr: float,
    freeze_epochs: int,
    lr_mult: float,
    run_id: str,
) -> dict:
    """Fine-tune a fresh model the fastai way (frozen epochs, then unfrozen with discriminative LRs); export it.

    The stage trains in the flow run's stage process (`lib.train.stages`, see `stage_process`), writing
    `<out_dir>/<stage>/checkpoints/last.pt` after every epoch. If that process is killed, Prefect retries this task
    in a fresh one and the new attempt resumes from the checkpoint, so the result equals an uninterrupted run's.
    Every epoch is logged to MLflow as `<stage>/<metric>` at its step within the stage. Returns the exported model's
    path, the history file, the loss-curve plot and the stage's numbers.
    """
    stage_dir = Path(out_dir) / stage
    recipe = seeded_for_run(recipe, run_id)
    request = {
        "manifest_path": str(Path(manifest_path).resolve()),
        "vocab_path": str(Path(vocab_path).resolve()),
        "recipe": recipe.model_dump(mode="json"),
        "stage_dir": str(stage_dir.resolve()),
        "epochs": epochs,
        "base_lr": base_lr,
        "freeze_epochs": freeze_epochs,
        "lr_mult": lr_mult,
    }
    request_path = write_text_atomically(stage_dir / REQUEST_FILE, json.dumps(request, indent=1) + "\n")
    last = last_checkpoint(stage_dir)
    if last.is_file() or previous_checkpoint(last).is_file():  # the stage process says which one it resumes from
        print(f"{stage}: resuming from the checkpoints in {last.parent} (an earlier attempt was interrupted).")
    result = run_stage_process(request_path, _progress_reporter(run_id, stage, freeze_epochs + epochs))
    if result["resumed_epochs"]:
        print(f"{stage}: resumed after {result['resumed_epochs']} complete epochs of an interrupted attempt.")
    return result


class StageProcess:
    """A `python -m lib.train.stages --serve <folder> <pid>` process: it trains the stages it is sent, one at a time.

    It loads torch from the moment it is created; `train` sends it a request and waits for the stage's epochs and
    result. One that failed, was killed or was interrupted is stopped and never sent another stage.
    """

    def __init__(self, folder: Path):
        self.training = False
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([PROJECT_ROOT, os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "lib.train.stages", SERVE, str(Path(folder).resolve()), str(os.getpid())]
        # A session of its own: the terminal's Ctrl-C reaches the flow's process alone, which stops this one in
        # order (`stop`); it dies with its parent by itself (lib.train.stages watches the PID it is given).
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=environment,
            start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def train(self, request_path: Path, on_epoch: Callable[[EpochStats, int], None]) -> dict:
        """Train the stage of a request file, pass each epoch to on_epoch(row, step), return the stage's result.

        Raises StageKilledError when a signal kills the process, the stage's own exception when it fails (rebuilt
        from its type and message), and stops the process before re-raising anything that interrupts the wait
        (Ctrl-C).
        """
        error = None
        try:
            self.training = True
            with suppress(BrokenPipeError):  # it died while it waited: its exit status below says how
                self.process.stdin.write(f"{Path(request_path).resolve()}\n")
            for line in self.process.stdout:
                message = json.loads(line)
                if "epoch" in message:
                    on_epoch(EpochStats(**message["epoch"]), message["step"])
                elif "result" in message:
                    self.training = False
                    return message["result"]
                elif "error" in message:
                    error = message["error"]
                    break
        except BaseException:
            self.stop()
            raise
        if error is not None:  # it reported its error and exits by itself: a signal now would hide the error
            self.training = False
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_GRACE_SECONDS)
            self.stop()
            raise _rebuilt(error)
        returncode = self.stop()  # it is gone already
        if returncode < 0:
            name, stage_dir = signal.Signals(-returncode).name, Path(request_path).parent
            if -returncode == signal.SIGINT:
                raise KeyboardInterrupt(f"the training stage was interrupted ({name})")
            raise StageKilledError(
                f"The training process {self.pid} ({stage_dir.name} stage) was killed by {name}. Its last complete "
                f"epoch is in {last_checkpoint(stage_dir)}; a retry resumes from there. Killed every time, it most "
                "often ran out of memory (the kernel's OOM killer; `dmesg` says so): lower --bs or --workers."
            )
        raise StageFailedError(f"The training process {self.pid} exited with status {returncode} and no result.")

    def stop(self) -> int:
        """Make sure the process is gone and return its exit status.

        One that is training gets SIGINT first, so it stops between batches; an idle one has nothing to finish and
        is terminated. Either is killed if it has not exited after INTERRUPT_GRACE_SECONDS.
        """
        if self.alive():
            self.process.send_signal(signal.SIGINT if self.training else signal.SIGTERM)
            try:
                self.process.wait(INTERRUPT_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
        returncode = self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            with suppress(BrokenPipeError):  # unsent input to a process that is gone
                pipe.close()
        return returncode


class _StageProcesses:
    """A flow run's stage processes: one per stage that trains at the same time, and at most one idle between stages.

    Stages that run one after another share one process; stages submitted together (the out-of-fold baselines,
    tasks/label_issues.py) each get a process of their own, and those handed back beyond the first are stopped, so
    the rest of the flow keeps one process (and one CUDA context) as before. Prefect's task threads call `take` and
    `give_back` at once, hence the lock.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.lock = threading.Lock()
        self.idle: StageProcess | None = StageProcess(folder)
        self.busy: set[StageProcess] = set()

    def take(self) -> StageProcess:
        """The idle process if it is still alive, else a fresh one (it was killed, failed a stage, or is busy)."""
        with self.lock:
            process, self.idle = self.idle, None
            if process is None or not process.alive():
                if process is not None:
                    process.stop()
                process = StageProcess(self.folder)
            self.busy.add(process)
            return process

    def give_back(self, process: StageProcess) -> None:
        """Keep a process that finished its stage for the next one, unless one is kept already or it is gone."""
        with self.lock:
            self.busy.discard(process)
            if self.idle is None and process.alive():
                self.idle, process = process, None
        if process is not None:
            process.stop()

    def close(self) -> None:
        """Stop every process, the ones still training too (the flow is ending: Ctrl-C, or a failed stage)."""
        with self.lock:
            processes = [*self.busy, *([self.idle] if self.idle is not None else [])]
            self.idle, self.busy = None, set()
        for process in processes:
            process.stop()


_STAGE_PROCESSES: ContextVar[_StageProcesses | None] = ContextVar("stage_processes", default=None)


@contextmanager
def stage_process(folder: str | Path) -> Iterator[None]:
    """Start a stage process for the runs under `folder` now; train every stage of the block in it; stop it after.

    A flow opens this first, so the process loads its modules while the flow starts its MLflow run and prepares the
    data. A process that dies (killed, or after a failed stage) is replaced by a fresh one at the next stage.
    """
    processes = _StageProcesses(Path(folder).resolve())
    token = _STAGE_PROCESSES.set(processes)
    try:
        yield
    finally:
        _STAGE_PROCESSES.reset(token)
        processes.close()


def run_stage_process(request_path: Path, on_epoch: Callable[[EpochStats, int], None]) -> dict:
    """Train a request's stage in the flow's stage process, or, outside `stage_process`, in a process of its own.

    Returns the stage's result and raises as `StageProcess.train` does.
    """
    processes = _STAGE_PROCESSES.get()
    if processes is None:
        process = StageProcess(Path(request_path).resolve().parents[1])  # <out_dir>/<run id>/<stage>/request.json
        try:
            return process.train(request_path, on_epoch)
        finally:
            process.stop()
    process = processes.take()
    try:
        return process.train(request_path, on_epoch)  # a process that raised is stopped already
    finally:
        processes.give_back(process)


def _rebuilt(error: Mapping[str, str]) -> Exception:
    """Raise the stage's exception again in this process: the same type for the project's and Python's errors."""
    module, _, name = error["type"].rpartition(".")
    if module == "builtins" or module.startswith("lib."):
        found = getattr(importlib.import_module(module), name, None)
        if isinstance(found, type) and issubclass(found, Exception):
            try:
                return found(error["message"])
            except TypeError:  # its constructor takes other arguments: the same type, with the message alone
                rebuilt = found.__new__(found)
                Exception.__init__(rebuilt, error["message"])
                return rebuilt
    return StageFailedError(f"{error['type']}: {error['message']}")


@task(cache_policy=NO_CACHE)
def find_learning_rate(manifest_path: str, vocab_path: str, out_dir: str, recipe: Recipe) -> dict:
    """Run fastai's LR finder on a fresh model (frozen when pretrained, as `vision_learner` leaves it); plot it.

    Returns every suggestion, the one the recipe uses (valley, fastai 2.8's default) and the plot's path.
    """
    trainer = build_trainer(manifest_path, vocab_path, recipe)
    get_run_logger().info("lr_find: sweeping learning rates over training batches of a fresh model")
    progress = ProgressArtifact("lr_find: batches of the LR sweep")
    with cpu_threads(recipe.runtime.threads):
        result = lr_find(trainer, methods=LR_FIND_METHODS, on_progress=progress)
    progress.finish()  # a sweep that diverged stopped early: it is done all the same
    del trainer
    release_device_memory()  # the probe trains next, in the stage process: leave it the GPU
    plot = plot_lr_find(result, Path(out_dir) / "lr_find" / "lr_find.png")
    return {
        "suggestion": result.suggestions["valley"].lr,
        "suggestions": {method: found.lr for method, found in result.suggestions.items()},
        "plot": str(plot),
        "stopped_early": result.stopped_early,
        "iterations": len(result.lrs),
    }


def prediction_settings(recipe: Recipe) -> dict:
    """The recipe's settings `validation_predictions` and `tta_predictions` take: how the images are read, and the
    device and precision a model predicts them on."""
    data, runtime = recipe.data, recipe.runtime
    return {
        "presize": data.presize, "size": data.size, "batch_size": data.bs, "workers": data.workers,
        "device": runtime.device, "precision": recipe.precision,
    }  # fmt: skip


@task(cache_policy=NO_CACHE)
def evaluate_classifier(model_path: str, manifest_path: str, vocab_path: str, out_dir: str, recipe: Recipe) -> dict:
    """Evaluate an exported model on the validation set, with no optimizer: metrics and the interpretation files.

    The files are predictions.pt (`Predictions.load` reads it), confusion_matrix.png, most_confused.txt, top_losses.png.
    With the recipe's `schedule.tta`, the metrics come again with test-time augmentation as `tta_valid_loss`,
    `tta_accuracy` and `tta_error_rate` (seeded by `data.seed`); the files describe the plain predictions.
    """
    manifest = pd.read_csv(manifest_path)
    vocab = json.loads(Path(vocab_path).read_text())
    data, runtime = recipe.data, recipe.runtime
    settings = prediction_settings(recipe)
    # one validation pass serves the metrics, the interpretation and the plain side of the TTA blend
    with cpu_threads(runtime.threads):
        predictions = validation_predictions(Path(model_path), manifest, vocab, **settings)
        tta = None
        if recipe.schedule.tta:
            tta = tta_predictions(
                Path(model_path), manifest, vocab, min_scale=data.min_scale, seed=data.seed, plain=predictions,
                **settings,
            )  # fmt: skip
    evaluation_dir = Path(out_dir) / "evaluation"
    images = partial(validation_images, manifest, presize=data.presize, size=data.size)
    files = {
        "predictions": predictions.save(evaluation_dir / "predictions.pt"),
        **write_interpretation(predictions, vocab, images, evaluation_dir),
    }
    size_mb = Path(model_path).stat().st_size / 2**20
    metrics = _metrics(predictions)
    if tta is not None:
        metrics.update({f"tta_{name}": value for name, value in _metrics(tta).items()})
    return {**metrics, "model_size_mb": size_mb, "files": {name: str(path) for name, path in files.items()}}


def _metrics(predictions: Predictions) -> dict[str, float]:
    return {
        "valid_loss": float(predictions.losses.double().mean()),
        "accuracy": predictions.accuracy(),
        "error_rate": predictions.error_rate(),
    }
