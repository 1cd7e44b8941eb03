"""Training throughput against the model-only limit.

The project's training epochs (loading from the presize cache, batch augmentation, forward, backward, AdamW, the
one-cycle schedule, loss smoothing and metrics) against a loop that only runs forward + backward + AdamW on one batch
already in memory, with the same model, size, batch, precision and memory format. Rounds alternate between the two,
and each figure is the median over the rounds.

The project's images/s are those of the training part of each epoch (`EpochStats.images_per_second`), as the
model-only loop does no validation; the whole epoch's rate, validation included, is reported beside it.

    python -m bench.train_throughput                       # CPU: resnet18 at 128 px, bs 32 (issue 5's setting)
    python -m bench.train_throughput --device cuda --arch resnet50 --size 224 --presize 460 --bs 64 --precision fp16
"""

from __future__ import annotations

import statistics
import time

from bench.common import (
    alternate,
    base_parser,
    bench_device,
    bench_pets,
    emit,
    model_only_throughput,
    reference_model,
    rounded,
)
from lib.train.trainer import vision_trainer

TARGET_RATIO = 0.85  # issue 5: at least 0.85x the channels_last model-only loop


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (model-only, one project epoch)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the project's model")
    args = parser.parse_args(argv)
    device = bench_device(args)
    manifest, vocab = bench_pets(args)

    trainer = vision_trainer(
        manifest, vocab, arch=args.arch, pretrained=False, presize=args.presize, size=args.size,
        batch_size=args.bs, workers=args.workers, seed=0, device=device, precision=args.precision,
        progress=False, compile=args.compile,
    )  # fmt: skip
    batches = len(trainer.train_loader)
    started = time.perf_counter()
    trainer.fit_one_cycle(1, 1e-3)  # warm-up: worker start, allocator, oneDNN/cuDNN kernel choice, compiling
    warmup_seconds = time.perf_counter() - started
    epochs = []

    def project_epoch() -> float:
        row = trainer.fit_one_cycle(1, 1e-3)[-1]
        epochs.append(row)
        return row.images_per_second

    def model_only(channels_last: bool):
        def measure() -> float:
            model = reference_model(args.arch, len(vocab))
            return model_only_throughput(
                model, batch_size=args.bs, size=args.size, batches=batches, device=device,
                channels_last=channels_last, precision=args.precision,
            )  # fmt: skip

        return measure

    medians = alternate({"model_only_channels_last": model_only(True), "project": project_epoch}, repeats=args.repeats)
    contiguous = model_only(False)()  # for reference: what the memory format is worth on this device
    ratio = medians["project"] / medians["model_only_channels_last"]
    figures = {
        "arch": args.arch,
        "size": args.size,
        "presize": args.presize,
        "batch_size": args.bs,
        "precision": trainer.precision.effective,
        "channels_last": trainer.channels_last,
        "compiled": args.compile,
        "workers": trainer.train_loader.num_workers,
        "batches_per_epoch": batches,
        "warmup_epoch_seconds": warmup_seconds,  # with --compile, mostly compiling
        "repeats": args.repeats,
        "project_images_per_second": medians["project"],
        "project_epoch_images_per_second": statistics.median(batches * args.bs / row.seconds for row in epochs),
        "model_only_channels_last_images_per_second": medians["model_only_channels_last"],
        "model_only_contiguous_images_per_second": contiguous,
        "ratio_to_model_only": ratio,
    }
    return emit("train_throughput", device, rounded(figures), {f"ratio_at_least_{TARGET_RATIO}": ratio >= TARGET_RATIO})


if __name__ == "__main__":
    main()
