"""Data-parallel scaling: one process against two gloo ranks on the CPU, the all-reduce's cost, and its GPU volume.

1. The probe stage (one frozen epoch, then `--epochs` unfrozen) trains the same generated pets twice through the
   project's stage runner: once in one process, once as two torchrun ranks (gloo) sharing the same global batch and
   the machine's cores. The figure is the ratio of their training images/s over the unfrozen epochs.
2. Two gloo processes all-reduce a tensor of the model's gradient size (fp32, as DDP reduces it) and time one
   forward + backward on a rank's share of the batch: the communication's share of a step, were nothing overlapped
   (DDP overlaps its 25 MB buckets with the backward pass: PyTorch docs, DistributedDataParallel `bucket_cap_mb`).
3. For resnet50 and resnet101, the bytes a GPU sends per step in a ring all-reduce (2 (N - 1) / N times the
   gradients' size, N GPUs) and the time that takes over NVLink and over PCIe.

    python -m bench.data_parallel                        # resnet18 at 64 px, bs 32, 2 unfrozen epochs
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench.common import base_parser, bench_pets, emit, reference_model, rounded
from lib.recipe import Recipe
from lib.train.stages import fine_tune_stage, run_request

# Per-direction bandwidth of one GPU's links: NVLink 4 on H100/H200 SXM is 900 GB/s both ways (NVIDIA H100 Tensor
# Core GPU datasheet); PCIe 5.0 x16 is 64 GB/s each way (PCI-SIG, PCIe 5.0 specification: 32 GT/s per lane).
LINK_BYTES_PER_SECOND = {"nvlink4": 450e9, "pcie5_x16": 64e9}
GPUS = 8  # a node of 8 GPUs: the ring's N
TARGET_EFFICIENCY = 0.7  # two ranks on the same cores keep at least 70% of one process's images/s
ALL_REDUCE_REPEATS = 10


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0], size=64, presize=96, batch_size=32)
    parser.add_argument("--epochs", type=int, default=2, help="unfrozen epochs after the frozen one")
    args = parser.parse_args(argv)
    manifest, vocab = bench_pets(args)
    folder = Path(args.data_dir) / "data_parallel"
    folder.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(folder / "presized.csv", index=False)
    (folder / "vocab.json").write_text(json.dumps(list(vocab)))

    rates = {processes: stage_images_per_second(args, folder, processes) for processes in ("1", "2")}
    efficiency = rates["2"] / rates["1"]
    gradients = sum(parameter.numel() for parameter in reference_model(args.arch, len(vocab)).parameters())
    communication, computation = all_reduce_against_step(args, len(vocab), gradients)
    figures = {
        "arch": args.arch,
        "size": args.size,
        "batch_size": args.bs,
        "cpus": len(os.sched_getaffinity(0)),
        "one_process_images_per_second": rates["1"],
        "two_ranks_images_per_second": rates["2"],
        "two_ranks_to_one_process": efficiency,
        "gradient_megabytes": gradients * 4 / 1e6,
        "gloo_all_reduce_milliseconds": communication * 1e3,
        "rank_forward_backward_milliseconds": computation * 1e3,
        "all_reduce_share_of_step": communication / (communication + computation),
        "ring_all_reduce_per_gpu": {arch: ring_volume(arch, len(vocab)) for arch in ("resnet50", "resnet101")},
    }
    return emit(
        "data_parallel",
        torch.device("cpu"),
        rounded(figures),
        {f"two_ranks_at_least_{TARGET_EFFICIENCY}": efficiency >= TARGET_EFFICIENCY},
    )


def stage_images_per_second(args, folder: Path, processes: str) -> float:
    """Median training images/s of the probe stage's unfrozen epochs, in one process or `processes` ranks."""
    recipe = Recipe().updated(
        {"arch": args.arch, "pretrained": False, "presize": args.presize, "size": args.size, "bs": args.bs,
         "seed": 0, "fp16": False, "device": "cpu", "workers": 0, "nproc_per_node": processes}
    ).model_dump(mode="json")  # fmt: skip
    stage_dir = folder / f"ranks-{processes}"
    stage_dir.mkdir(exist_ok=True)
    for stale in stage_dir.glob("checkpoints/*.pt"):  # a rerun measures training, not resuming
        stale.unlink()
    request = {
        "manifest_path": str(folder / "presized.csv"), "vocab_path": str(folder / "vocab.json"), "recipe": recipe,
        "stage_dir": str(stage_dir), "epochs": args.epochs, "base_lr": 1e-3, "freeze_epochs": 1, "lr_mult": 100.0,
    }  # fmt: skip
    if processes == "1":
        history = fine_tune_stage(request)["history"]
    else:
        path = stage_dir / "request.json"
        path.write_text(json.dumps(request))
        messages = []
        if not run_request(path, messages.append):
            raise SystemExit(f"the two-rank stage failed: {messages[-1]}")
        history = messages[-1]["result"]["history"]
    rows = json.loads(Path(history).read_text())
    return statistics.median(row["images_per_second"] for row in rows if row["phase"] == "unfrozen")


def all_reduce_against_step(args, classes: int, gradients: int) -> tuple[float, float]:
    """(median seconds of one gloo all-reduce of the gradients, of one rank's forward + backward), two processes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_measure_rank, args=(port, args.arch, classes, args.bs // 2, args.size, gradients, results), nprocs=2)
    return results.get()


def _measure_rank(rank: int, port: int, arch: str, classes: int, batch: int, size: int, gradients: int, results):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // 2))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        flat = torch.ones(gradients)
        reduce_times, step_times = [], []
        for _ in range(ALL_REDUCE_REPEATS):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(flat)
            reduce_times.append(time.perf_counter() - started)
        model = reference_model(arch, classes).train()
        inputs, targets = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
        for _ in range(3):
            started = time.perf_counter()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            step_times.append(time.perf_counter() - started)
        if rank == 0:
            results.put((statistics.median(reduce_times), statistics.median(step_times[1:])))
    finally:
        dist.destroy_process_group()


def ring_volume(arch: str, classes: int) -> dict:
    """Gradient bytes, the bytes each GPU sends per step in a ring all-reduce over GPUS GPUs, and the link times."""
    parameters = sum(parameter.numel() for parameter in reference_model(arch, classes).parameters())
    gradient_bytes = parameters * 4  # DDP reduces gradients in the parameters' dtype: fp32, even under autocast
    sent = 2 * (GPUS - 1) / GPUS * gradient_bytes
    return rounded(
        {
            "parameters_millions": parameters / 1e6,
            "gradient_megabytes": gradient_bytes / 1e6,
            f"sent_megabytes_per_gpu_{GPUS}_gpus": sent / 1e6,
            **{f"{link}_milliseconds": sent / rate * 1e3 for link, rate in LINK_BYTES_PER_SECOND.items()},
        }
    )


if __name__ == "__main__":
    main()
