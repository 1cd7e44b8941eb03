"""The training stages (baseline, probe, final), in a process apart from the flow's: a kill costs an epoch, not the run.

    python -m lib.train.stages <request.json>            train one stage, then exit (by hand: finish an interrupted
                                                         stage)
    python -m lib.train.stages --serve <folder> <pid>    a stage process: train each stage whose request path
                                                         arrives on standard input (one per line, under <folder>),
                                                         until it closes or the process <pid> that started it dies
    python -m lib.train.stages --rank <runtime JSON> [<request.json>]
                                                         one data-parallel rank, as torchrun starts it
                                                         (lib/train/distributed.py); without a request, a rank of
                                                         another node, told the request by rank 0

The training flow starts one `--serve` process ahead of its first stage, so the interpreter, torch and the plotting
library are loaded while the data stage runs, and sends it every stage in turn (tasks/training.py). For each request
the process builds the trainer from the presized manifest, resumes from the stage's `checkpoints/last.pt` when an
earlier attempt left one (from `previous.pt`, an epoch earlier, when `last.pt` is damaged), runs `fine_tune`, and
writes the model, `history.json` and `loss_curves.png` into the stage folder. It talks to its parent through its
standard output, one JSON object per line:

    {"epoch": {...EpochStats...}, "step": 3}     after every epoch (step: the epoch's index within the stage)
    {"result": {...}}                             once, when the stage is done (a `--serve` process then waits)
    {"error": {"type": "lib.train.trainer.NonFiniteLossError", "message": "..."}}   when it fails with an exception;
                                                  the process then exits, so the next stage starts in a fresh one

A process killed outright (SIGKILL from the OOM killer or a preempted host) writes nothing more: its parent sees the
signal in the exit status, and the last complete epoch is in `last.pt`. Nothing here knows about Prefect or MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lib.common.errors import InputError, UserError, debug_requested
from lib.common.files import write_text_atomically
from lib.common.plots import pyplot
from lib.common.processes import signal_self_when_orphaned
from lib.evaluate.interpret import plot_losses
from lib.recipe import Recipe, RuntimeSettings
from lib.serve.inference import export_classifier
from lib.train import distributed
from lib.train.checkpoint import LAST_CHECKPOINT, previous_checkpoint
from lib.train.distributed import DataParallel
from lib.train.model import count_parameters
from lib.train.trainer import EpochStats, NonFiniteLossError, Trainer, best_epoch, vision_trainer

MODEL_FILE = "model.pth"
HISTORY_FILE = "history.json"
LOSS_CURVES_FILE = "loss_curves.png"
CHECKPOINTS = "checkpoints"


def build_trainer(
    manifest_path: str,
    vocab_path: str,
    recipe: Recipe,
    *,
    checkpoint_dir: Path | None = None,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    on_resume: Callable[[str], None] | None = None,
    parallel: DataParallel | None = None,
    device: torch.device | None = None,
) -> Trainer:
    """Build the vision trainer of the recipe; the model's random parts are seeded, so stages start alike.

    On a data-parallel rank, `device` is the one the rank joined the process group with.
    """
    manifest = pd.read_csv(manifest_path)
    vocab = json.loads(Path(vocab_path).read_text())
    data, runtime = recipe.data, recipe.runtime
    with torch.random.fork_rng(devices=[]):  # seed the head's init without touching the caller's RNG
        if data.seed is not None:
            torch.manual_seed(data.seed)
        return vision_trainer(
            manifest,
            vocab,
            arch=recipe.model.arch,
            pretrained=recipe.model.pretrained,
            presize=data.presize,
            size=data.size,
            min_scale=data.min_scale,
            batch_size=data.bs,
            workers=data.workers,
            compile=runtime.compile,
            seed=data.seed,
            device=device or runtime.device,
            precision=recipe.precision,
            checkpoint_dir=checkpoint_dir,
            on_epoch_end=on_epoch_end,
            on_resume=on_resume,
            parallel=parallel,
        )


def release_device_memory() -> None:
    """Hand the GPU memory this process cached back to the driver, for the process that trains next.

    PyTorch's caching allocator keeps freed blocks (a finished stage's or the LR finder's model and activations)
    reserved, and the flow's process and the stage process are two CUDA contexts that cannot use each other's.
    """
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Run the block on `count` intra-op CPU threads (None: as many as now), then put the count back.

    The recipe's `runtime.threads`: a CPU reduction is split by thread count, so a fixed count repeats a run exactly.
    """
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def last_checkpoint(stage_dir: Path) -> Path:
    """Where a stage keeps the checkpoint of its last complete epoch."""
    return Path(stage_dir) / CHECKPOINTS / LAST_CHECKPOINT


def fine_tune_stage(
    request: Mapping[str, Any],
    on_epoch_end: Callable[[EpochStats, int], None] | None = None,
    *,
    parallel: DataParallel | None = None,
    device: torch.device | None = None,
) -> dict | None:
    """Fine-tune a fresh model the fastai way, resuming from the stage's checkpoint if there is one; export it.

    On a data-parallel rank (`parallel`, which has joined its process group on `device`: `run_rank`) it trains its
    share; rank 0 alone reports, writes and returns the result, the others return None.

    `request` holds the manifest and vocab paths, the recipe (as JSON), the stage folder and `epochs`, `base_lr`,
    `freeze_epochs`, `lr_mult`. `on_epoch_end(row, step)` gets every epoch of the stage once, with its index within the
    stage, as soon as it is known: those restored from the checkpoint first, so a listener that missed some (its
    process died with the stage's) can fill them in. Returns the exported model's path, the history file, the
    loss-curve plot, the stage's numbers and `resumed_epochs`, the epochs an earlier attempt had finished (0 for a
    fresh start). Which checkpoint it resumed from, and any damaged one it moved aside, is one line on stderr.
    """
    stage_dir = Path(request["stage_dir"])
    recipe = Recipe.model_validate(request["recipe"])
    checkpoint = last_checkpoint(stage_dir)
    # A crash between save_checkpoint's two renames leaves only previous.pt: the trainer resumes from it then.
    resume_from = checkpoint if checkpoint.is_file() or previous_checkpoint(checkpoint).is_file() else None
    trained = 0  # epochs this call trains (the rest of the history was restored from the checkpoint)
    reported = 0  # rows of the trainer's history (restored ones included) handed to on_epoch_end so far

    def report_history() -> None:
        nonlocal reported
        for step in range(reported, len(trainer.history)):
            if on_epoch_end is not None:
                on_epoch_end(trainer.history[step], step)
        reported = len(trainer.history)

    def report(row: EpochStats) -> None:
        nonlocal trained
        trained += 1
        report_history()

    trainer = build_trainer(
        request["manifest_path"], request["vocab_path"], recipe, checkpoint_dir=checkpoint.parent, on_epoch_end=report,
        on_resume=lambda line: print(f"{stage_dir.name}: {line}", file=sys.stderr), parallel=parallel, device=device,
    )  # fmt: skip
    trainer.epoch_table = False  # whoever started the stage gets each epoch through on_epoch_end and shows it
    epochs, freeze_epochs = request["epochs"], request["freeze_epochs"]
    threads = recipe.runtime.threads
    if threads is None and parallel is not None and trainer.device.type == "cpu":
        threads = parallel.cpu_threads()
    try:
        with cpu_threads(threads):
            trainer.fine_tune(
                epochs, request["base_lr"], freeze_epochs=freeze_epochs, lr_mult=request["lr_mult"],
                resume_from=resume_from,
            )  # fmt: skip
    except NonFiniteLossError as error:  # the trainer knows the phase and epoch; the stage is named here
        message = str(error)
        raise NonFiniteLossError(f"The {stage_dir.name} stage stopped: {message[:1].lower()}{message[1:]}") from None
    if not trainer.main:
        return None
    report_history()  # a checkpoint of the whole stage trains nothing more, but its epochs are still reported
    history = trainer.history  # the whole stage, including epochs an earlier attempt ran
    model_path = export_classifier(
        stage_dir / MODEL_FILE, trainer.model, arch=recipe.model.arch, vocab=trainer.vocab, size=recipe.data.size,
        presize=recipe.data.presize,
    )  # fmt: skip
    history_path = write_text_atomically(
        stage_dir / HISTORY_FILE, json.dumps([row.as_dict() for row in history], indent=1) + "\n"
    )
    return {
        "stage": stage_dir.name,
        "model": str(model_path),
        "history": str(history_path),
        "loss_curves": str(plot_losses(trainer.smoothed_losses, trainer.valid_points, stage_dir / LOSS_CURVES_FILE)),
        **stage_numbers(history, trainer),
        "base_lr": request["base_lr"],
        "epochs": epochs,
        "freeze_epochs": freeze_epochs,
        "resumed_epochs": len(history) - trained,
    }


def stage_numbers(history: list[EpochStats], trainer: Trainer) -> dict[str, Any]:
    """Summarise a stage: its last epoch's metrics, throughput, time, best epoch, and what actually ran."""
    last = history[-1]
    return {
        "error_rate": last.error_rate,
        "valid_loss": last.valid_loss,
        "accuracy": last.accuracy,
        "train_loss": last.train_loss,
        "images_per_second": sum(row.images_per_second for row in history) / len(history),
        "train_seconds": sum(row.seconds for row in history),
        "best_epoch": best_epoch(history),
        "parameters": count_parameters(trainer.model),
        "precision": trainer.precision.effective,
        "device": str(trainer.device),
    }


def read_history(history_path: str | Path) -> list[EpochStats]:
    """Read a stage's epochs back from its history file."""
    return [EpochStats(**row) for row in json.loads(Path(history_path).read_text())]


# -- the stage process ------------------------------------------------------------------------------------------------
SERVE = "--serve"
RANK = "--rank"


def main(argv: list[str] | None = None) -> int:
    """Run one stage, or serve stages with `--serve FOLDER PID`, reporting on the original standard output.

    A `--serve` process is told its parent's PID: the parent may die while this one still imports torch, and by
    then `os.getppid()` names another process.
    """
    arguments = argv if argv is not None else sys.argv[1:]
    serving = arguments[:1] == [SERVE]
    _exit_with_parent(int(arguments[2]) if serving else os.getppid())
    # Only protocol lines go to the parent: anything else printed, by Python or by C code, lands on stderr.
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr

    def send(message: dict) -> None:
        try:
            channel.write(json.dumps(message) + "\n")
        except BrokenPipeError:  # the parent is gone (killed, or quit at a second Ctrl-C): nobody is left to tell
            os._exit(1)

    if serving:
        return serve(Path(arguments[1]), send, sys.stdin)
    if arguments[:1] == [RANK]:
        runtime, *request_path = arguments[1:]
        request = Path(request_path[0]) if request_path else None
        return 0 if run_rank(RuntimeSettings.model_validate_json(runtime), request, send) else 1
    (request_path,) = arguments
    return 0 if run_request(Path(request_path), send) else 1


def serve(folder: Path, send: Callable[[dict], None], requests: Iterable[str]) -> int:
    """Train the stage of each request path in `requests` (one per line) until they end; stop at the first failure.

    Only requests under `folder`, the runs this process was started for, are trained. The stages share nothing but
    the loaded modules: each builds its own trainer, seeded from its own request, and hands its memory back after.
    """
    folder = Path(folder).resolve()
    pyplot()  # loaded before the first request: the stages' loss-curve plots need it
    for line in requests:
        request_path = Path(line.strip()).resolve()
        if not request_path.is_relative_to(folder):
            message = f"{request_path} is not under {folder}, the folder this stage process trains for"
            send({"error": {"type": "builtins.ValueError", "message": message}})
            return 1
        if not run_request(request_path, send):
            return 1
        release_device_memory()
    return 0


def run_request(request_path: Path, send: Callable[[dict], None]) -> bool:
    """Train the stage a request file describes, sending its epochs and its result (or error); True if it trained.

    A recipe of several processes is trained by torchrun's ranks, each running `run_rank` (`distributed.launch`
    passes rank 0's messages on).
    """
    request = json.loads(Path(request_path).read_text())
    try:
        runtime = Recipe.model_validate(request["recipe"]).runtime
        if distributed.data_parallel(runtime):
            stage_dir = Path(request["stage_dir"])
            worker = ["-m", "lib.train.stages", RANK, runtime.model_dump_json(), str(Path(request_path).resolve())]
            return distributed.launch(runtime, worker, send, stage_dir=stage_dir, checkpoint=last_checkpoint(stage_dir))
        result = fine_tune_stage(request, on_epoch_end=lambda row, step: send({"epoch": row.as_dict(), "step": step}))
    except Exception as error:
        _send_error(error, send)
        return False
    send({"result": result})
    return True


def run_rank(runtime: RuntimeSettings, request_path: Path | None, send: Callable[[dict], None]) -> bool:
    """Train a stage as one of torchrun's ranks: join the others, take rank 0's request, train; True if it trained.

    Rank 0 is given the request (node 0 launched it); ranks on other nodes (`pets join-training`) get its path from
    rank 0, so the stage's folder must be on a file system every node shares at the same path. Rank 0 sends the
    epochs and the result, any rank its error. The ranks leave together, once rank 0 has written the stage's files.
    """
    parallel = DataParallel.from_environment()
    try:
        device = distributed.join(parallel, runtime.device, timeout_seconds=runtime.rdzv_timeout)
        try:
            if parallel.main:
                send({"started": {"world_size": parallel.world_size}})
            shared = Path(distributed.share_rank0_object(str(request_path) if parallel.main else None))
            request = _read_shared_request(shared)
            if parallel.local_rank == 0 and not parallel.main:  # a following node's: `pets join-training` says it
                stage_dir = Path(request["stage_dir"])
                joined = {"stage": stage_dir.name, "run": stage_dir.parent.name, "world_size": parallel.world_size}
                send({"joined": joined})
            result = fine_tune_stage(
                request, lambda row, step: send({"epoch": row.as_dict(), "step": step}), parallel=parallel,
                device=device,
            )  # fmt: skip
            distributed.wait_for_all()
        finally:
            distributed.leave()
    except Exception as error:
        _send_error(error, send)
        return False
    if parallel.main:
        send({"result": result})
    return True


def follow_trainings(runtime: RuntimeSettings, log_path: Path, say: Callable[[str], None]) -> None:
    """Run this node's ranks of every training node 0 starts (`runtime.node_rank` > 0), until interrupted."""
    distributed.follow(runtime, ["-m", "lib.train.stages", RANK, runtime.model_dump_json()], log_path, say)


def _read_shared_request(request_path: Path) -> dict:
    try:
        return json.loads(request_path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{request_path}, the stage node 0 asked for, is not on this node: give every node the same --out-dir "
            "and --cache-dir on a file system they share (NFS, a cluster file system), at the same path"
        ) from None


def _send_error(error: Exception, send: Callable[[dict], None]) -> None:
    if debug_requested() or not isinstance(error, UserError):  # a user error is told once, by the CLI
        traceback.print_exc()
    send({"error": {"type": f"{type(error).__module__}.{type(error).__qualname__}", "message": str(error)}})


def _exit_with_parent(parent: int) -> None:
    """Die when the process that started this one dies (killed, preempted): never train on as an orphan.

    An orphan would hold the GPU and race the retry that resumes the stage.
    """
    signal_self_when_orphaned(parent, signal.SIGKILL, name="exit-with-parent")


def _interrupted() -> None:
    """End as a process SIGINT killed, without a traceback: the parent sent it, to stop the stage between batches."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        _interrupted()
