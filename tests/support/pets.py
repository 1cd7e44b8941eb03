"""A small presized Oxford-style pets dataset, built with the real data-stage functions, for training tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lib.data.cleaning import clean_images
from lib.data.labelling import label_images
from lib.data.presize import PresizeCache, presize_images
from lib.data.splitting import split_manifest
from lib.data.synthetic import make_pets_dataset, pack_tgz
from lib.recipe import Recipe
from lib.train.trainer import Trainer, vision_trainer


def presized_pets(
    root: Path, *, breeds: int = 4, images_per_breed: int = 24, presize: int = 40, seed: int = 0
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Return (manifest with split, target and presized_path, vocab) for synthetic pets under root."""
    images = make_pets_dataset(
        root / "pets", breeds=breeds, images_per_breed=images_per_breed, seed=seed, min_side=presize, max_side=96
    )
    cache = root / "cache"
    labelled = label_images(images).manifest
    kept = clean_images(labelled, workers=1, progress=False, presize_cache=PresizeCache(cache, presize)).kept
    split = split_manifest(kept, seed=seed)
    presized = presize_images(split.manifest, cache, presize=presize, workers=1, progress=False).manifest
    return presized, split.vocab


def pets_archive(root: Path, **drawing: Any) -> Path:
    """Generated pets (make_pets_dataset's settings) packed as root/served/pets.tgz: a test's data URL."""
    images = make_pets_dataset(root / "pets", **drawing)
    return pack_tgz(images, root / "served" / "pets.tgz")


def tiny_trainer(
    pets: tuple[pd.DataFrame, tuple[str, ...]], *, presize: int, size: int, batch_size: int, seed: int = 0, **settings
) -> Trainer:
    """A random-init resnet18 trainer, built reproducibly for a seed without touching the caller's global RNG."""
    manifest, vocab = pets
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return vision_trainer(
            manifest,
            vocab,
            arch="resnet18",
            pretrained=False,
            presize=presize,
            size=size,
            batch_size=batch_size,
            workers=0,
            seed=seed,
            progress=False,
            **settings,
        )


STAGE_PRESIZE = 40


def stage_inputs(root: Path) -> dict[str, Any]:
    """Write a tiny presized manifest and vocab under root, as the data stage does; return a stage request's inputs.

    The recipe is a seeded resnet18 at 32 px on the CPU in fp32, without loader workers: a stage trains in seconds.
    """
    manifest, vocab = presized_pets(root, breeds=3, images_per_breed=8, presize=STAGE_PRESIZE)
    manifest.to_csv(root / "presized.csv", index=False)
    (root / "vocab.json").write_text(json.dumps(list(vocab)))
    recipe = Recipe().updated(
        {"arch": "resnet18", "pretrained": False, "presize": STAGE_PRESIZE, "size": 32, "bs": 8, "seed": 7,
         "fp16": False, "device": "cpu", "workers": 0}
    ).model_dump(mode="json")  # fmt: skip
    return {"manifest_path": str(root / "presized.csv"), "vocab_path": str(root / "vocab.json"), "recipe": recipe}
