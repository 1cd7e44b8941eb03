"""The `DataBlock.summary` analogue, a show_batch image grid and a bar chart of images per class."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from lib.common.files import write_atomically
from lib.common.plots import pyplot, save_figure
from lib.data.augment import BatchAugmentation
from lib.data.images import open_rgb
from lib.data.loading import make_loader, presized_images
from lib.data.pictures import presized_shape
from lib.data.splitting import SplitManifest

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SHOW_BATCH_MAX = 9  # fastai show_batch: max_n=9
SHOW_BATCH_CACHE = "show-batch-v1"  # bump when the grid's drawing changes, so old grids are drawn again
INCHES_PER_IMAGE = 3  # fastai show_batch: figsize from 3 inches per image
MAX_VOCAB_SHOWN = 40
# Past 60 classes the chart keeps the 60 with the fewest images: they are the ones to act on (too few to learn from
# or to validate with), a fixed cap keeps the names readable in a figure at most ~20 inches tall, and the data
# summary's text table lists every class anyway.
MAX_CLASSES_PLOTTED = 60
INCHES_PER_CLASS = 0.3  # two bars and a 9-point name per class
CLASS_COUNTS_DPI = 100
# The duplicates contact sheet: one row per group, the largest groups first, each row cut to the first few members
# (sorted by distance from the group's first image): enough to judge by eye whether a group is one picture.
SHEET_GROUPS = 8
SHEET_MEMBERS = 6
SHEET_INCHES = 1.6
SHEET_DPI = 80


def collate_or_explain(images: list[torch.Tensor]) -> tuple[torch.Tensor | None, str]:
    """Stack images into a batch, or return None and a message listing the shapes that cannot be stacked."""
    shapes = [tuple(image.shape) for image in images]
    if len(set(shapes)) > 1:
        listed = ", ".join("x".join(map(str, s)) for s in shapes)
        return None, (
            "Error! It's not possible to collate your items in a batch: they have different shapes "
            f"({listed}). Resize every item to the same size first, e.g. presize with --presize 460."
        )
    batch = torch.stack(images)
    return batch, f"gives {_describe_tensor(batch)}"


def data_summary(
    split: SplitManifest,
    *,
    source: str,
    labels: str,
    labeller: str,
    presize: int | None,
    found: int,
    left_out: pd.DataFrame | None = None,
    excluded: pd.DataFrame | None = None,
    duplicates: dict | None = None,
    batch_size: int = 4,
) -> str:
    """Describe the data stage step by step, as fastai's DataBlock.summary does, and return it as text.

    Args:
        split: the split manifest; needs `presized_path` unless presize is None.
        source: where the items were collected from.
        labels: the line saying which label source labelled them and why (`LabelledImages.describe`).
        labeller: the label function as the sample trace names it, e.g. `regex('(.+)_\\d+.jpg$')`.
        presize: short side of the presized images, or None to trace the originals (whose batch cannot collate).
        found: number of image files found.
        left_out: what labelling left out or skipped, with a `reason` column (lib/data/labelling.py).
        excluded: rows removed by cleaning, with a `reason` column.
        duplicates: the near-duplicate counts (`DuplicateReport.counts`) with `distance` and `excluded_conflicting`
            (the recipe's settings), or None when duplicates were not looked for.
        batch_size: items in the traced batch (fastai's summary uses 4).
    """
    lines = [f"Collecting items from {source}", f"Found {found} items", labels]
    lines += _reason_lines("Left out while labelling", left_out, "left_out.csv")
    lines += _reason_lines("Cleaning excluded", excluded, "excluded.csv")
    lines.append(duplicates_line(duplicates))
    sizes = split.sizes()
    lines.append(f"2 datasets of sizes {sizes['train']},{sizes['valid']}")
    lines += _vocab_lines(split)
    lines += _class_count_lines(split.manifest)
    lines += _sample_lines(split, labeller, presize)
    lines += _batch_lines(split.manifest, presize, batch_size)
    return "\n".join(lines) + "\n"


def _reason_lines(what: str, rows: pd.DataFrame | None, listed_in: str) -> list[str]:
    if rows is None or rows.empty:
        return [f"{what}: no files"]
    counts = rows["reason"].value_counts().sort_index()
    return [f"{what} {len(rows)} files ({listed_in}): " + ", ".join(f"{r} {n}" for r, n in counts.items())]


def duplicates_line(duplicates: dict | None) -> str:
    """One line on the near-duplicate groups found, and what was left out because of them."""
    if duplicates is None:
        return "Near-duplicates: not looked for (--no-find-duplicates)"
    what = f"Near-duplicates (hashes within {duplicates['distance']} bits)"
    if not duplicates["duplicate_groups"]:
        return f"{what}: none"
    conflicting = duplicates["conflicting_groups"]
    handled = "left out"
    if not duplicates["excluded_conflicting"]:
        handled = "kept (--exclude-conflicting-duplicates leaves them out)"
    return (
        f"{what}: {duplicates['duplicate_groups']} groups holding {duplicates['images_in_groups']} images "
        f"(duplicates.csv), each kept on one side of the split; {duplicates['exact_copies']} exact copies used once; "
        f"{conflicting} groups with conflicting labels{', ' + handled if conflicting else ''}; "
        f"{duplicates['left_out']} images left out"
        + (
            f"; {duplicates['near_other_group']} images also near one of another group"
            * bool(duplicates["near_other_group"])
        )
    )


def duplicates_figure(table: pd.DataFrame) -> Figure | None:
    """Build a contact sheet of the largest near-duplicate groups (a `duplicates.csv` table), or None for no groups.

    One row per group, largest first (up to SHEET_GROUPS), its first SHEET_MEMBERS images by distance, each titled
    with its label, its distance in bits from the group's first image, and whether it is an exact copy.
    """
    if table.empty:
        return None
    sizes = table["group"].value_counts()
    largest = sorted(sizes.index, key=lambda group: (-sizes[group], group))[:SHEET_GROUPS]
    columns = min(SHEET_MEMBERS, int(sizes.max()))
    figure, axes = pyplot().subplots(
        len(largest), columns, figsize=(columns * SHEET_INCHES, len(largest) * (SHEET_INCHES + 0.3)), squeeze=False
    )
    for row, group in zip(axes, largest, strict=True):
        members = table[table["group"] == group].head(columns)
        for axis in row:
            axis.axis("off")
        for axis, member in zip(row, members.itertuples(), strict=False):
            image = open_rgb(member.path)
            image.thumbnail((160, 160))
            axis.imshow(image)
            mark = ", exact" if member.exact else ""
            axis.set_title(f"{member.label}\n{member.distance} bits{mark}", fontsize=7)
        label = f"group {group}\n{sizes[group]} images"
        row[0].text(-0.1, 0.5, label, transform=row[0].transAxes, ha="right", va="center", fontsize=8)
    figure.tight_layout()
    return figure


def plot_duplicate_groups(table: pd.DataFrame, out_path: Path) -> Path | None:
    """Save duplicates_figure(table) as a PNG and return its path; None (and no file) when there are no groups."""
    figure = duplicates_figure(table)
    if figure is None:
        Path(out_path).unlink(missing_ok=True)  # a reused folder keeps no sheet of an earlier run
        return None
    return save_figure(figure, out_path, dpi=SHEET_DPI)


def _vocab_lines(split: SplitManifest) -> list[str]:
    shown = list(split.vocab[:MAX_VOCAB_SHOWN]) + (["..."] if len(split.vocab) > MAX_VOCAB_SHOWN else [])
    return [f"Vocabulary ({len(split.vocab)} classes): {shown}"]


def _class_count_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per class (rows, sorted by name) and split (columns train and valid, zero where a class has none)."""
    return pd.crosstab(manifest["label"], manifest["split"]).reindex(columns=["train", "valid"], fill_value=0)


def _class_count_lines(manifest: pd.DataFrame) -> list[str]:
    table = _class_count_table(manifest)
    width = max(len(label) for label in table.index)
    lines = ["Items per class (train / valid):"]
    lines += [f"  {label:<{width}}  {row.train:>5}  {row.valid:>5}" for label, row in table.iterrows()]
    return lines


def class_count_figure(manifest: pd.DataFrame) -> Figure:
    """Build a horizontal bar chart of train and valid images per class, classes top to bottom by name.

    The figure grows INCHES_PER_CLASS per class; above MAX_CLASSES_PLOTTED classes it shows the ones with the fewest
    images (ties by name) and says so in the title. Each bar carries its count.
    """
    table = _class_count_table(manifest)
    title = "Images per class"
    if len(table) > MAX_CLASSES_PLOTTED:
        smallest = sorted(table.index, key=lambda label: (int(table.loc[label].sum()), label))[:MAX_CLASSES_PLOTTED]
        title += f" (the {MAX_CLASSES_PLOTTED} smallest of {len(table)} classes)"
        table = table.loc[sorted(smallest)]
    figure, axis = pyplot().subplots(figsize=(8, 1.6 + INCHES_PER_CLASS * len(table)), layout="constrained")
    bar_height = 0.4
    for offset, split_name in ((-bar_height / 2, "train"), (bar_height / 2, "valid")):
        positions = [row + offset for row in range(len(table))]
        bars = axis.barh(positions, table[split_name].tolist(), height=bar_height, label=split_name)
        axis.bar_label(bars, padding=2, fontsize=8)
    axis.set_yticks(range(len(table)), [str(label) for label in table.index], fontsize=9)
    axis.set_ylim(len(table) - 0.5, -0.5)  # the first class on top, as in the vocabulary
    axis.margins(x=0.08)  # room for the count after the longest bar
    axis.xaxis.get_major_locator().set_params(integer=True)  # image counts: no 2.5 ticks
    axis.set_xlabel("images")
    axis.set_title(title)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    return figure


def plot_class_counts(manifest: pd.DataFrame, out_path: Path) -> Path:
    """Save class_count_figure(manifest) as a PNG and return its path."""
    return save_figure(class_count_figure(manifest), out_path, dpi=CLASS_COUNTS_DPI)


def _sample_lines(split: SplitManifest, labeller: str, presize: int | None) -> list[str]:
    row = split.manifest[split.manifest["split"] == "train"].iloc[0]
    lines = ["Building one sample", f"  Pipeline: {labeller} -> vocabulary index"]
    lines += [
        f"    starting from {row['path']}",
        f"    applying {labeller} gives {row['label']}",
        f"    applying vocabulary index gives {int(row['target'])}",
        "  Pipeline: open_rgb -> presize -> crop" if presize else "  Pipeline: open_rgb -> to_tensor",
        f"    starting from {row['path']}",
    ]
    image = open_rgb(row["path"])
    lines.append(f"    applying open_rgb gives RGB image {image.width}x{image.height}")
    if presize:
        width, height = presized_shape(image.width, image.height, presize)
        lines.append(
            f"    applying presize({presize}) gives RGB image {width}x{height} (cached at {row['presized_path']})"
        )
        lines.append(f"    applying crop({presize}) gives uint8 tensor 3x{presize}x{presize}")
    else:
        lines.append(f"    applying to_tensor gives uint8 tensor 3x{image.height}x{image.width}")
    return lines


def _batch_lines(manifest: pd.DataFrame, presize: int | None, batch_size: int) -> list[str]:
    train = manifest[manifest["split"] == "train"].head(batch_size)
    lines = [f"Building one batch of {len(train)}", "  Collating items in a batch"]
    if presize is None:
        images = [pil_to_tensor(open_rgb(path)) for path in train["path"]]
    else:
        centre_crops = presized_images(train, presize)
        images = [centre_crops[(i, 0.5, 0.5)][0] for i in range(len(train))]
    _, message = collate_or_explain(images)
    return lines + [f"  {message}"]


def _describe_tensor(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} tensor {'x'.join(map(str, tensor.shape))}"


def show_batch(
    images: torch.Tensor,
    titles: list[str],
    out_path: Path,
    *,
    max_n: int = SHOW_BATCH_MAX,
    nrows: int | None = None,
    ncols: int | None = None,
) -> Path:
    """Draw up to max_n uint8 CxHxW images in a grid with their titles and save it as a PNG.

    The grid follows fastai's default: rows = int(sqrt(n)), cols = ceil(n / rows), 3 inches per image.
    """
    figure = image_grid(images[:max_n], titles, nrows=nrows, ncols=ncols)
    figure.tight_layout()
    return save_figure(figure, out_path, dpi=72)


def image_grid(
    images: torch.Tensor,
    titles: Sequence[str],
    *,
    nrows: int | None = None,
    ncols: int | None = None,
    title_size: float | None = None,
) -> Figure:
    """Build a Figure showing uint8 CxHxW images with their titles, fastai's grid: int(sqrt(n)) rows, 3 inches each."""
    count = len(images)
    nrows = nrows or int(math.sqrt(count))
    ncols = ncols or math.ceil(count / nrows)
    figure, axes = pyplot().subplots(
        nrows, ncols, figsize=(ncols * INCHES_PER_IMAGE, nrows * INCHES_PER_IMAGE), squeeze=False
    )
    for position, axis in enumerate(axes.flat):
        axis.axis("off")
        if position < count:
            axis.imshow(images[position].permute(1, 2, 0).cpu().numpy())
            axis.set_title(titles[position], fontsize=title_size)
    return figure


def show_training_batch(
    split: SplitManifest,
    out_path: Path,
    *,
    size: int,
    seed: int | None = None,
    augmentation: BatchAugmentation | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Draw one shuffled training batch of up to nine images with their class names, as the model would see it.

    With an augmentation the batch goes through its training path (fastai's show_batch shows augmented batches);
    without one it shows the random presize crops alone. With a cache_dir, a grid drawn before from the same images,
    labels and settings is copied instead of drawn again (drawing is most of a warm data stage's time).
    """
    train = split.manifest[split.manifest["split"] == "train"]
    if cache_dir is None:
        return _draw_training_batch(train, split.vocab, out_path, size=size, seed=seed, augmentation=augmentation)
    cached = Path(cache_dir) / SHOW_BATCH_CACHE / f"{_grid_key(train, split.vocab, size, seed, augmentation)}.png"
    if cached.is_file():
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, out_path)
        return out_path
    drawn = _draw_training_batch(train, split.vocab, out_path, size=size, seed=seed, augmentation=augmentation)
    write_atomically(cached, lambda temporary: shutil.copyfile(drawn, temporary))
    return drawn


def _grid_key(
    train: pd.DataFrame, vocab: Sequence[str], size: int, seed: int | None, augmentation: BatchAugmentation | None
) -> str:
    """Digest of everything the grid depends on: the images (by content digest), labels, order and settings."""
    described = {
        "images": train["presized_path"].astype(str).tolist(),  # content-addressed: the path names the bytes
        "targets": train["target"].astype(int).tolist(),
        "vocab": list(vocab),
        "size": size,
        "seed": seed,
        "augmentation": repr(augmentation),
    }
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def _draw_training_batch(
    train: pd.DataFrame,
    vocab: Sequence[str],
    out_path: Path,
    *,
    size: int,
    seed: int | None,
    augmentation: BatchAugmentation | None,
) -> Path:
    batch_size = min(SHOW_BATCH_MAX, len(train))
    loader = make_loader(train, size=size, train=True, batch_size=batch_size, workers=0, seed=seed)
    images, targets = next(iter(loader))
    if augmentation is not None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        images = augmentation.decode(augmentation(images, train=True, generator=generator))
    return show_batch(images, [vocab[t] for t in targets.tolist()], out_path)
