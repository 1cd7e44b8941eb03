"""The whole recipe offline, on the CPU, in a few minutes: a generated pets-like dataset through the training flow.

`make demo` runs it, and so does the `smoke` deployment on the `cpu` work pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.defaults import (
    DEMO_ARCH,
    DEMO_BASELINE_EPOCHS,
    DEMO_BATCH_SIZE,
    DEMO_BREEDS,
    DEMO_EPOCHS,
    DEMO_EXPERIMENT,
    DEMO_FREEZE_EPOCHS,
    DEMO_IMAGES_PER_BREED,
    DEMO_PRESIZE,
    DEMO_REGISTERED_MODEL,
    DEMO_SIZE,
)
from flows.train import Architecture, train
from lib.common.paths import default_output_dir
from tasks.data import make_synthetic_archive


@flow(name="demo-pets", log_prints=True)
def demo(
    breeds: Annotated[int, Field(ge=2, le=37)] = DEMO_BREEDS,
    images_per_breed: Annotated[int, Field(ge=5)] = DEMO_IMAGES_PER_BREED,
    arch: Architecture = DEMO_ARCH,
    presize: Annotated[int, Field(ge=8)] = DEMO_PRESIZE,
    size: Annotated[int, Field(ge=8)] = DEMO_SIZE,
    bs: Annotated[int, Field(ge=1)] = DEMO_BATCH_SIZE,
    freeze_epochs: Annotated[int, Field(ge=0)] = DEMO_FREEZE_EPOCHS,
    epochs: Annotated[int, Field(ge=1)] = DEMO_EPOCHS,
    baseline_epochs: Annotated[int, Field(ge=1)] = DEMO_BASELINE_EPOCHS,
    base_lr: Annotated[float, Field(gt=0)] | None = None,
    experiment: str = DEMO_EXPERIMENT,
    registered_model: str = DEMO_REGISTERED_MODEL,
    out_dir: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Generate a small pets-like dataset and run the full training flow on it: random init, CPU, fp32, no workers.

    Nothing is downloaded: the archive is generated, served from a file:// URL, and the model starts from random
    weights (pretrained weights would need the network).
    """
    out = Path(out_dir or default_output_dir() / "demo").resolve()
    archive = make_synthetic_archive(breeds, images_per_breed, str(out))
    return train(
        data_url=Path(archive).as_uri(),
        arch=arch,
        pretrained=False,
        presize=presize,
        size=size,
        bs=bs,
        freeze_epochs=freeze_epochs,
        epochs=epochs,
        baseline_epochs=baseline_epochs,
        base_lr=base_lr,
        fp16=False,
        device="cpu",
        workers=0,  # two cores: worker processes cost more than they save on a dataset this small
        experiment=experiment,
        registered_model=registered_model,
        out_dir=str(out / "train"),
        cache_dir=cache_dir or str(out / "cache"),
    )
