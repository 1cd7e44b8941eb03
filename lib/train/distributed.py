"""Data-parallel training: torchrun starts one process per device, torch.distributed joins them, DDP syncs gradients.

A stage process whose recipe asks for more than one process (`runtime.nproc_per_node`, `runtime.nnodes`) does not
train itself: `launch` runs torchrun (`torch.distributed.run`), whose ranks each run `python -m lib.train.stages
--rank <runtime JSON> <request.json>` and train the stage together. What a fastai user expects holds:

- `bs` is the global batch: each of the world's processes takes `bs / world` images of every batch, the same images
  the batch of a single process would hold (lib/data/loading.py shards the seeded order), so the learning rates and
  the schedule are unchanged; DDP averages the gradients (PyTorch docs, "DistributedDataParallel").
- The batch augmentation is drawn for the whole global batch and each rank applies its rows, on its own device.
- Validation is sharded without padding or dropping and its sums are reduced over the world; the ranks' BatchNorm
  statistics are averaged first, so every rank evaluates (and rank 0 saves) the same model.
- Only rank 0 writes checkpoints, the history, plots and the exported model, and talks to the stage process: one
  MLflow run however many ranks there are.

What still differs from one process with the same global batch: BatchNorm normalises each rank's share of the batch
with its own statistics (torchvision's reference scripts offer `--sync-bn` on GPUs for this), each rank draws its own
dropout masks, and all-reduce adds the gradients in another order.

The LR finder takes no part: it sweeps in the flow's own process, on one device, before any stage starts
(tasks/training.py), so no rank ever waits in a collective for a peer that is not sweeping, the deadlock fastai's
`lr_find` met under DDP (fastai issues #2485 and #3688: one rank stops its sweep early, the others wait for it). Its
suggestion is for the global batch, which is what every rank's share adds up to.

Messages reach the stage process on rank 0's standard output, one JSON object per line as lib/train/stages.py
describes, plus `{"started": {...}}` once the process group is up; any rank may report an error. A torchrun that ends
without a result is a rank that died (the retry resumes all ranks from rank 0's `last.pt`) or, when no rank ever
started, nodes that never met.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lib.common.errors import UserError
from lib.common.processes import signal_self_when_orphaned
from lib.recipe import RuntimeSettings

# torchrun's agent checks its workers this often; the default, 0.1 s in torch 2.x, lets a dead rank's peers go at once
MONITOR_INTERVAL_SECONDS = 0.1
# How long the ranks of a failed or interrupted torchrun get to exit after it is told to stop, before it is killed.
STOP_GRACE_SECONDS = 10
TORCHRUN_LOG = "torchrun.log"  # in the stage's folder: what torchrun and the ranks print, attempt after attempt


class RankDiedError(UserError, RuntimeError):
    """A rank of a data-parallel stage died without a word (killed); a retry resumes every rank from `last.pt`."""


class RendezvousError(UserError, RuntimeError):
    """The processes of a data-parallel stage never met: a node did not join, or the endpoint does not answer."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks torchrun started (its RANK, LOCAL_RANK and WORLD_SIZE)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int = 1  # the ranks on this node

    @property
    def main(self) -> bool:
        """Whether this is rank 0: the rank that checkpoints, reports and exports."""
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> DataParallel | None:
        """The rank torchrun made this process, or None outside torchrun."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        environment = os.environ
        return cls(
            rank=int(environment["RANK"]),
            local_rank=int(environment.get("LOCAL_RANK", 0)),
            world_size=int(environment["WORLD_SIZE"]),
            local_world_size=int(environment.get("LOCAL_WORLD_SIZE", 1)),
        )

    def cpu_threads(self) -> int:
        """Intra-op threads for a CPU rank: the node's cores shared by its ranks (torchrun itself sets 1)."""
        return max(1, len(os.sched_getaffinity(0)) // self.local_world_size)


def data_parallel(runtime: RuntimeSettings) -> bool:
    """Whether the recipe trains in several processes (on this node or over several nodes)."""
    return runtime.nnodes > 1 or runtime.processes_per_node() > 1


def join(parallel: DataParallel, device: str | None, *, timeout_seconds: int) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on the CPU) and return this rank's device.

    On CUDA each rank takes the GPU of its local rank (torchrun numbers them per node); `timeout_seconds` bounds a
    collective that waits for a rank that is gone.
    """
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device("cuda", parallel.local_rank) if kind == "cuda" else torch.device(kind)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds), device_id=_device_id(chosen))
    return chosen


def _device_id(device: torch.device) -> torch.device | None:
    """NCCL binds its communicator to the GPU at once when told it (PyTorch 2.x init_process_group `device_id`)."""
    return device if device.type == "cuda" else None


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap a model in DDP over the parameters that train now; rebuild it whenever that set changes (freezing).

    DDP registers its gradient hooks for the parameters that require grad when it is built (PyTorch docs,
    DistributedDataParallel: "the set of parameters used must not change"), so an unfrozen body needs a new wrapper.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    # Each rank keeps its own BatchNorm statistics between evaluations, which average them (`average_buffers`).
    # Wrapping still copies rank 0's buffers once; the ranks' are equal then anyway, right after an evaluation.
    # (`forward_sync_buffers` replaces the deprecated `broadcast_buffers` in PyTorch 2.14.)
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """Return the element-wise sum of a tensor over every rank (the tensor is summed in place)."""
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def wait_for_all() -> None:
    """Wait until every rank is here (rank 0 writes the stage's files while the others wait to leave with it)."""
    dist.barrier()


def average_buffers(model: nn.Module) -> None:
    """Average the ranks' floating-point buffers (BatchNorm's running statistics) in place, on every rank.

    Each rank's running mean follows its own share of every batch; their average is the running mean of the whole
    batches, as one process keeps it (the update is linear), and the running variance comes close. timm averages
    them the same way before each evaluation (timm train.py, `--dist-bn reduce`); DDP's default instead copies rank
    0's at every step, statistics of 1/world of the images.
    """
    world_size = dist.get_world_size()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            sum_across(buffer).div_(world_size)


def share_rank0_object(value: object) -> object:
    """Return rank 0's `value` on every rank (a small picklable object: a path, a flag)."""
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


# -- launching ------------------------------------------------------------------------------------------------------
def torchrun_arguments(runtime: RuntimeSettings) -> list[str]:
    """torchrun's options for the recipe's processes and nodes (PyTorch 2.x docs, "torchrun (Elastic Launch)").

    One node: `--standalone` (a rendezvous on a free local port). Several: the static rendezvous, whose ranks follow
    the node ranks, so global rank 0, which reports to the flow, is local rank 0 of node 0.
    """
    arguments = [
        f"--nproc-per-node={runtime.processes_per_node()}",
        "--max-restarts=0",  # a dead rank fails the stage; the Prefect task's retry resumes it from the checkpoint
        f"--monitor-interval={MONITOR_INTERVAL_SECONDS}",
    ]
    if runtime.nnodes == 1:
        return [*arguments, "--standalone"]
    return [
        *arguments,
        f"--nnodes={runtime.nnodes}",
        f"--node-rank={runtime.node_rank}",
        "--rdzv-backend=static",
        f"--rdzv-endpoint={runtime.rdzv_endpoint}",
        f"--rdzv-conf=timeout={runtime.rdzv_timeout}",
    ]


def launcher_command(runtime: RuntimeSettings, worker: list[str]) -> list[str]:
    """The command that runs torchrun for `worker` (a `-m module args` list), ending with the process that runs it."""
    return [sys.executable, "-m", "lib.train.distributed", str(os.getpid()), *torchrun_arguments(runtime), *worker]


def launch(
    runtime: RuntimeSettings, worker: list[str], send: Callable[[dict], None], *, stage_dir: Path, checkpoint: Path
) -> bool:
    """Run `worker` on every rank through torchrun, passing rank 0's messages to `send`; True if it sent a result.

    A stage that failed sends one error: the one a rank reported, or RankDiedError (a rank killed after the ranks
    met) or RendezvousError (they never met) built here from how torchrun ended. What torchrun and the ranks print
    goes to `<stage_dir>/torchrun.log` (its report of a failure names the rank, its exit code or signal).
    """
    log_path = Path(stage_dir) / TORCHRUN_LOG
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            launcher_command(runtime, worker), stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1
        )
    failure = {"runtime": runtime, "stage": Path(stage_dir).name, "checkpoint": checkpoint, "log": log_path}
    started = result = error = None
    killed: dict[int, int] = {}  # rank: the signal that ended it
    try:
        for line in process.stdout:
            message = _message(line)
            if message is None:
                sys.stderr.write(line)  # not ours: a library's print
            elif "started" in message:
                started = message["started"]
            elif "failures" in message:
                killed = _killed_ranks(message["failures"])
            elif "error" in message:
                error = error or message  # the first: a rank's failure makes the others fail after it
            elif "result" in message:
                result = message  # held until every rank has ended well
            elif "epoch" in message:
                send(message)
        returncode = process.wait()
    except BaseException:  # Ctrl-C reached this process: stop the ranks between batches, then go
        stop(process)
        raise
    if result is not None and returncode == 0:
        send(result)
        return True
    # A killed rank is the cause: the others' errors (a peer's connection reset) follow from it.
    send(_failure(started, returncode, killed=killed, **failure) if killed or error is None else error)
    return False


def _message(line: str) -> dict | None:
    with suppress(ValueError):
        message = json.loads(line)
        if isinstance(message, dict) and message.keys() & {"started", "joined", "epoch", "result", "error", "failures"}:
            return message
    return None


def _killed_ranks(failures: dict[str, dict]) -> dict[int, int]:
    """{rank: signal} of the ranks a signal ended; SIGTERM only when nothing else did (torchrun's agent sends it to
    the survivors of a rank that died)."""
    killed = {int(rank): -failure["exitcode"] for rank, failure in failures.items() if failure["exitcode"] < 0}
    first = {rank: number for rank, number in killed.items() if number != signal.SIGTERM}
    return first or killed


def _failure(
    started: dict | None,
    returncode: int,
    *,
    killed: dict[int, int],
    runtime: RuntimeSettings,
    stage: str,
    checkpoint: Path,
    log: Path,
) -> dict:
    if killed or started is not None:
        how = ", ".join(f"rank {rank} by {signal.Signals(number).name}" for rank, number in sorted(killed.items()))
        how = how or f"torchrun exited with status {returncode}"
        world = f"{started['world_size']} processes" if started else f"{runtime.processes_per_node()} processes here"
        error = RankDiedError(
            f"A training process of the {stage} stage ({world}) died without a word ({how}; torchrun's log: {log}). "
            f"The last complete epoch is in {checkpoint}; a retry resumes every rank from there. Killed every time, "
            "it most often ran out of memory: lower --bs or --workers."
        )
    elif runtime.nnodes > 1:
        error = RendezvousError(
            f"The {runtime.nnodes} nodes of the {stage} stage did not meet at {runtime.rdzv_endpoint} within "
            f"{runtime.rdzv_timeout} s: start `pets join-training` with the same --nnodes and --rdzv-endpoint on "
            f"every other node, and check that node 0 can listen there and the others reach it (torchrun's log: "
            f"{log})."
        )
    else:
        error = RendezvousError(
            f"torchrun could not start the {stage} stage's {runtime.processes_per_node()} processes (exit status "
            f"{returncode}); its log says why: {log}"
        )
    return {"error": {"type": f"{__name__}.{type(error).__name__}", "message": str(error)}}


def stop(process: subprocess.Popen) -> None:
    """Stop a torchrun: SIGINT (its agent stops the ranks), then SIGKILL after STOP_GRACE_SECONDS."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Between two trainings: the torchrun of node 0 that just ended still closes the rendezvous store it held.
FOLLOW_PAUSE_SECONDS = 2


def follow(runtime: RuntimeSettings, worker: list[str], log_path: Path, say: Callable[[str], None]) -> None:
    """Take part, as node `runtime.node_rank`, in every training node 0 starts, one stage after another, until
    interrupted (`pets join-training`).

    Each round runs torchrun for `worker` and waits at the rendezvous endpoint (up to the rendezvous timeout, then
    again) for node 0's next stage. What torchrun prints goes to `log_path`; each stage joined and how it ended is
    one line through `say`.
    """
    say(
        f"Node {runtime.node_rank} of {runtime.nnodes}: waiting for node 0's trainings at {runtime.rdzv_endpoint} "
        f"with {runtime.processes_per_node()} process(es); Ctrl-C stops. torchrun's log: {log_path}"
    )
    while True:
        with open(log_path, "a") as log:
            process = subprocess.Popen(
                launcher_command(runtime, worker), stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1
            )
        try:
            joined = _follow_round(process, say)
        except BaseException:
            stop(process)
            raise
        if joined is not None and process.returncode == 0:
            say(f"Trained the {joined} stage with node 0.")
        time.sleep(FOLLOW_PAUSE_SECONDS)


def _follow_round(process: subprocess.Popen, say: Callable[[str], None]) -> str | None:
    """Relay one torchrun round of a following node; return the stage it joined, if it joined one."""
    joined = None
    for line in process.stdout:
        message = _message(line)
        if message is not None and "joined" in message:
            joined = message["joined"]["stage"]
            say(f"Joined the {joined} stage of run {message['joined']['run']} ({message['joined']['world_size']} "
                "processes).")  # fmt: skip
        elif message is not None and "error" in message:
            say(f"The {joined or 'next'} stage failed here: {message['error']['message']}")
    process.wait()
    return joined


def _run_torchrun(argv: list[str]) -> None:
    """`python -m lib.train.distributed PARENT_PID TORCHRUN_ARGS...`: torchrun that stops when PARENT_PID is gone.

    torchrun does not watch the process that started it; killed outright, the stage process would leave the ranks
    training on. SIGTERM makes torchrun's agent stop its ranks first (torch.distributed.elastic.agent).
    """
    parent, *arguments = argv
    signal_self_when_orphaned(int(parent), signal.SIGTERM, name="torchrun-exit-with-parent")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(arguments)
    except ChildFailedError as error:  # which ranks failed, and how: a rank killed by a signal is retried
        failures = {rank: {"exitcode": failure.exitcode} for rank, failure in error.failures.items()}
        print(json.dumps({"failures": failures}), flush=True)
        raise


if __name__ == "__main__":
    _run_torchrun(sys.argv[1:])
