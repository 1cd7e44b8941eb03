"""A small presized Oxford-style pets dataset, built with the real data-stage functions, for training tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lib.cleaning import clean_images
from lib.labelling import label_images
from lib.presize import PresizeCache, presize_images
from lib.splitting import split_manifest
from lib.synthetic import make_pets_dataset


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
