"""The review table: every image with its label, the model's prediction and how wrong it looks, for a person to act on.

fastai's ImageClassifierCleaner shows, for one class and one of train or valid at a time, the images sorted by their
loss, largest first (fastai 2.8 fastai/vision/widgets.py, `_get_iw_info` and `on_change_ds`). The table here holds
the same ranking for every class and both splits at once, as a CSV a person edits (its `action` column) and
`lib.data.overrides` reads back; a contact sheet per class shows the top rows as fastai's plot_top_losses titles them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import ImageOps

from lib.common.files import write_atomically
from lib.data.images import open_rgb
from lib.evaluate.interpret import plot_top_losses
from lib.recipe import DEFAULT_REVIEW_PER_CLASS

REVIEW_DIR = "review"  # under the run's folder, and the artifact path in MLflow
REVIEW_CSV = "review.csv"
COLUMNS = ("file", "label", "predicted", "loss", "probability", "split", "sha256")
RANKING_COLUMNS = ("label_quality", "issue")  # only when an out-of-fold ranking gave them
ACTION_COLUMN = "action"
SHEET_SIDE = 160  # pixels of each picture on a contact sheet: a pet is recognisable, 8 of them stay under 1 MB
SHEET_SUPTITLE = "Prediction/Label/Loss/Probability"  # fastai plot_top_losses' grid title, "Actual" being the label
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def review_table(
    manifest: pd.DataFrame,
    probabilities: np.ndarray,
    vocab: Sequence[str],
    *,
    label_quality: np.ndarray | None = None,
    is_issue: np.ndarray | None = None,
) -> pd.DataFrame:
    """Rank every manifest row (`path`, `label`, `split`, `sha256`) for review, from the model's N x C probabilities.

    `loss` is the cross-entropy of the row's label, -log p(label). `probability` is that of the predicted class, the
    number fastai's plot_top_losses shows (`r.max()` in fastai 2.8 fastai/vision/learner.py). Rows come per class in
    vocabulary order, within a class by loss, largest first, or by `label_quality`, lowest first, when given (with
    `is_issue`, confident learning's verdict per row). The `action` column is empty for the reviewer to fill in.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    count = len(manifest)
    if probabilities.shape != (count, len(vocab)):
        raise ValueError(
            f"Expected probabilities of shape ({count}, {len(vocab)}) for {count} rows and {len(vocab)} classes, got "
            f"{probabilities.shape}: predict every manifest row, in manifest order, with the model of this vocabulary."
        )
    index = {name: position for position, name in enumerate(vocab)}
    unknown = sorted(set(manifest["label"]) - set(index))
    if unknown:
        raise ValueError(f"Labels {unknown[:5]} are not in the model's vocabulary: review the data it was trained on.")
    targets = manifest["label"].map(index).to_numpy(dtype=np.int64)
    picked = probabilities[np.arange(count), targets]
    # a probability that underflowed to 0 would give an infinite loss: the smallest normal float64 bounds it
    loss = -np.log(np.maximum(picked, np.finfo(np.float64).tiny))
    predicted = probabilities.argmax(axis=1)
    table = pd.DataFrame(
        {
            "file": manifest["path"].to_numpy(),
            "label": manifest["label"].to_numpy(),
            "predicted": [vocab[i] for i in predicted],
            "loss": loss,
            "probability": probabilities.max(axis=1),
            "split": manifest["split"].to_numpy(),
            "sha256": manifest["sha256"].to_numpy(),
        }
    )
    if label_quality is not None:
        table["label_quality"] = _aligned(label_quality, count, "label_quality")
    if is_issue is not None:
        table["issue"] = _aligned(is_issue, count, "is_issue").astype(bool)
    table[ACTION_COLUMN] = ""
    # within a class: worst first; equal scores keep manifest order (a stable sort on the class, then the score)
    score = table["label_quality"].to_numpy() if label_quality is not None else -loss
    order = np.lexsort((np.arange(count), score, targets))
    return table.iloc[order].reset_index(drop=True)


def _aligned(values: np.ndarray, count: int, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (count,):
        raise ValueError(f"{name} must hold one value per manifest row ({count}), got shape {values.shape}.")
    return values


def write_review(
    table: pd.DataFrame, out_dir: Path, *, per_class: int = DEFAULT_REVIEW_PER_CLASS
) -> dict[str, Path | dict[str, Path]]:
    """Write review.csv and, per class, a contact sheet of its first `per_class` rows; return their paths.

    Returns {"table": review.csv, "sheets": {class: its PNG}}. Sheets are named `review_<position>_<class>.png`, the
    class's position in the table first, so odd class names never collide once made file-safe.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("review_*.png"):  # a reused folder keeps no sheet of an earlier review
        stale.unlink()
    csv_path = write_atomically(out_dir / REVIEW_CSV, lambda temporary: table.to_csv(temporary, index=False))
    sheets = {}
    for position, (label, rows) in enumerate(table.groupby("label", sort=False)):
        top = rows.head(per_class)
        name = f"review_{position:03d}_{_UNSAFE_NAME.sub('_', str(label))}.png"
        sheets[str(label)] = plot_top_losses(
            _thumbnails(top["file"]), _titles(top), out_dir / name, suptitle=f"{label}: {SHEET_SUPTITLE}"
        )
    return {"table": csv_path, "sheets": sheets}


def _titles(rows: pd.DataFrame) -> list[str]:
    """fastai plot_top_losses' "predicted/actual / loss / probability" (lib.evaluate.interpret.top_loss_titles)."""
    return [
        f"{row.predicted}/{row.label} / {row.loss:.2f} / {row.probability:.2f}" for row in rows.itertuples(index=False)
    ]


def _thumbnails(files: Sequence[str]) -> torch.Tensor:
    """The whole picture of each file, scaled into a SHEET_SIDE square and padded with white: nothing cropped away."""
    pictures = [ImageOps.pad(open_rgb(file), (SHEET_SIDE, SHEET_SIDE), color=(255, 255, 255)) for file in files]
    return torch.stack([torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1) for picture in pictures])
