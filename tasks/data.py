"""Prefect tasks of the data stage: each calls one lib function, writes its outputs, returns paths and counts."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from lib.common.download import DownloadError, file_sha256
from lib.data import cleaning, duplicates, label_gate, labelling, overrides, presize, splitting, summary, synthetic
from lib.data.augment import AugmentSettings, aug_transforms
from lib.data.digests import DIGESTS_FILE, FileDigests
from lib.data.source import (
    ArchiveLimits,
    cached_archive_digest,
    dataset_folders,
    resolve_data_source,
    resolve_labels_csv,
)
from lib.recipe import DEFAULT_MAX_ARCHIVE_BYTES, DEFAULT_MAX_ARCHIVE_MEMBERS, DataSettings
from tasks.progress import ProgressArtifact

MANIFEST_FILE = "manifest.csv"
LEFT_OUT_FILE = "left_out.csv"  # what labelling left out or skipped, with why (path, reason)


def _is_transient(task, task_run, state) -> bool:
    """Retry only failures a second try can fix: network errors, not a 404 or a checksum mismatch."""
    error = state.data
    return isinstance(error, DownloadError) and error.transient


def _download_cache_key(context, parameters) -> str:
    """Key on the inputs while the data they name is on disk; while it is not, never hit the cache.

    A key made of the inputs alone would hand back the path of a cache someone deleted. So the key also holds the
    digest of the downloaded and extracted archive (or the local folder), and a fresh random value when that is
    missing: the task then runs, and from the next call on its result is served from the Prefect cache.
    """
    if parameters["data_url"]:
        on_disk = cached_archive_digest(parameters["data_url"], Path(parameters["cache_dir"]))
    else:
        on_disk = parameters["data_dir"] if Path(parameters["data_dir"] or "").is_dir() else None
    key = json.dumps({**parameters, "on_disk": on_disk or uuid.uuid4().hex}, sort_keys=True, default=str)
    return "download-" + hashlib.sha256(key.encode()).hexdigest()


@task(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=_is_transient,
    cache_key_fn=_download_cache_key,
)
def download_dataset(
    data_url: str | None,
    data_dir: str | None,
    cache_dir: str,
    sha256: str | None = None,
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    max_archive_members: int = DEFAULT_MAX_ARCHIVE_MEMBERS,
) -> str:
    """Download and extract the dataset archive (or take a local folder) and return its images folder.

    An archive whose files add up to more than max_archive_bytes, or with more than max_archive_members members, is
    refused before it is extracted.
    """
    images_dir = resolve_data_source(
        data_url=data_url,
        data_dir=Path(data_dir) if data_dir else None,
        cache_dir=Path(cache_dir),
        sha256=sha256,
        limits=ArchiveLimits(max_bytes=max_archive_bytes, max_members=max_archive_members),
    )
    return str(images_dir)


@task(cache_policy=NO_CACHE)
def label_images(images_dir: str, data: DataSettings, out_dir: str, cache_dir: str, option: str = "--data-dir") -> dict:
    """Label the images with the recipe's label source, write the manifest and what was left out, and refuse labels
    that cannot train a classifier (lib/data/label_gate.py); `option` is the one that chose the images."""
    logger = get_run_logger()
    root = Path(images_dir)
    csv_path = None
    if data.labels_csv:
        folders = dataset_folders(root, data_dir=Path(data.dir) if data.dir else None, cache_dir=Path(cache_dir))
        csv_path = resolve_labels_csv(data.labels_csv, folders, Path(cache_dir))
    labelled = labelling.label_images(root, data, csv_path=csv_path, option=option)
    labels_line = labelled.describe(data)
    logger.info(labels_line)
    for note in labelled.notes:
        logger.warning(note)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_FILE
    labelled.manifest.to_csv(manifest_path, index=False)
    left_out = pd.concat([labelled.unlabelled, labelled.left_out, labelled.skipped], ignore_index=True)
    left_out.to_csv(out / LEFT_OUT_FILE, index=False)  # every run writes it: a reused folder keeps no old list
    label_gate.check_labels(labelled, data)
    if warning := label_gate.unlabelled_warning(labelled, data, str(out / LEFT_OUT_FILE)):
        logger.warning(warning)
    return {
        "manifest": str(manifest_path),
        "left_out": str(out / LEFT_OUT_FILE),
        "labeller": labelled.labeller(data),
        "labels_csv": str(csv_path) if csv_path else None,
        "label_source": labelled.source,
        "labels_line": labels_line,
        "found": len(labelled.manifest) + len(labelled.unlabelled) + len(labelled.left_out),
        "unlabelled": len(labelled.unlabelled),
    }


@task(cache_policy=NO_CACHE)
def clean_images(manifest_path: str, cache_dir: str, size: int, hash_images: bool = True) -> dict:
    """Decode every image, exclude the broken ones and write the cleaned manifest and the report beside it.

    Each image that decodes is presized into the shared cache while it is in memory, so no original is decoded twice,
    and (with hash_images) its perceptual hash is remembered for `find_duplicates`.
    """
    cache = presize.PresizeCache(Path(cache_dir), size)
    digests = FileDigests(Path(cache_dir) / DIGESTS_FILE)  # a warm re-run stats the originals instead of hashing
    hashes = duplicates.PerceptualHashes(duplicates.memo_path(Path(cache_dir))) if hash_images else None
    progress = ProgressArtifact(f"clean and presize to {size}px: images read")  # none on a warm run: nothing to read
    result = cleaning.clean_images(
        pd.read_csv(manifest_path), presize_cache=cache, digests=digests, on_progress=progress, hashes=hashes
    )
    out = Path(manifest_path).parent
    cleaned_path = out / "cleaned.csv"
    result.kept.to_csv(cleaned_path, index=False)
    report_path = cleaning.write_cleaning_report(result, out)
    return {"manifest": str(cleaned_path), "report": str(report_path), "decoded": result.decoded, **result.counts()}


@task(cache_policy=NO_CACHE)
def apply_review(manifest_path: str, overrides_path: str) -> dict:
    """Apply review decisions to the cleaned manifest: deleted images left out, relabelled ones with their new label.

    `overrides_path` is an overrides file `pets review apply` wrote, or a reviewed review.csv, which is turned into
    one as `pets review apply` would. Beside the manifest go reviewed.csv (the rows to train on), overrides.json (the
    decisions applied, a byte copy of a given overrides file) and overrides_changes.csv (the rows they changed).
    """
    logger = get_run_logger()
    source = Path(overrides_path)
    manifest = pd.read_csv(manifest_path)
    out = Path(manifest_path).parent
    recorded = out / overrides.OVERRIDES_FILE
    recorded.unlink(missing_ok=True)  # a reused folder: the decisions of an earlier run are never merged into these
    if source.suffix.lower() == ".csv":
        decisions, _ = overrides.record_review(source, recorded, classes=set(manifest["label"]))
    else:
        decisions = overrides.load_overrides(source)
        shutil.copyfile(source, recorded)  # the very bytes given: its sha256 is the given file's
    applied = overrides.apply_overrides(manifest, decisions, source=str(source))
    reviewed_path = out / "reviewed.csv"
    applied.manifest.to_csv(reviewed_path, index=False)
    changes_path = out / overrides.CHANGES_FILE
    applied.changes.to_csv(changes_path, index=False)
    logger.info(f"Review decisions v{decisions.version} from {source}: {overrides.describe_counts(applied.counts)}")
    return {
        "manifest": str(reviewed_path),
        "overrides": str(recorded),
        "changes": str(changes_path),
        "sha256": file_sha256(recorded),
        "version": decisions.version,
        "review_run": decisions.review_run,
        **applied.counts,
    }


@task(cache_policy=NO_CACHE)
def find_duplicates(manifest_path: str, cache_dir: str, distance: int, exclude_conflicting: bool) -> dict:
    """Group near-duplicate images, leave out exact copies (and conflicting groups if asked), write the reports.

    Writes grouped.csv (the rows to split, with their `group`), duplicates.csv and, when there are groups, the
    duplicates.png contact sheet beside the manifest.
    """
    logger = get_run_logger()
    manifest = pd.read_csv(manifest_path)
    hashes = duplicates.hashes_for(manifest, duplicates.PerceptualHashes(duplicates.memo_path(Path(cache_dir))))
    grouped = duplicates.find_groups(manifest, hashes, distance)
    report = duplicates.choose_rows(grouped, exclude_conflicting=exclude_conflicting)
    out = Path(manifest_path).parent
    table_path = duplicates.write_table(report, out)
    sheet_path = summary.plot_duplicate_groups(report.table, out / duplicates.DUPLICATES_PNG)
    grouped_path = out / "grouped.csv"
    report.used.drop(columns=list(duplicates.REPORT_COLUMNS)).to_csv(grouped_path, index=False)
    counts = {**report.counts(), "distance": distance, "excluded_conflicting": exclude_conflicting}
    logger.info(summary.duplicates_line(counts))
    if counts["conflicting_groups"]:
        logger.warning(
            f"{counts['conflicting_groups']} near-duplicate groups carry more than one label (label noise): see the "
            f"rows with conflicting=True in {table_path}."
        )
    return {
        "manifest": str(grouped_path),
        "duplicates": str(table_path),
        "contact_sheet": str(sheet_path) if sheet_path else None,
        **counts,
    }


@task(cache_policy=NO_CACHE)
def split_dataset(manifest_path: str, valid_pct: float, seed: int | None) -> dict:
    """Split the manifest into training and validation sets and write the vocabulary."""
    manifest = pd.read_csv(manifest_path)
    split = splitting.split_manifest(manifest, valid_pct=valid_pct, seed=seed)
    label_gate.check_split(split, fixed=splitting.FIXED_SPLIT_COLUMN in manifest.columns)
    out = Path(manifest_path).parent
    split.manifest.to_csv(out / "split.csv", index=False)
    (out / "vocab.json").write_text(json.dumps(list(split.vocab), indent=1, ensure_ascii=False) + "\n", "utf-8")
    return {
        "manifest": str(out / "split.csv"),
        "vocab": str(out / "vocab.json"),
        "classes": len(split.vocab),
        **split.sizes(),
    }


@task(cache_policy=NO_CACHE)
def presize_images(manifest_path: str, cache_dir: str, size: int) -> dict:
    """Presize every image not yet in the shared cache and write the manifest with the cached paths."""
    progress = ProgressArtifact(f"presize to {size}px: images")  # usually none: cleaning presized them
    result = presize.presize_images(pd.read_csv(manifest_path), Path(cache_dir), presize=size, on_progress=progress)
    presized_path = Path(manifest_path).parent / "presized.csv"
    result.manifest.to_csv(presized_path, index=False)
    return {"manifest": str(presized_path), "cache_hits": result.cache_hits, "written": result.written}


@task(cache_policy=NO_CACHE)
def summarize_data(
    manifest_path: str,
    vocab_path: str,
    *,
    source: str,
    labels_line: str,
    labeller: str,
    size: int,
    found: int,
    left_out_path: str,
    seed: int | None,
    cache_dir: str | None = None,
    near_duplicates: dict | None = None,
) -> dict:
    """Write the DataBlock.summary analogue, the per-class bar plot and a show_batch grid beside the manifest."""
    out = Path(manifest_path).parent
    split = _read_split(manifest_path, vocab_path)
    excluded_path = out / cleaning.EXCLUDED_NAME
    excluded = pd.read_csv(excluded_path) if excluded_path.is_file() else None
    text = summary.data_summary(
        split,
        source=source,
        labels=labels_line,
        labeller=labeller,
        presize=size,
        found=found,
        left_out=pd.read_csv(left_out_path),
        excluded=excluded,
        duplicates=near_duplicates,
    )
    summary_path = out / "summary.txt"
    summary_path.write_text(text, "utf-8")
    counts_path = summary.plot_class_counts(split.manifest, out / "class_counts.png")
    sheet = near_duplicates and near_duplicates["contact_sheet"]
    create_markdown_artifact(
        f"```\n{text}```\nPer-class bar plot: {counts_path}"
        + (f"\n\nNear-duplicate groups: {near_duplicates['duplicates']}; contact sheet: {sheet}" if sheet else ""),
        key="data-summary",
        description="DataBlock.summary analogue",
    )
    # Shown as training will see it: fastai's aug_transforms at the book's 224 px (never above the presize).
    augmentation = aug_transforms(min(AugmentSettings().size, size))
    grid_path = summary.show_training_batch(
        split,
        out / "show_batch.png",
        size=size,
        seed=seed,
        augmentation=augmentation,
        cache_dir=Path(cache_dir) if cache_dir else None,
    )
    return {"summary": str(summary_path), "show_batch": str(grid_path), "class_counts": str(counts_path)}


def _read_split(manifest_path: str, vocab_path: str) -> splitting.SplitManifest:
    manifest = pd.read_csv(manifest_path)
    vocab = tuple(json.loads(Path(vocab_path).read_text("utf-8")))
    return splitting.SplitManifest(manifest=manifest, vocab=vocab, valid_only=manifest.iloc[:0])  # the gate refused any


@task(cache_policy=NO_CACHE)
def make_synthetic_archive(breeds: int, images_per_breed: int, out_dir: str, seed: int = 0) -> str:
    """Generate a pets-like dataset (Oxford file names, a few broken and odd-mode files) and pack it as a .tgz once."""
    archive = Path(out_dir) / f"synthetic-pets-{breeds}x{images_per_breed}-seed{seed}.tgz"
    if not archive.is_file():  # generated once: the download stage then serves it from its cache
        with tempfile.TemporaryDirectory() as source:
            images = synthetic.make_pets_dataset(
                Path(source), breeds=breeds, images_per_breed=images_per_breed, seed=seed, broken=True, odd_modes=True
            )
            synthetic.pack_tgz(images, archive)
    return str(archive.resolve())
