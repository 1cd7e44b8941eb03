"""Batch prediction: picture files through the registered model's network in batches on the device.

Each file is decoded in the loader's workers exactly as the served contract decodes a request's picture
(lib/serve/contract.py `decode_picture`: upright RGB, short side to the presize, centre square); a file that cannot
be read keeps its reason (`unreadable_reason`) and the others go on. The network is the registered one, rebuilt
from the weights of its pt2 program so it runs on any device, behind `ServingModel`'s validation resize and
normalisation (lib/serve/serving.py), with fp16 autocast on CUDA (lib/train/precision.py). The rows are the served
answer's (`answer_table`), so predictions.csv says what the served model says for each file.

With TTA the workers decode and presize, and the main process draws the augmented views in file order from one
seeded generator (lib/evaluate/tta.py `augmented_views`): the blend is the one `tta_probabilities` computes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from lib.common.plots import pyplot, save_figure
from lib.common.progress import ProgressCallback, progress_bar
from lib.data.loading import default_workers
from lib.data.pictures import CENTRE, presize_image, tensor_square_crop
from lib.evaluate.tta import TTA_BETA, TTA_VIEWS, augmented_views, blend
from lib.recipe import DEFAULT_BATCH_SIZE, DEFAULT_MIN_SCALE, DEFAULT_SEED, PREDICT_TOP_K
from lib.serve.contract import UNREADABLE, answer_table, decode_picture, open_picture, unreadable_reason
from lib.serve.serving import ServingModel
from lib.train.model import create_model
from lib.train.precision import resolve_precision, use_channels_last

PREDICTION_COLUMNS = ("file", "label", "probability", "top_k", "error")  # predictions.csv; `probabilities` on request
HISTOGRAM_DPI = 100


def network_from_program(program_path: Path, *, arch: str, classes: int) -> nn.Module:
    """Rebuild the registered network from its pt2 program's weights (the program itself runs on the CPU only)."""
    program = torch.export.load(Path(program_path))
    net = create_model(arch, classes, pretrained=False)
    net.load_state_dict({name.removeprefix("net."): tensor for name, tensor in program.state_dict.items()})
    return net.eval()


class PictureFiles(Dataset):
    """Picture files decoded as the contract decodes them: (index, uint8 3 x presize x presize, None) or, when a
    file cannot be read, (index, None, reason). With `square=False` the picture is the presized whole (for TTA)."""

    def __init__(self, paths: Sequence[str], presize: int, *, errors: Sequence[str] = (), square: bool = True):
        self.paths = [str(path) for path in paths]
        self.errors = list(errors) or [""] * len(self.paths)
        if len(self.errors) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.errors)} errors")
        self.presize = presize
        self.square = square

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        if self.errors[index]:  # no file to read (a failed download, a missing path): said when it was collected
            return index, None, self.errors[index]
        try:
            data = Path(self.paths[index]).read_bytes()
            if self.square:
                return index, decode_picture(data, self.presize, name=self.paths[index]), None
            return index, pil_to_tensor(presize_image(open_picture(data, name=self.paths[index]), self.presize)), None
        except UNREADABLE as error:
            return index, None, unreadable_reason(error)


@dataclass(frozen=True)
class PictureBatch:
    """The readable pictures of a batch with their indices, and (index, reason) of the others."""

    indices: list[int]
    pictures: list[torch.Tensor]
    failures: list[tuple[int, str]]


def collate_pictures(items: Sequence[tuple[int, torch.Tensor | None, str | None]]) -> PictureBatch:
    readable = [(index, picture) for index, picture, _ in items if picture is not None]
    failures = [(index, reason) for index, picture, reason in items if picture is None]
    return PictureBatch([index for index, _ in readable], [picture for _, picture in readable], failures)


@dataclass(frozen=True)
class BatchPredictions:
    """Every file's probabilities over the vocab (None where unreadable) or why it could not be read, and timing."""

    scores: list[torch.Tensor | None]
    errors: list[str | None]
    seconds: float
    device: str
    precision: str

    @property
    def unreadable(self) -> int:
        return sum(error is not None for error in self.errors)

    @property
    def images_per_second(self) -> float:
        return len(self.scores) / self.seconds if self.seconds > 0 else 0.0


class BatchPredictor:
    """The registered network on a device, in eval mode, taking uint8 NCHW presize squares."""

    def __init__(self, net: nn.Module, *, size: int, presize: int, device: torch.device | str, precision: str):
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        # channels_last: oneDNN's and cuDNN's faster convolutions (lib/train/precision.py); 8 against 10 ms a picture
        # for resnet18 at 128 px in batches of 32 on the 2-core CPU measured here
        memory_format = torch.channels_last if use_channels_last(self.device) else torch.contiguous_format
        self.model = ServingModel(net, size=size).to(self.device, memory_format=memory_format).eval()
        self.presize = presize

    @torch.inference_mode()
    def probabilities(self, pictures: torch.Tensor) -> torch.Tensor:
        """Return the N x classes softmax (on the CPU, fp32) of uint8 N x 3 x presize x presize pictures."""
        pictures = pictures.to(self.device, non_blocking=True)
        with self.precision.autocast():
            logits = self.model(pictures.permute(0, 2, 3, 1))
        return torch.softmax(logits.float(), dim=1).cpu()

    def tta_probabilities(
        self, pictures: Sequence[torch.Tensor], generator: torch.Generator, *, views: int, beta: float, min_scale: float
    ) -> torch.Tensor:
        """Blend the plain centre squares of presized pictures with `views` augmented ones (lib/evaluate/tta.py)."""
        plain = self.probabilities(
            torch.stack([tensor_square_crop(picture, self.presize, CENTRE, CENTRE) for picture in pictures])
        )
        augmented = torch.stack(
            [augmented_views(p, self.presize, views=views, min_scale=min_scale, generator=generator) for p in pictures]
        ).permute(0, 1, 4, 2, 3)  # N x views x 3 x presize x presize
        passes = torch.stack([self.probabilities(augmented[:, view].contiguous()) for view in range(views)])
        return blend(plain, passes, beta)

    def predict(
        self,
        paths: Sequence[str],
        *,
        errors: Sequence[str] = (),
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int | None = None,
        tta: bool = False,
        seed: int = DEFAULT_SEED,
        views: int = TTA_VIEWS,
        beta: float = TTA_BETA,
        min_scale: float = DEFAULT_MIN_SCALE,
        on_progress: ProgressCallback | None = None,
        show_progress: bool | None = None,
    ) -> BatchPredictions:
        """Label picture files in batches: each file's probabilities, or why it could not be read."""
        workers = default_workers(self.device) if workers is None else workers
        loader = DataLoader(
            PictureFiles(paths, self.presize, errors=errors, square=not tta),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate_pictures,
            pin_memory=self.device.type == "cuda",
        )
        generator = torch.Generator().manual_seed(seed)  # the views of tta, drawn in file order
        scores: list[torch.Tensor | None] = [None] * len(paths)
        reasons: list[str | None] = [None] * len(paths)
        started, done = time.perf_counter(), 0
        with progress_bar(total=len(paths), unit="image", desc="predict", show=show_progress) as bar:
            for batch in loader:
                if not batch.pictures:
                    found = []
                elif tta:
                    found = self.tta_probabilities(
                        batch.pictures, generator, views=views, beta=beta, min_scale=min_scale
                    )
                else:
                    found = self.probabilities(torch.stack(batch.pictures))
                for index, score in zip(batch.indices, found, strict=True):
                    scores[index] = score
                for index, reason in batch.failures:
                    reasons[index] = reason
                size = len(batch.indices) + len(batch.failures)
                done += size
                bar.update(size)
                if on_progress is not None:
                    on_progress(done, len(paths))
        seconds = time.perf_counter() - started
        return BatchPredictions(scores, reasons, seconds, self.device.type, self.precision.effective)


def predictions_table(
    files: Sequence[str],
    predictions: BatchPredictions,
    vocab: Sequence[str],
    *,
    top_k: int = PREDICT_TOP_K,
    probabilities: bool = False,
) -> pd.DataFrame:
    """predictions.csv's rows: file, then the served answer's columns, its mappings as JSON text."""
    answer = answer_table(
        predictions.scores, predictions.errors, vocab, top_k=min(top_k, len(vocab)), probabilities=probabilities
    )
    for column in ("top_k", "probabilities"):
        if column in answer.columns:
            answer[column] = [None if value is None else json.dumps(value) for value in answer[column]]
    return pd.concat([pd.DataFrame({"file": list(files)}), answer], axis=1)


def read_predictions(path: Path) -> pd.DataFrame:
    """Read predictions.csv back: top_k (and probabilities) as dicts, empty cells as None."""
    table = pd.read_csv(path, dtype={"file": str, "label": str, "error": str}, keep_default_na=False)
    for column in ("top_k", "probabilities"):
        if column in table.columns:
            table[column] = pd.Series([json.loads(value) if value else None for value in table[column]], dtype=object)
    table["probability"] = pd.Series([float(value) if value != "" else None for value in table["probability"]],
                                     dtype=object)  # fmt: skip
    for column in ("label", "error"):
        table[column] = pd.Series([value or None for value in table[column]], dtype=object)
    return table


def label_histogram(labels: pd.Series, vocab: Sequence[str], out_path: Path) -> Path:
    """Save a bar chart of how many pictures got each class (every class of the vocab, in its order) as a PNG."""
    counts = labels.dropna().value_counts().reindex(list(vocab), fill_value=0)
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(max(4.0, 0.3 * len(vocab) + 2), 3.5))
    axes.bar(range(len(counts)), counts.to_numpy())
    axes.set_xticks(range(len(counts)), counts.index, rotation=90, fontsize=7)
    axes.set_ylabel("pictures")
    axes.set_title(f"Predicted classes of {int(counts.sum())} pictures")
    figure.tight_layout()
    return save_figure(figure, out_path, dpi=HISTOGRAM_DPI)
