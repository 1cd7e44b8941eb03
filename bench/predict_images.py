"""Batch prediction: predict-images' batched path against the registered pyfunc called one image at a time.

Both sides label the same generated pet photos (300-500 px JPEGs) with the same registered model version, logged
into a temporary MLflow store as `pets train` logs one (random-init resnet18):

* batched: what the predict-images flow runs for a version (tasks/prediction.py `predict_batch`): the network
  rebuilt from the registered pt2 program's weights, the files decoded by the project's loader, batches of --bs on
  the device, fp16 on CUDA;
* loop: `mlflow.pyfunc.load_model(models:/...)` and one `predict` per file, the file's bytes as its request: what a
  client of the served model without batching does.

Each side is timed from the files on disk to the probabilities, alternately, --repeats times; the ratio of their
median images per second is the figure (target: at least 5x on the CPU).

    python -m bench.predict_images                         # CPU: resnet18 at 128 px (presize 256), bs 32
    python -m bench.predict_images --device cuda --arch resnet50 --size 224 --presize 460 --bs 64 --precision fp16
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import alternate, base_parser, bench_device, emit, generated_pets, reference_model, rounded, timed

TARGET_RATIO = 5.0  # issue 4: the batched path labels at least 5x the images per second of the one-at-a-time loop


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="pictures labelled by each side per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements of each side")
    args = parser.parse_args(argv)
    device = bench_device(args)
    images = sorted(generated_pets(args.data_dir, breeds=args.breeds, per_breed=args.per_breed).glob("*.jpg"))
    paths = [str(path) for path in images[: args.images]]
    vocab = sorted({Path(path).name.rsplit("_", 1)[0] for path in images})
    scratch = Path(tempfile.mkdtemp(prefix="predict-bench-", dir=args.data_dir))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"  # tasks.tracking reads it
    try:
        model_uri = _registered_model(args, vocab, paths[:2], scratch)
        batched, served = _batched_predictor(args, model_uri, scratch, device), _served_model(model_uri)
        results: dict[str, np.ndarray] = {}

        def batched_side() -> float:
            seconds, found = timed(lambda: batched.predict(paths, batch_size=args.bs, workers=args.workers), device)
            results["batched"] = torch.stack(found.scores).numpy()
            return len(paths) / seconds

        def loop_side() -> float:
            seconds, found = timed(lambda: [_served_probabilities(served, path, vocab) for path in paths], device)
            results["loop"] = np.stack(found)
            return len(paths) / seconds

        batched.predict(paths[: args.bs], batch_size=args.bs, workers=0)  # warm-up: oneDNN picks its kernels
        _served_probabilities(served, paths[0], vocab)
        medians = alternate({"batched": batched_side, "loop": loop_side}, args.repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ratio = medians["batched"] / medians["loop"]
    figures = {
        "arch": args.arch,
        "size": args.size,
        "presize": args.presize,
        "batch_size": args.bs,
        "precision": batched.precision.effective,
        "images": len(paths),
        "repeats": args.repeats,
        "batched_images_per_second": medians["batched"],
        "loop_images_per_second": medians["loop"],
        "batched_to_loop": ratio,
        # fp32 on the CPU: both sides run the same network on the same pictures, so they agree to float rounding
        "max_probability_difference": float(np.abs(results["batched"] - results["loop"]).max()),
    }
    return emit(
        "predict_images", device, rounded(figures, 6), {f"ratio_at_least_{TARGET_RATIO:g}": ratio >= TARGET_RATIO}
    )


def _registered_model(args, vocab: list[str], examples: list[str], scratch: Path) -> str:
    """Log and register a random-init classifier as `pets train` does; return its models:/ URI."""
    import mlflow

    from lib.serve.inference import export_classifier
    from tasks import tracking

    model = reference_model(args.arch, len(vocab))
    exported = export_classifier(
        scratch / "model.pth", model, arch=args.arch, vocab=vocab, size=args.size, presize=args.presize
    )
    experiment_id = tracking.ensure_experiment("predict-bench")
    run = mlflow.MlflowClient(tracking.tracking_uri()).create_run(experiment_id, run_name="bench")
    info = tracking.log_classifier.fn(
        run.info.run_id, str(exported), examples, registered_model="predict-bench", step=0
    )  # the task's function: no Prefect API needed
    return f"models:/predict-bench/{info['model_version']}"


def _batched_predictor(args, model_uri: str, scratch: Path, device: torch.device):
    """The network predict_batch runs for the version, on the device (tasks/prediction.py)."""
    from lib.serve.batch import BatchPredictor, network_from_program
    from tasks import tracking

    downloaded = tracking.download_network(model_uri, scratch / "download")
    net = network_from_program(Path(downloaded["network"]), arch=downloaded["arch"], classes=len(downloaded["vocab"]))
    return BatchPredictor(
        net, size=downloaded["size"], presize=downloaded["presize"], device=device, precision=args.precision
    )


def _served_model(model_uri: str):
    from tasks.tracking import load_served_model

    return load_served_model(model_uri)[0]


def _served_probabilities(served, path: str, vocab: list[str]) -> np.ndarray:
    answer = served.predict(pd.DataFrame({"image": [Path(path).read_bytes()]}), params={"probabilities": True})
    probabilities = answer["probabilities"].iloc[0]
    return np.array([probabilities[name] for name in vocab], dtype=np.float32)


if __name__ == "__main__":
    main()
