"""The whole recipe offline, on the CPU, in a few minutes: a generated pets-like dataset through the training flow.

`make demo` runs it, and so does the `smoke` deployment on the `cpu` work pool; `demo_data` runs the data stage alone
on the same generated data (the `data-smoke` deployment). The demo gives the same numbers on every machine with the
same library versions (flows/defaults.py says how).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows.data import prepare_data
from flows.defaults import DEMO_BREEDS, DEMO_ENVIRONMENT, DEMO_EPOCHS, DEMO_IMAGES_PER_BREED, DEMO_SETTINGS
from flows.train import train
from lib.common.paths import default_output_dir
from lib.recipe import Recipe
from tasks.data import make_synthetic_archive

Breeds = Annotated[int, Field(ge=2, le=37)]
ImagesPerBreed = Annotated[int, Field(ge=5)]


@flow(name="demo-pets", log_prints=True)
def demo(
    breeds: Breeds = DEMO_BREEDS,
    images_per_breed: ImagesPerBreed = DEMO_IMAGES_PER_BREED,
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
    recipe = Recipe().updated({**DEMO_SETTINGS, "epochs": epochs, **where, **(settings or {})})
    with _environment(DEMO_ENVIRONMENT):  # before this process or a stage's first convolution
        return train(recipe=recipe)


@flow(name="demo-data", log_prints=True)
def demo_data(
    breeds: Breeds = DEMO_BREEDS,
    images_per_breed: ImagesPerBreed = DEMO_IMAGES_PER_BREED,
    out_dir: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Run the data stage (label, clean, split, presize, summary) on the demo's generated dataset: offline, seconds.

    The archive is generated under out_dir (default ./outputs/demo) and read through a file:// URL; the manifests,
    reports and summary go to `<out_dir>/data`.
    """
    out = Path(out_dir or default_output_dir() / "demo").resolve()
    archive = make_synthetic_archive(breeds, images_per_breed, str(out))
    where = {
        "data_url": Path(archive).as_uri(),
        "out_dir": str(out / "data"),
        "cache_dir": cache_dir or str(out / "cache"),
    }
    return prepare_data(recipe=Recipe().updated({**DEMO_SETTINGS, **where}))


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (stage processes inherit them), then put the old values back."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
