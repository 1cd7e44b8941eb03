"""Served latency: one picture of the default size posted to `pets serve`, p50 and p95 of the round trip.

A random-init model at the recipe's defaults (resnet50 head over 37 classes, presize 460, size 224) is logged and
registered in a temporary store exactly as training registers it, served by the real `pets serve` (`mlflow models
serve`, one worker) on 127.0.0.1, and sent one pet-sized JPEG (500 x 375, the Oxford-IIIT Pet originals' common
size) per request, one request at a time. The same picture through the loaded pyfunc in this process, alternating
with the requests, gives the model's own latency, so `server_overhead` is what HTTP, JSON, base64 and the scoring
server add, measured in one run.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from bench.common import emit
from lib.recipe import DEFAULT_PRESIZE
from lib.serve.contract import IMAGE_COLUMN
from lib.serve.inference import export_classifier
from lib.train.model import create_model

PET_PHOTO = (500, 375)  # width x height of most Oxford-IIIT Pet originals
REGISTERED = "bench-served"
WARM_UP = 3  # untimed rounds first: the first calls allocate and pick kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50", help="torchvision architecture (random init)")
    parser.add_argument("--classes", type=int, default=37, help="classes of the head")
    parser.add_argument("--presize", type=int, default=DEFAULT_PRESIZE, help="the model's presize")
    parser.add_argument("--size", type=int, default=224, help="the model's training size")
    parser.add_argument("--requests", type=int, default=40, help="timed rounds (after the warm-up ones)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as folder:
        root = Path(folder)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        picture = pet_photo()
        model_uri = register(root, args)
        served_ms, pyfunc_ms, failures = latencies(root, model_uri, picture, args.requests)
    served_p50, pyfunc_p50 = statistics.median(served_ms), statistics.median(pyfunc_ms)
    figures = {
        "arch": args.arch,
        "presize": args.presize,
        "size": args.size,
        "picture": f"{PET_PHOTO[0]}x{PET_PHOTO[1]} JPEG, {len(picture)} bytes",
        "requests": args.requests,
        "served_p50_ms": round(served_p50, 1),
        "served_p95_ms": round(percentile(served_ms, 95), 1),
        "pyfunc_p50_ms": round(pyfunc_p50, 1),
        "server_overhead": round(served_p50 / pyfunc_p50, 3),
        "failed_requests": failures,
    }
    emit("serving", torch.device("cpu"), figures, {"every_request_answered": failures == 0})


def pet_photo() -> bytes:
    """A pet-sized JPEG of smooth noise (JPEG sizes like a photo's, not like a flat colour's)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (PET_PHOTO[1] // 8, PET_PHOTO[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(PET_PHOTO, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def register(root: Path, args: argparse.Namespace) -> str:
    """Log and register a random-init classifier as training does; return its models:/ URI."""
    import mlflow

    from tasks import tracking

    torch.manual_seed(0)
    net = create_model(args.arch, args.classes, pretrained=False)
    vocab = [f"breed_{index:02d}" for index in range(args.classes)]
    export = export_classifier(
        root / "model.pth", net, arch=args.arch, vocab=vocab, size=args.size, presize=args.presize
    )
    examples = []
    for index in range(2):
        path = root / f"example_{index}.jpg"
        path.write_bytes(pet_photo())
        examples.append(str(path))
    run = mlflow.MlflowClient().create_run(tracking.ensure_experiment("bench-serving"))
    info = tracking.log_classifier.fn(run.info.run_id, str(export), examples, registered_model=REGISTERED, step=0)
    tracking.promote(REGISTERED, info["model_version"], reason="benchmark")
    return f"models:/{REGISTERED}/{info['model_version']}"


def latencies(root: Path, model_uri: str, picture: bytes, requests: int) -> tuple[list[float], list[float], int]:
    """Milliseconds of each round trip to `pets serve` of the champion and of the pyfunc's predict in this process,
    alternating one of each per round (a burst of load from a neighbour hits both), and the failed requests."""
    import httpx

    from tasks.tracking import load_served_model

    model, _ = load_served_model(model_uri)
    frame = pd.DataFrame({IMAGE_COLUMN: [picture]})
    port = free_port()
    pets = Path(sys.executable).with_name("pets")
    server = subprocess.Popen(
        [str(pets), "serve", f"models:/{REGISTERED}@champion", "--port", str(port)],
        cwd=root,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/invocations"
    body = {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[base64.b64encode(picture).decode()]]}}
    served, in_process, failures = [], [], 0
    try:
        wait_until_up(f"http://127.0.0.1:{port}", server)
        with httpx.Client(timeout=120) as client:
            for round_ in range(requests + WARM_UP):
                start = time.perf_counter()
                response = client.post(url, json=body)
                middle = time.perf_counter()
                model.predict(frame)
                end = time.perf_counter()
                if round_ < WARM_UP:
                    continue
                served.append((middle - start) * 1000)
                in_process.append((end - middle) * 1000)
                failures += response.status_code != 200 or response.json()["predictions"][0]["error"] is not None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return served, in_process, failures


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"pets serve did not answer on {url} (exit code {server.poll()})")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default)."""
    return float(np.percentile(values, q))


if __name__ == "__main__":
    main()
