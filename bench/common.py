"""What every benchmark shares: generated pets, the model-only reference loop, machine facts and one-line JSON output.

Each benchmark compares figures measured in the same process on the same data, model and batch size, because these
machines are shared and absolute times drift by several times between runs. Repeated measurements alternate between
the two sides and report medians, so a burst of load from a neighbour hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from lib.data.cleaning import clean_images
from lib.data.labelling import label_images
from lib.data.presize import PresizeCache, presize_images
from lib.data.splitting import split_manifest
from lib.data.synthetic import make_pets_dataset
from lib.train.model import create_model
from lib.train.precision import resolve_precision
from lib.train.trainer import make_optimizer, resolve_device

BENCH_DIR = Path(os.environ.get("PETS_BENCH_DIR", "outputs/bench"))
# Oxford-IIIT Pet originals are mostly 300-500 px on a side (fastbook ch. 5); the generated ones are drawn alike.
PET_MIN_SIDE, PET_MAX_SIDE = 300, 500


def base_parser(
    description: str, *, size: int = 128, presize: int = 256, batch_size: int = 32
) -> argparse.ArgumentParser:
    """Return a parser with the options every training benchmark takes (defaults: the CPU setting of issue 5)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--arch", default="resnet18", help="torchvision architecture (random init)")
    parser.add_argument("--size", type=int, default=size, help="training image side in pixels")
    parser.add_argument("--presize", type=int, default=presize, help="presize cache side in pixels")
    parser.add_argument("--bs", type=int, default=batch_size, help="batch size")
    parser.add_argument("--breeds", type=int, default=10, help="generated breeds")
    parser.add_argument("--per-breed", type=int, default=40, help="generated images per breed")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present, else CPU)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="training precision")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the project's choice)")
    parser.add_argument("--data-dir", type=Path, default=BENCH_DIR, help="where generated images and caches live")
    return parser


def machine(device: torch.device) -> dict[str, Any]:
    """Describe where the numbers were measured: CPU model and cores, torch build and threads, GPU name."""
    facts = {
        "cpu": _cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device.type,
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def emit(benchmark: str, device: torch.device, figures: dict[str, Any], targets: dict[str, bool]) -> dict[str, Any]:
    """Print one JSON line: the benchmark, the machine, its figures and whether each target is met."""
    record = {
        "benchmark": benchmark,
        "machine": machine(device),
        **figures,
        "targets": targets,
        "met": all(targets.values()),
    }
    print(json.dumps(record), flush=True)
    return record


def generated_pets(data_dir: Path, *, breeds: int, per_breed: int, seed: int = 0) -> Path:
    """Generate Oxford-style pets once per (breeds, per_breed, seed) under data_dir and return the images folder."""
    root = Path(data_dir) / f"pets-{breeds}x{per_breed}-seed{seed}"
    done = root / ".complete"
    if not done.exists():
        make_pets_dataset(
            root, breeds=breeds, images_per_breed=per_breed, seed=seed, min_side=PET_MIN_SIDE, max_side=PET_MAX_SIDE
        )
        done.touch()
    return root / "images"


def prepared_pets(
    images_dir: Path, cache_dir: Path, *, presize: int, seed: int = 0
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Run the real data stage (label, clean, split, presize) and return (split manifest, vocab)."""
    labelled = label_images(images_dir).manifest
    kept = clean_images(labelled, progress=False, presize_cache=PresizeCache(cache_dir, presize)).kept
    split = split_manifest(kept, seed=seed)
    presized = presize_images(split.manifest, cache_dir, presize=presize, progress=False).manifest
    return presized, split.vocab


def bench_pets(args: argparse.Namespace) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Generated pets for the parsed options, presized into the benchmark's own cache."""
    images = generated_pets(args.data_dir, breeds=args.breeds, per_breed=args.per_breed)
    return prepared_pets(images, args.data_dir / "cache", presize=args.presize)


def model_only_throughput(
    model: nn.Module,
    *,
    batch_size: int,
    size: int,
    batches: int,
    device: torch.device,
    channels_last: bool,
    precision: str = "fp32",
    warmup: int = 2,
) -> float:
    """Images/s of forward + loss + backward + AdamW on one batch already in device memory: the model's limit.

    Same optimizer (fastai's Adam as AdamW over the parameter groups), precision policy and memory format as the
    project's Trainer; no data loading, augmentation, schedule, metrics or host-device syncs.
    """
    policy = resolve_precision(precision, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    optimizer = make_optimizer(model)
    scaler = policy.grad_scaler()
    inputs = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, 2, (batch_size,), device=device)  # any valid class: the cost does not depend on it
    loss_function = nn.CrossEntropyLoss()

    def step() -> None:
        with policy.autocast():
            logits = model(inputs)
        scaler.scale(loss_function(logits.float(), targets)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(batches):
        step()
    synchronize(device)
    return batches * batch_size / (time.perf_counter() - started)


def reference_model(arch: str, classes: int, *, seed: int = 0) -> nn.Module:
    """The project's model for an architecture (torchvision body + fastai head), random init, for a seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_model(arch, classes, pretrained=False)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall-clock seconds of `run()` with queued device work included, and what it returned."""
    synchronize(device)
    started = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - started, result


def alternate(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Run each measure once per round, `repeats` rounds, and return the median of each."""
    results: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            results[name].append(measure())
    return {name: statistics.median(values) for name, values in results.items()}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_device(args: argparse.Namespace) -> torch.device:
    """The device the options ask for, or CUDA when present, else CPU (MPS is not benchmarked)."""
    device = resolve_device(args.device)
    return torch.device("cpu") if device.type == "mps" and args.device is None else device


def rounded(figures: dict[str, float], digits: int = 3) -> dict[str, float]:
    """Round floats for the JSON line, so it stays readable."""
    return {key: round(value, digits) if isinstance(value, float) else value for key, value in figures.items()}


if __name__ == "__main__":
    sys.exit("bench/common.py is a library: run one of the benchmarks (see BENCHMARKS.md)")
