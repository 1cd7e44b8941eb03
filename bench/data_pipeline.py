"""The data pipeline alone: what the loader and batch augmentation deliver, against what the model consumes.

* warm: training batches from the presize cache (decode the cached JPEG, crop, collate), moved to the device and
  augmented there, for whole epochs, with the project's default workers;
* cold: the data stage on a fresh cache (read, hash and decode every original, presize it into the cache), then the
  first epoch: what the first run on new data waits for;
* model: the model-only training loop (forward + backward + AdamW on a batch in memory) at the same size and batch.

    python -m bench.data_pipeline                          # CPU: resnet18 at 128 px, bs 32
    python -m bench.data_pipeline --device cuda --arch resnet50 --size 224 --presize 460 --bs 64 --precision fp16
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.common import (
    base_parser,
    bench_device,
    bench_pets,
    emit,
    generated_pets,
    model_only_throughput,
    prepared_pets,
    reference_model,
    rounded,
    synchronize,
    timed,
)
from lib.data.augment import aug_transforms
from lib.data.loading import default_workers, make_loader
from lib.train.precision import use_channels_last

TARGET_WARM_TO_MODEL = 5.0  # issue 5: the warm loader delivers at least 5x what the model consumes


def delivered_per_second(loader, augmentation, device: torch.device, *, epochs: int) -> float:
    """Images/s the loader and the augmentation deliver on the device over whole epochs."""
    generator = torch.Generator().manual_seed(0)
    images = 0
    synchronize(device)
    started = time.perf_counter()
    for _ in range(epochs):
        for inputs, targets in loader:
            batch = augmentation(inputs.to(device, non_blocking=True), train=True, generator=generator)
            targets.to(device, non_blocking=True)
            images += len(batch)
    synchronize(device)
    return images / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="warm epochs to time")
    args = parser.parse_args(argv)
    device = bench_device(args)
    workers = default_workers(device) if args.workers is None else args.workers
    augmentation = aug_transforms(args.size, 0.75)

    images_dir = generated_pets(args.data_dir, breeds=args.breeds, per_breed=args.per_breed)
    with tempfile.TemporaryDirectory(dir=args.data_dir) as fresh:
        stage_seconds, (cold_manifest, _) = timed(
            lambda: prepared_pets(images_dir, Path(fresh) / "cache", presize=args.presize), device
        )
        cold_train = cold_manifest[cold_manifest["split"] == "train"]
        cold_loader = _train_loader(cold_train, args, workers, device)
        first_pass_seconds, _ = timed(lambda: delivered_per_second(cold_loader, augmentation, device, epochs=1), device)

    manifest, vocab = bench_pets(args)
    train = manifest[manifest["split"] == "train"]
    loader = _train_loader(train, args, workers, device)
    delivered_per_second(loader, augmentation, device, epochs=1)  # start the workers, fill the page cache
    warm = delivered_per_second(loader, augmentation, device, epochs=args.epochs)
    model = model_only_throughput(
        reference_model(args.arch, len(vocab)), batch_size=args.bs, size=args.size, batches=len(loader),
        device=device, channels_last=use_channels_last(device), precision=args.precision,
    )  # fmt: skip
    cold_images = (len(train) // args.bs) * args.bs
    figures = {
        "arch": args.arch,
        "size": args.size,
        "presize": args.presize,
        "batch_size": args.bs,
        "workers": workers,
        "images": len(manifest),
        "warm_images_per_second": warm,
        "cold_presize_images_per_second": len(cold_manifest) / stage_seconds,
        "cold_first_epoch_images_per_second": cold_images / (stage_seconds + first_pass_seconds),
        "model_images_per_second": model,
        "warm_to_model": warm / model,
        "cold_first_epoch_to_model": cold_images / (stage_seconds + first_pass_seconds) / model,
    }
    met = {f"warm_at_least_{TARGET_WARM_TO_MODEL:g}x_model": warm / model >= TARGET_WARM_TO_MODEL}
    return emit("data_pipeline", device, rounded(figures), met)


def _train_loader(train, args, workers: int, device: torch.device):
    pin_memory = device.type == "cuda"  # as vision_trainer does
    return make_loader(
        train, size=args.presize, train=True, batch_size=args.bs, workers=workers, seed=0, pin_memory=pin_memory
    )


if __name__ == "__main__":
    main()
