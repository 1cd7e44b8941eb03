"""The whole recipe offline, on the CPU, in a few minutes: a generated pets-like dataset through the training flow.

`make demo` runs it, and so does the `smoke` deployment on the `cpu` work pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows.defaults import DEMO_BREEDS, DEMO_EPOCHS, DEMO_IMAGES_PER_BREED, DEMO_SETTINGS
from flows.train import train
from lib.common.paths import default_output_dir
from lib.recipe import Recipe
from tasks.data import make_synthetic_archive


@flow(name="demo-pets", log_prints=True)
def demo(
    breeds: Annotated[int, Field(ge=2, le=37)] = DEMO_BREEDS,
    images_per_breed: Annotated[int, Field(ge=5)] = DEMO_IMAGES_PER_BREED,
    epochs: Annotated[int, Field(ge=1)] = DEMO_EPOCHS,
    out_dir: str | None = None,
    cache_dir: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict:
    """Generate a small pets-like dataset and run the full training flow on it: random init, CPU, fp32, no workers.

    Nothing is downloaded: the archive is generated, served from a file:// URL, and the model starts from random
    weights (pretrained weights would need the network). Everything goes under out_dir (default ./outputs/demo).
    `settings` changes the demo's recipe by option name (e.g. {"bs": 8, "base_lr": 0.001}).
    """
    out = Path(out_dir or default_output_dir() / "demo").resolve()
    archive = make_synthetic_archive(breeds, images_per_breed, str(out))
    where = {
        "data_url": Path(archive).as_uri(),
        "out_dir": str(out / "train"),
        "cache_dir": cache_dir or str(out / "cache"),
    }
    return train(recipe=Recipe().updated({**DEMO_SETTINGS, "epochs": epochs, **where, **(settings or {})}))
