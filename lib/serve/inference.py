"""A trained classifier as one file: weights plus what is needed to use them (architecture, vocab, image sizes).

`export_classifier` writes it; `Classifier.load` reads it back with `weights_only=True` and `predict` labels new
pictures the way validation images were prepared: upright RGB, short side scaled to the presize, centre square, then
the augmentation's validation path (resize to the training size, ImageNet normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from lib.common.files import write_atomically
from lib.data.augment import BatchAugmentation, aug_transforms
from lib.data.images import open_rgb, to_rgb
from lib.data.pictures import validation_picture
from lib.train.model import create_model

EXPORT_FORMAT = "pets-classifier/1"


@dataclass(frozen=True)
class Prediction:
    """The predicted class, its index and probability, and every class's probability."""

    label: str
    index: int
    probability: float
    probabilities: dict[str, float]


def export_classifier(
    path: Path, model: nn.Module, *, arch: str, vocab: Sequence[str], size: int, presize: int
) -> Path:
    """Write the model's weights with its architecture, vocab and image sizes, atomically."""
    payload = {
        "format": EXPORT_FORMAT,
        "arch": arch,
        "vocab": list(vocab),
        "size": size,
        "presize": presize,
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }
    return write_atomically(Path(path), lambda temporary: torch.save(payload, temporary))


@dataclass(frozen=True)
class ExportedClassifier:
    """What `export_classifier` wrote: the model (on the CPU, in eval mode) and how its inputs were prepared."""

    model: nn.Module
    arch: str
    vocab: tuple[str, ...]
    size: int
    presize: int


def read_export(path: Path) -> ExportedClassifier:
    """Read a file written by `export_classifier` (no code from the file runs: weights_only=True)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not an exported classifier ({EXPORT_FORMAT}); export one after training.")
    model = create_model(payload["arch"], len(payload["vocab"]), pretrained=False)
    model.load_state_dict(payload["state_dict"])
    return ExportedClassifier(
        model=model.eval(),
        arch=payload["arch"],
        vocab=tuple(payload["vocab"]),
        size=payload["size"],
        presize=payload["presize"],
    )


def prepare_image(image: Path | str | Image.Image, presize: int) -> torch.Tensor:
    """Return a picture as the validation loader shows it: upright RGB, presized, centre square, uint8 3 x H x W."""
    picture = to_rgb(image) if isinstance(image, Image.Image) else open_rgb(Path(image))
    return validation_picture(picture, presize)


class Classifier:
    """A trained model ready to label pictures."""

    def __init__(self, model: nn.Module, *, vocab: Sequence[str], size: int, presize: int, device=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.vocab = tuple(vocab)
        self.presize = presize
        self.augmentation: BatchAugmentation = aug_transforms(size)

    @classmethod
    def load(cls, path: Path, *, device=None) -> Classifier:
        """Load an exported classifier (no code from the file runs: weights_only=True)."""
        exported = read_export(path)
        return cls(exported.model, vocab=exported.vocab, size=exported.size, presize=exported.presize, device=device)

    @torch.inference_mode()
    def predict(self, images: Sequence[Path | str | Image.Image]) -> list[Prediction]:
        """Label pictures given as paths or PIL images."""
        if not images:
            return []
        batch = torch.stack([prepare_image(image, self.presize) for image in images]).to(self.device)
        logits = self.model(self.augmentation(batch, train=False))
        return [self._prediction(row) for row in torch.softmax(logits.float(), dim=1).cpu()]

    def _prediction(self, probabilities: torch.Tensor) -> Prediction:
        index = int(probabilities.argmax())
        return Prediction(
            label=self.vocab[index],
            index=index,
            probability=float(probabilities[index]),
            probabilities={name: float(p) for name, p in zip(self.vocab, probabilities.tolist(), strict=True)},
        )
