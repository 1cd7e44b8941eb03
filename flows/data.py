"""The data stage of the chapter-5 recipe as a Prefect flow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from lib.common.paths import default_cache_dir, default_output_dir
from lib.data.source import PETS_URL
from lib.recipe import DataSettings, Recipe
from tasks.data import (
    apply_review,
    clean_images,
    download_dataset,
    find_duplicates,
    label_images,
    presize_images,
    split_dataset,
    summarize_data,
)


@flow(name="prepare-data", log_prints=True)
def prepare_data(recipe: Recipe = Recipe()) -> dict:
    """Prepare the images for training, in recipe order (only the recipe's data and runtime settings are read).

    1. download the archive (cached, retried) or take a local folder;
    2. label the images (a regex, class folders, a CSV or split folders; data.labels), and refuse labels that cannot
       train a classifier (lib/data/label_gate.py);
    3. clean: exclude files that do not decode; each one that does is presized into the shared cache, and its
       perceptual hash taken, while decoded;
    4. apply the review decisions of data.overrides (`pets review apply`): deleted images left out, relabelled ones
       with their new label, the originals untouched;
    5. group near-duplicates (unless data.find_duplicates is off): exact copies are used once, groups with
       conflicting labels are reported (and left out with data.exclude_conflicting_duplicates);
    6. split into training and validation sets, each near-duplicate group on one side;
    7. presize: collect the cached images (and presize any still missing);
    8. write the summary and a show_batch grid.

    With neither data.url nor data.dir, the Oxford-IIIT Pet archive the book uses is downloaded. Files go to
    runtime.out_dir (default ./outputs/data).
    """
    recipe.check_runnable(training=False)
    out_dir = recipe.runtime.out_dir or str(default_output_dir() / "data")
    prepared = data_stage(recipe.data, cache_dir=recipe.runtime.cache_dir, out_dir=out_dir)
    print(f"Summary: {prepared['summary']}; show_batch grid: {prepared['show_batch']}")
    return prepared


def data_stage(data: DataSettings, *, cache_dir: str | None, out_dir: str) -> dict:
    """Run the data tasks in recipe order inside the calling flow; return the paths and counts they produced."""
    data_url = data.url if data.url or data.dir else PETS_URL
    # Absolute paths: manifests written here stay valid whatever the working directory of a later reader.
    cache_dir = str(Path(cache_dir or default_cache_dir()).resolve())
    out_dir = str(Path(out_dir).resolve())
    images_dir = download_dataset(
        data_url, data.dir, cache_dir, data.sha256, data.max_archive_bytes, data.max_archive_members
    )
    option = "--data-dir" if data.dir else "--data-url"  # what an error about the images names
    labelled = label_images(images_dir, data, out_dir, cache_dir, option)
    cleaned = clean_images(labelled["manifest"], cache_dir, data.presize, data.find_duplicates)
    # review decisions are keyed by content, so they apply once cleaning knows each image's sha256
    reviewed = apply_review(cleaned["manifest"], data.overrides) if data.overrides else None
    rows = (reviewed or cleaned)["manifest"]
    grouped = None
    if data.find_duplicates:
        args = (rows, cache_dir, data.duplicate_distance, data.exclude_conflicting_duplicates)
        grouped = find_duplicates(*args)
    split = split_dataset(grouped["manifest"] if grouped else rows, data.valid_pct, data.seed)
    presized = presize_images(split["manifest"], cache_dir, data.presize)
    summarized = summarize_data(
        presized["manifest"],
        split["vocab"],
        source=images_dir,
        labels_line=labelled["labels_line"],
        labeller=labelled["labeller"],
        size=data.presize,
        found=labelled["found"],
        left_out_path=labelled["left_out"],
        seed=data.seed,
        cache_dir=cache_dir,
        near_duplicates=grouped,
    )
    return {
        "images_dir": images_dir,
        "data_url": data_url,
        "manifest": presized["manifest"],
        "vocab": split["vocab"],
        "classes": split["classes"],
        "cleaning_report": cleaned["report"],
        "duplicates": grouped,
        "overrides": reviewed,
        "left_out": labelled["left_out"],
        "label_source": labelled["label_source"],
        "labels_csv": labelled["labels_csv"],
        **summarized,
        "sizes": {"train": split["train"], "valid": split["valid"]},
        "cache_hits": presized["cache_hits"],
        "written": presized["written"],
        "decoded": cleaned["decoded"],
    }
