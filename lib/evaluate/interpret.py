"""Classification interpretation: confusion matrix, most confused pairs, top losses, the loss curves, their plots.

Everything here works from saved numbers, without running a model: validation `Predictions` in dataset order
(lib/evaluate/evaluation.py computes them from an exported model; `save` and `load` keep them in a file) and the
Trainer's record of losses. It mirrors fastai's ClassificationInterpretation and Recorder.plot_loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from lib.common.files import write_atomically, write_text_atomically
from lib.common.plots import pyplot, save_figure
from lib.data.summary import image_grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TOP_LOSS_TITLE_SIZE = 9  # points: two title lines fit above a 3-inch image
TOP_LOSSES_SUPTITLE = "Prediction/Actual/Loss/Probability"  # fastai plot_top_losses grid title
LOSS_PLOT_SKIP_START = 5  # fastai Recorder.plot_loss: skip_start=5 (the first batches' losses dwarf the rest)


@dataclass(frozen=True)
class Predictions:
    """Validation predictions in dataset order, as fastai's get_preds(with_loss=True) returns them."""

    probabilities: torch.Tensor  # N x C float, softmax of the logits
    targets: torch.Tensor  # N int64 class indices
    losses: torch.Tensor  # N float, per-item cross-entropy (negative log-likelihood of the probabilities)

    def __post_init__(self) -> None:
        count = len(self.targets)
        if self.probabilities.ndim != 2 or len(self.probabilities) != count or self.losses.shape != (count,):
            raise ValueError(
                f"Predictions need probabilities N x C, targets N and losses N; got shapes "
                f"{tuple(self.probabilities.shape)}, {tuple(self.targets.shape)}, {tuple(self.losses.shape)}. "
                "Concatenate the batches of every output along the first dimension."
            )

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> Predictions:
        """Build predictions from raw N x C logits and N targets, on the CPU in float32."""
        if logits.ndim != 2 or targets.ndim != 1 or len(logits) != len(targets):
            raise ValueError(
                f"Expected logits N x C and targets N, got shapes {tuple(logits.shape)} and {tuple(targets.shape)}."
            )
        # float32 first: logits from a mixed-precision model may be float16, whose softmax and loss lose precision.
        logits = logits.detach().float().cpu()
        targets = targets.detach().long().cpu()
        # fastai's interpretation sets the loss to reduction='none' on the raw logits, so one loss per item.
        losses = F.cross_entropy(logits, targets, reduction="none")
        return cls(probabilities=logits.softmax(dim=1), targets=targets, losses=losses)

    @classmethod
    def from_probabilities(cls, probabilities: torch.Tensor, targets: torch.Tensor) -> Predictions:
        """Build predictions from N x C probabilities (a blend of softmaxes), the losses their negative log-likelihood.

        For the softmax of logits this is the cross-entropy `from_logits` computes, up to rounding.
        """
        probabilities = probabilities.detach().float().cpu()
        targets = targets.detach().long().cpu()
        # a probability that underflowed to 0 would give an infinite loss: clamp it to the smallest normal float32
        picked = probabilities.gather(1, targets[:, None]).squeeze(1).clamp_min(torch.finfo(torch.float32).tiny)
        return cls(probabilities=probabilities, targets=targets, losses=-picked.log())

    def save(self, path: Path) -> Path:
        """Write the predictions to a torch file, atomically."""
        return write_atomically(Path(path), lambda temporary: torch.save(asdict(self), temporary))

    @classmethod
    def load(cls, path: Path) -> Predictions:
        """Read predictions written by `save` (no code from the file runs: weights_only=True)."""
        return cls(**torch.load(Path(path), map_location="cpu", weights_only=True))

    @property
    def predicted(self) -> torch.Tensor:
        """Return the predicted class of each item (argmax of the probabilities)."""
        return self.probabilities.argmax(dim=1)

    def error_rate(self) -> float:
        """Return the fraction of items whose predicted class is not the target."""
        if len(self.targets) == 0:
            raise ValueError("error_rate needs at least one prediction; the validation set is empty.")
        return float((self.predicted != self.targets).float().mean())

    def accuracy(self) -> float:
        """Return the fraction of items whose predicted class is the target."""
        return 1.0 - self.error_rate()


def confusion_matrix(predictions: Predictions, n_classes: int) -> np.ndarray:
    """Count items per (actual, predicted) class pair: cm[actual, predicted], int64."""
    if predictions.probabilities.shape[1] != n_classes:
        raise ValueError(
            f"The predictions have {predictions.probabilities.shape[1]} classes but n_classes={n_classes}; "
            "pass len(vocab) of the vocabulary the model was trained with."
        )
    actual = predictions.targets.numpy()
    if actual.size and (actual.min() < 0 or actual.max() >= n_classes):
        raise ValueError(f"Targets must lie in [0, {n_classes}), got values from {actual.min()} to {actual.max()}.")
    pairs = actual * n_classes + predictions.predicted.numpy()
    return np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.int64)


def most_confused(cm: np.ndarray, vocab: Sequence[str], *, min_val: int = 1) -> list[tuple[str, str, int]]:
    """List (actual, predicted, count) off-diagonal pairs with count >= min_val, most frequent first.

    Equal counts keep row-major order: by actual class index, then predicted class index (vocabulary order).
    """
    cm = _checked_matrix(cm, vocab)
    if min_val < 1:
        raise ValueError(f"min_val must be at least 1, got {min_val}: a pair confused 0 times is not a confusion.")
    off_diagonal = cm.copy()
    np.fill_diagonal(off_diagonal, 0)
    actual, predicted = np.nonzero(off_diagonal >= min_val)  # nonzero walks row-major
    counts = off_diagonal[actual, predicted]
    order = np.argsort(-counts, kind="stable")  # stable: ties keep the row-major order
    return [(vocab[actual[i]], vocab[predicted[i]], int(counts[i])) for i in order]


def top_losses(
    predictions: Predictions, k: int | None = None, *, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the k largest (or smallest) per-item losses and their dataset indices; all items when k is None."""
    count = len(predictions.losses)
    k = count if k is None else k
    if not 0 <= k <= count:
        raise ValueError(f"k={k} is outside 0..{count}: there are {count} predictions.")
    values, indices = torch.topk(predictions.losses, k, largest=largest, sorted=True)
    return values, indices


def top_loss_titles(predictions: Predictions, indices: torch.Tensor | Sequence[int], vocab: Sequence[str]) -> list[str]:
    """Title each item "predicted/actual / loss / probability of the predicted class", as fastai plot_top_losses."""
    titles = []
    for index in torch.as_tensor(indices).tolist():
        probabilities = predictions.probabilities[index]
        predicted = int(probabilities.argmax())
        actual = int(predictions.targets[index])
        loss = float(predictions.losses[index])
        titles.append(f"{vocab[predicted]}/{vocab[actual]} / {loss:.2f} / {float(probabilities[predicted]):.2f}")
    return titles


def plot_confusion_matrix(
    cm: np.ndarray,
    vocab: Sequence[str],
    out_path: Path,
    *,
    normalize: bool = False,
    title: str = "Confusion matrix",
    cmap: str = "Blues",
    norm_dec: int = 2,
    figsize: tuple[float, float] = (12, 12),  # fastbook ch. 5: plot_confusion_matrix(figsize=(12,12), dpi=60)
    dpi: int = 60,
) -> Path:
    """Draw the confusion matrix with class names and cell values and save it as a PNG."""
    figure = _confusion_figure(
        cm, vocab, normalize=normalize, title=title, cmap=cmap, norm_dec=norm_dec, figsize=figsize, dpi=dpi
    )
    return save_figure(figure, out_path, dpi=dpi)


def plot_top_losses(
    images: torch.Tensor, titles: Sequence[str], out_path: Path, *, suptitle: str = TOP_LOSSES_SUPTITLE
) -> Path:
    """Draw the k x 3 x H x W uint8 images in a titled grid and save it as a PNG."""
    figure = _top_losses_figure(images, titles, suptitle=suptitle)
    return save_figure(figure, out_path, dpi=72)


def plot_loss_curves(
    train_losses: Sequence[float],
    valid_points: Sequence[tuple[int, float]],
    out_path: Path,
    *,
    skip_start: int = LOSS_PLOT_SKIP_START,
) -> Path:
    """Plot the smoothed training loss per batch and the validation loss at each epoch end, and save it as a PNG.

    Args:
        train_losses: the Recorder's smoothed training loss after each batch, across the whole fit.
        valid_points: (batches seen so far, validation loss) at the end of each epoch.
        out_path: where to write the PNG.
        skip_start: leading batches left out, with any validation point that falls among them.
    """
    return save_figure(_loss_figure(train_losses, valid_points, skip_start=skip_start), out_path, dpi=72)


def plot_losses(smoothed_losses: Sequence[float], valid_points: Sequence[tuple[int, float]], out_path: Path) -> Path:
    """Plot a Trainer's record (`smoothed_losses`, `valid_points`) of every fit so far, as fastai's plot_loss does."""
    if not smoothed_losses:
        raise ValueError("nothing to plot yet: train at least one epoch first")
    # fastai's plot_loss skips 5 batches; very short runs keep at least one point
    skip = min(LOSS_PLOT_SKIP_START, len(smoothed_losses) - 1)
    return plot_loss_curves(smoothed_losses, valid_points, Path(out_path), skip_start=skip)


def write_interpretation(
    predictions: Predictions,
    vocab: Sequence[str],
    images: Callable[[Sequence[int]], torch.Tensor],
    out_dir: Path,
    *,
    top_k: int = 9,
    min_val: int = 1,
) -> dict[str, Path]:
    """Write fastai's ClassificationInterpretation views of validation predictions as files.

    `images(indices)` returns those validation items as the model saw them, as k x 3 x H x W uint8
    (`lib.evaluate.evaluation.validation_images`). Returns the paths of confusion_matrix.png, most_confused.txt and
    top_losses.png.
    """
    out_dir = Path(out_dir)
    cm = confusion_matrix(predictions, len(vocab))
    report = write_text_atomically(out_dir / "most_confused.txt", interpretation_report(cm, vocab, min_val=min_val))
    _, indices = top_losses(predictions, min(top_k, len(predictions.targets)))
    return {
        "confusion_matrix": plot_confusion_matrix(cm, vocab, out_dir / "confusion_matrix.png"),
        "most_confused": report,
        "top_losses": plot_top_losses(
            images(indices.tolist()), top_loss_titles(predictions, indices, vocab), out_dir / "top_losses.png"
        ),
    }


def interpretation_report(cm: np.ndarray, vocab: Sequence[str], *, min_val: int = 1) -> str:
    """Describe the accuracy and the most confused (actual -> predicted) pairs as a plain-text table."""
    cm = _checked_matrix(cm, vocab)
    total = int(cm.sum())
    correct = int(np.trace(cm))
    accuracy = f"{correct / total:.4f}" if total else "n/a"
    lines = [f"Validation items: {total}, correct: {correct}, accuracy: {accuracy}"]
    pairs = most_confused(cm, vocab, min_val=min_val)
    if not pairs:
        return "\n".join([*lines, f"No class pair was confused {min_val} or more times."]) + "\n"
    width = max(len(actual) for actual, _, _ in pairs)
    lines.append(f"Most confused pairs (count >= {min_val}), actual -> predicted:")
    lines += [f"  {actual:<{width}} -> {predicted}  {count}" for actual, predicted, count in pairs]
    return "\n".join(lines) + "\n"


def _checked_matrix(cm: np.ndarray, vocab: Sequence[str]) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(vocab):
        raise ValueError(
            f"The confusion matrix must be C x C with C = len(vocab) = {len(vocab)}, got shape {cm.shape}; "
            "build it with confusion_matrix(predictions, len(vocab))."
        )
    return cm


def _displayed_matrix(cm: np.ndarray, *, normalize: bool) -> np.ndarray:
    if not normalize:
        return cm
    row_sums = cm.sum(axis=1, keepdims=True)
    # A class absent from validation has a zero row: show zeros rather than NaN.
    return np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=float), where=row_sums > 0)


def _confusion_figure(
    cm: np.ndarray,
    vocab: Sequence[str],
    *,
    normalize: bool = False,
    title: str = "Confusion matrix",
    cmap: str = "Blues",
    norm_dec: int = 2,
    figsize: tuple[float, float] = (12, 12),
    dpi: int = 60,
) -> Figure:
    shown = _displayed_matrix(_checked_matrix(cm, vocab), normalize=normalize)
    figure, axis = pyplot().subplots(figsize=figsize, dpi=dpi)
    axis.imshow(shown, interpolation="nearest", cmap=cmap)
    axis.set_title(title)
    ticks = np.arange(len(vocab))
    axis.set_xticks(ticks, labels=list(vocab), rotation=90)
    axis.set_yticks(ticks, labels=list(vocab), rotation=0)
    threshold = shown.max() / 2.0  # fastai: white text on the darker half of the colour map
    for actual, predicted in np.ndindex(shown.shape):
        value = shown[actual, predicted]
        text = f"{value:.{norm_dec}f}" if normalize else f"{value}"
        colour = "white" if value > threshold else "black"
        axis.text(predicted, actual, text, horizontalalignment="center", verticalalignment="center", color=colour)
    axis.set_ylabel("Actual")
    axis.set_xlabel("Predicted")
    axis.grid(False)
    figure.tight_layout()
    return figure


def _top_losses_figure(images: torch.Tensor, titles: Sequence[str], *, suptitle: str) -> Figure:
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8 or len(images) == 0:
        raise ValueError(
            f"Expected a non-empty k x 3 x H x W uint8 batch, got {images.dtype} {tuple(images.shape)}; "
            "undo the normalisation and convert with .to(torch.uint8) first."
        )
    if len(titles) != len(images):
        raise ValueError(f"Got {len(titles)} titles for {len(images)} images; give one title per image.")
    # fastai's one-line "pred/actual / loss / prob" overlaps its neighbours for long breed names: two lines here.
    two_line_titles = [title.replace(" / ", "\n", 1) for title in titles]
    figure = image_grid(images, two_line_titles, title_size=TOP_LOSS_TITLE_SIZE)
    figure.suptitle(suptitle, weight="bold", size=14)
    figure.tight_layout()
    return figure


def _loss_figure(
    train_losses: Sequence[float], valid_points: Sequence[tuple[int, float]], *, skip_start: int = LOSS_PLOT_SKIP_START
) -> Figure:
    if len(train_losses) <= skip_start:
        raise ValueError(
            f"Only {len(train_losses)} training losses with skip_start={skip_start}: nothing to plot; "
            "lower skip_start or train for more batches."
        )
    figure, axis = pyplot().subplots(figsize=(6, 4))
    iterations = range(skip_start, len(train_losses))
    axis.plot(list(iterations), list(train_losses)[skip_start:], label="train")
    kept = [(iteration, loss) for iteration, loss in valid_points if iteration >= skip_start]
    if kept:
        axis.plot([i for i, _ in kept], [loss for _, loss in kept], label="valid", marker="o")
    axis.set_xlabel("Iteration (batches)")
    axis.set_ylabel("Loss")
    axis.legend()
    figure.tight_layout()
    return figure
