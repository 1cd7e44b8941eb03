"""Memory of a training run: peak RSS, and no growth across epochs.

Trains `--epochs` one-cycle epochs and records the process's resident set size after each epoch (and the CUDA
allocator's peak on a GPU). The first epoch warms the allocator, worker processes and kernel caches, so growth is
measured from the end of the first epoch to the end of the last; the target is growth within 2% of the peak RSS.

    python -m bench.memory
    python -m bench.memory --device cuda --arch resnet50 --size 224 --presize 460 --bs 64 --precision fp16
"""

from __future__ import annotations

import gc

import torch

from bench.common import base_parser, bench_device, bench_pets, current_rss_mb, emit, peak_rss_mb, rounded
from lib.train.trainer import vision_trainer

GROWTH_TOLERANCE = 0.02  # of the peak RSS: allocator and page-cache noise, far below one leaked batch per step


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="one-cycle epochs to train")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: growth is measured after the first epoch")
    device = bench_device(args)
    manifest, vocab = bench_pets(args)
    rss_after_epoch: list[float] = []

    def record(_row) -> None:
        gc.collect()  # count what is still referenced, not garbage awaiting collection
        rss_after_epoch.append(current_rss_mb())

    start_rss = current_rss_mb()
    trainer = vision_trainer(
        manifest, vocab, arch=args.arch, pretrained=False, presize=args.presize, size=args.size,
        batch_size=args.bs, workers=args.workers, seed=0, device=device, precision=args.precision,
        progress=False, on_epoch_end=record,
    )  # fmt: skip
    trainer.fit_one_cycle(args.epochs, 1e-3)
    peak = peak_rss_mb()
    growth = rss_after_epoch[-1] - rss_after_epoch[0]
    figures = {
        "arch": args.arch,
        "size": args.size,
        "batch_size": args.bs,
        "epochs": args.epochs,
        "batches_per_epoch": len(trainer.train_loader),
        "rss_before_mb": start_rss,
        "rss_after_epoch_mb": [round(value, 1) for value in rss_after_epoch],
        "peak_rss_mb": peak,
        "growth_after_first_epoch_mb": growth,
        "growth_per_epoch_mb": growth / (args.epochs - 1),
    }
    if device.type == "cuda":
        figures["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    targets = {f"growth_within_{GROWTH_TOLERANCE:.0%}_of_peak": growth <= GROWTH_TOLERANCE * peak}
    return emit("memory", device, rounded(figures), targets)


if __name__ == "__main__":
    main()
