"""A small presized Oxford-style pets dataset, built with the real data-stage functions, for training tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from lib.data.cleaning import clean_images
from lib.data.labelling import label_images
from lib.data.presize import PresizeCache, presize_images
from lib.data.splitting import split_manifest
from lib.data.synthetic import make_pets_dataset
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
