import hashlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lib.data.augment import aug_transforms
from lib.data.labelling import label_images
from lib.data.presize import presize_images
from lib.data.splitting import split_manifest
from lib.data.summary import (
    CLASS_COUNTS_DPI,
    INCHES_PER_CLASS,
    MAX_CLASSES_PLOTTED,
    class_count_figure,
    collate_or_explain,
    data_summary,
    plot_class_counts,
    show_batch,
    show_training_batch,
)
from tests.support.images import write_image

PRESIZE = 40


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary")
    breeds = {"Bengal": (200, 40, 40), "beagle": (40, 200, 40), "pug": (40, 40, 200)}
    for b, (breed, color) in enumerate(breeds.items()):
        for i in range(1, 9):
            write_image(root / "images" / f"{breed}_{i}.jpg", (50 + 7 * i + b, 45 + 3 * i), color)
    manifest = label_images(root / "images").manifest
    manifest["sha256"] = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in manifest["path"]]
    result = split_manifest(manifest, valid_pct=0.25, seed=42)
    presized = presize_images(result.manifest, root / "cache", presize=PRESIZE, progress=False).manifest
    return type(result)(manifest=presized, vocab=result.vocab, valid_only=result.valid_only)


LABELLER = "regex('(.+)_\\\\d+.jpg$')"


def test_summary_traces_items_labels_split_sample_and_batch(split):
    labels = "Labels from regex '(.+)_\\\\d+.jpg$' over each image's path under the data root: auto: ..."
    text = data_summary(split, source="/data/images", labels=labels, labeller=LABELLER, presize=PRESIZE, found=24)

    assert "Collecting items from /data/images" in text
    assert "Found 24 items" in text and labels in text
    assert "2 datasets of sizes 18,6" in text
    assert "Vocabulary (3 classes): ['Bengal', 'beagle', 'pug']" in text
    counts = split.manifest.groupby(["label", "split"]).size()
    assert f"  pug     {counts['pug', 'train']:>5}  {counts['pug', 'valid']:>5}" in text
    first = split.manifest[split.manifest["split"] == "train"].iloc[0]
    assert f"starting from {first['path']}" in text
    assert f"applying {LABELLER} gives {first['label']}" in text
    with Image.open(first["path"]) as original:
        assert f"applying open_rgb gives RGB image {original.width}x{original.height}" in text
    assert f"applying crop({PRESIZE}) gives uint8 tensor 3x{PRESIZE}x{PRESIZE}" in text
    assert f"gives uint8 tensor 4x3x{PRESIZE}x{PRESIZE}" in text


def test_summary_without_presize_explains_why_the_batch_cannot_collate(split):
    text = data_summary(split, source="/d", labels="", labeller=LABELLER, presize=None, found=24)
    assert "Error! It's not possible to collate your items in a batch" in text
    shapes = set()
    for path in split.manifest[split.manifest["split"] == "train"].head(4)["path"]:
        with Image.open(path) as image:
            shapes.add(f"3x{image.height}x{image.width}")
    assert all(shape in text for shape in shapes) and len(shapes) > 1


def test_collate_or_explain():
    import torch

    batch, message = collate_or_explain([torch.zeros(3, 4, 4, dtype=torch.uint8)] * 2)
    assert batch.shape == (2, 3, 4, 4) and message == "gives uint8 tensor 2x3x4x4"
    batch, message = collate_or_explain([torch.zeros(3, 4, 4), torch.zeros(3, 5, 4)])
    assert batch is None and "3x4x4, 3x5x4" in message


def test_summary_reports_what_labelling_and_cleaning_left_out(split):
    excluded = pd.DataFrame({"path": ["a", "b", "c"], "reason": ["empty", "truncated", "empty"]})
    left_out = pd.DataFrame({"path": ["._a.jpg", ".git", "n.txt", "x.jpg"]})
    left_out["reason"] = ["resource_fork", "hidden", "not_image", "resource_fork"]
    text = data_summary(
        split, source="/d", labels="", labeller="x", presize=PRESIZE, found=27, left_out=left_out, excluded=excluded
    )
    assert "Cleaning excluded 3 files (excluded.csv): empty 2, truncated 1" in text
    assert "Left out while labelling 4 files (left_out.csv): hidden 1, not_image 1, resource_fork 2" in text
    clean = data_summary(split, source="/d", labels="", labeller="x", presize=PRESIZE, found=24)
    assert "Cleaning excluded: no files" in clean and "Left out while labelling: no files" in clean


def test_show_batch_draws_a_titled_grid(split, tmp_path):
    path = show_training_batch(split, tmp_path / "grid.png", size=PRESIZE, seed=0)
    with Image.open(path) as grid:
        # nine images: int(sqrt(9)) = 3 rows, 3 columns, 3 inches each at 72 dpi
        assert grid.size == (3 * 3 * 72, 3 * 3 * 72)


def test_show_batch_can_show_the_augmented_training_batch(split, tmp_path):
    plain = show_training_batch(split, tmp_path / "plain.png", size=PRESIZE, seed=0)
    augmented = show_training_batch(
        split, tmp_path / "augmented.png", size=PRESIZE, seed=0, augmentation=aug_transforms(32)
    )
    with Image.open(plain) as before, Image.open(augmented) as after:
        assert before.size == after.size and before.tobytes() != after.tobytes()


def test_show_batch_honours_rows_and_columns(tmp_path):
    import torch

    images = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    path = show_batch(images, ["pug"] * 5, tmp_path / "row.png", nrows=1, ncols=3)
    untitled = show_batch(images, [""] * 5, tmp_path / "untitled.png", nrows=1, ncols=3)
    with Image.open(path) as grid, Image.open(untitled) as blank:
        assert grid.size == (3 * 3 * 72, 1 * 3 * 72)
        assert grid.tobytes() != blank.tobytes()  # the titles are drawn


def test_show_batch_grid_is_drawn_once_per_cache_and_again_when_its_inputs_change(split, tmp_path, monkeypatch):
    from lib.data import summary

    drawn = []
    real = summary._draw_training_batch
    monkeypatch.setattr(summary, "_draw_training_batch", lambda *a, **k: drawn.append(1) or real(*a, **k))
    augmentation = aug_transforms(24)
    first = show_training_batch(
        split, tmp_path / "one.png", size=PRESIZE, seed=1, augmentation=augmentation, cache_dir=tmp_path
    )
    again = show_training_batch(
        split, tmp_path / "two.png", size=PRESIZE, seed=1, augmentation=augmentation, cache_dir=tmp_path
    )
    assert len(drawn) == 1 and again.read_bytes() == first.read_bytes()
    show_training_batch(
        split, tmp_path / "three.png", size=PRESIZE, seed=2, augmentation=augmentation, cache_dir=tmp_path
    )
    assert len(drawn) == 2  # another seed shows another batch


def _counts_manifest(classes: int) -> pd.DataFrame:
    """Class c<i> has i % 23 + 2 training and i % 5 validation images (some have none), listed in shuffled order."""
    rows = []
    for i in range(classes):
        rows += [(f"c{i:03d}", "train")] * (i % 23 + 2) + [(f"c{i:03d}", "valid")] * (i % 5)
    return pd.DataFrame(rows, columns=["label", "split"]).sample(frac=1, random_state=0)


def _drawn_counts(figure) -> dict[str, dict[str, int]]:
    """The bar lengths by split and class name, read back from the figure's artists."""
    axis = figure.axes[0]
    names = [tick.get_text() for tick in axis.get_yticklabels()]
    drawn = {}
    for bars, split_name in zip(axis.containers, ("train", "valid"), strict=True):
        assert bars.get_label() == split_name
        drawn[split_name] = dict(zip(names, (int(bar.get_width()) for bar in bars), strict=True))
    return drawn


@pytest.fixture
def count_figure():
    """class_count_figure, with every figure it built closed after the test (pyplot keeps figures open)."""
    from lib.common.plots import pyplot

    built = []
    yield lambda manifest: built.append(class_count_figure(manifest)) or built[-1]
    for figure in built:
        pyplot().close(figure)


def test_class_count_bars_are_the_images_per_class_and_split(count_figure):
    manifest = _counts_manifest(7)
    figure = count_figure(manifest)
    expected = pd.crosstab(manifest["label"], manifest["split"])
    assert _drawn_counts(figure) == {s: expected[s].to_dict() for s in ("train", "valid")}
    axis = figure.axes[0]
    assert [tick.get_text() for tick in axis.get_yticklabels()] == [f"c{i:03d}" for i in range(7)]
    assert axis.get_ylim()[0] > axis.get_ylim()[1]  # the first class at the top
    assert axis.get_title() == "Images per class"
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["train", "valid"]
    labels = [text.get_text() for text in axis.texts]  # each bar's count written beside it
    assert labels == [str(n) for s in ("train", "valid") for n in expected[s]]


def test_a_split_with_no_images_of_a_class_draws_zero_length_bars(count_figure):
    manifest = pd.DataFrame({"label": ["a", "a", "b"], "split": ["train", "train", "train"]})
    assert _drawn_counts(count_figure(manifest)) == {"train": {"a": 2, "b": 1}, "valid": {"a": 0, "b": 0}}


def test_class_count_figure_grows_with_the_classes_and_keeps_the_smallest_past_the_cap(count_figure):
    heights = {n: count_figure(_counts_manifest(n)).get_figheight() for n in (5, 40, MAX_CLASSES_PLOTTED)}
    assert heights[40] - heights[5] == pytest.approx(35 * INCHES_PER_CLASS)
    manifest = _counts_manifest(MAX_CLASSES_PLOTTED + 20)
    figure = count_figure(manifest)
    assert figure.get_figheight() == pytest.approx(heights[MAX_CLASSES_PLOTTED])
    totals = manifest["label"].value_counts()
    smallest = sorted(totals.index, key=lambda label: (totals[label], label))[:MAX_CLASSES_PLOTTED]
    drawn = _drawn_counts(figure)["train"]
    assert list(drawn) == sorted(smallest)
    assert max(totals[label] for label in drawn) <= min(totals[label] for label in totals.index if label not in drawn)
    assert figure.axes[0].get_title() == f"Images per class (the {MAX_CLASSES_PLOTTED} smallest of 80 classes)"


def test_plot_class_counts_writes_a_png_of_the_figure_size(tmp_path, count_figure):
    manifest = _counts_manifest(12)
    path = plot_class_counts(manifest, tmp_path / "plots" / "class_counts.png")
    assert path == tmp_path / "plots" / "class_counts.png"
    width, height = count_figure(manifest).get_size_inches()
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == (round(width * CLASS_COUNTS_DPI), round(height * CLASS_COUNTS_DPI))
