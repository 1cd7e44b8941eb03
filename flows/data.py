"""The data stage of the chapter-5 recipe as a Prefect flow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from lib.common.paths import default_cache_dir, default_output_dir
from lib.data.source import PETS_URL
from lib.recipe import DEFAULT_LABEL_PATTERN, DEFAULT_PRESIZE, DEFAULT_SEED, DEFAULT_VALID_PCT
from tasks.data import (
    clean_images,
    download_dataset,
    label_images,
    presize_images,
    split_dataset,
    summarize_data,
)


@flow(name="prepare-data", log_prints=True)
def prepare_data(
    data_url: str | None = None,
    data_dir: str | None = None,
    label_pattern: str = DEFAULT_LABEL_PATTERN,
    skip_unmatched: bool = False,
    valid_pct: float = DEFAULT_VALID_PCT,
    seed: int | None = DEFAULT_SEED,
    presize: int = DEFAULT_PRESIZE,
    sha256: str | None = None,
    out_dir: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Prepare the images for training, in recipe order.

    1. download the archive (cached, retried) or take a local folder;
    2. label the images from their file names;
    3. clean: exclude files that do not decode; each one that does is presized into the shared cache while decoded;
    4. split into training and validation sets;
    5. presize: collect the cached images (and presize any still missing);
    6. write the summary and a show_batch grid.

    With neither data_url nor data_dir, the Oxford-IIIT Pet archive the book uses is downloaded.
    """
    prepared = data_stage(
        data_url=data_url,
        data_dir=data_dir,
        label_pattern=label_pattern,
        skip_unmatched=skip_unmatched,
        valid_pct=valid_pct,
        seed=seed,
        presize=presize,
        sha256=sha256,
        out_dir=out_dir or str(default_output_dir() / "data"),
        cache_dir=cache_dir,
    )
    print(f"Summary: {prepared['summary']}; show_batch grid: {prepared['show_batch']}")
    return prepared


def data_stage(
    *,
    data_url: str | None,
    data_dir: str | None,
    label_pattern: str,
    skip_unmatched: bool,
    valid_pct: float,
    seed: int | None,
    presize: int,
    sha256: str | None,
    out_dir: str,
    cache_dir: str | None,
) -> dict:
    """Run the data tasks in recipe order inside the calling flow; return the paths and counts they produced."""
    if not data_url and not data_dir:
        data_url = PETS_URL
    # Absolute paths: manifests written here stay valid whatever the working directory of a later reader.
    cache_dir = str(Path(cache_dir or default_cache_dir()).resolve())
    out_dir = str(Path(out_dir).resolve())
    images_dir = download_dataset(data_url, data_dir, cache_dir, sha256)
    labelled = label_images(images_dir, label_pattern, skip_unmatched, out_dir)
    cleaned = clean_images(labelled["manifest"], cache_dir, presize)
    split = split_dataset(cleaned["manifest"], valid_pct, seed)
    presized = presize_images(split["manifest"], cache_dir, presize)
    summarized = summarize_data(
        presized["manifest"],
        split["vocab"],
        source=images_dir,
        label_pattern=label_pattern,
        size=presize,
        found=labelled["found"],
        unmatched=labelled["unmatched"],
        seed=seed,
        cache_dir=cache_dir,
    )
    return {
        "images_dir": images_dir,
        "data_url": data_url,
        "manifest": presized["manifest"],
        "vocab": split["vocab"],
        "classes": split["classes"],
        "cleaning_report": cleaned["report"],
        **summarized,
        "sizes": {"train": split["train"], "valid": split["valid"]},
        "cache_hits": presized["cache_hits"],
        "written": presized["written"],
        "decoded": cleaned["decoded"],
    }
