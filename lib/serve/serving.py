"""The trained model as a service sees it: raw uint8 pictures in, class logits out, every preprocessing step inside.

A client sends what the data stage's presize cache holds for validation: the centre square of the picture with its
short side scaled to `presize`, as uint8 N x presize x presize x 3 (NHWC, the layout of PIL and numpy images).
`ServingModel` resizes it to the training size and normalises it exactly as validation did, so the served model
gives the validation predictions (the preprocessing lives in the model, so serving cannot drift from training).
`tta_probabilities` adds test-time augmentation on the client's side: augmented presize pictures through the same
model, blended with the plain prediction as fastai's `tta` does (lib/evaluate/tta.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lib.data.augment import aug_transforms
from lib.evaluate.tta import TTA_BETA, TTA_VIEWS, augmented_pictures, blend
from lib.recipe import DEFAULT_MIN_SCALE, DEFAULT_SEED
from lib.serve.inference import ExportedClassifier, prepare_image


class ServingModel(nn.Module):
    """Wrap a classifier so it takes uint8 NHWC pictures and does the validation resize and normalisation itself."""

    def __init__(self, net: nn.Module, *, size: int):
        super().__init__()
        self.net = net
        self.size = size
        self.augmentation = aug_transforms(size)  # only its deterministic validation path is used

    def forward(self, pictures: torch.Tensor) -> torch.Tensor:
        """Return the logits of a uint8 N x H x W x 3 batch."""
        return self.net(self.augmentation(pictures.permute(0, 3, 1, 2), train=False))


def serving_model(exported: ExportedClassifier) -> ServingModel:
    """Return the exported classifier wrapped for serving, on the CPU and in eval mode."""
    return ServingModel(exported.model.cpu(), size=exported.size).eval()


def serving_batch(images: Sequence[Path | str], presize: int) -> np.ndarray:
    """Prepare pictures as the served model expects them: uint8 N x presize x presize x 3."""
    return np.stack([prepare_image(image, presize).permute(1, 2, 0).numpy() for image in images])


def tta_probabilities(
    predict: Callable[[np.ndarray], np.ndarray],
    images: Sequence[Path | str],
    presize: int,
    *,
    views: int = TTA_VIEWS,
    beta: float = TTA_BETA,
    seed: int = DEFAULT_SEED,
    min_scale: float = DEFAULT_MIN_SCALE,
) -> np.ndarray:
    """Return N x C test-time-augmented probabilities of pictures from a served model's `predict` (logits out).

    The plain batch (`serving_batch`) and `views` batches of augmented pictures (`augmented_pictures`, drawn from one
    generator seeded with `seed`) go through `predict`; their softmaxes are blended as fastai's `tta` does.
    """
    generator = torch.Generator().manual_seed(seed)
    augmented = torch.stack(
        [augmented_pictures(image, presize, views=views, min_scale=min_scale, generator=generator) for image in images]
    )  # N x views x presize x presize x 3
    plain = _probabilities(predict(serving_batch(images, presize)))
    passes = torch.stack([_probabilities(predict(augmented[:, view].numpy())) for view in range(views)])
    return blend(plain, passes, beta).numpy()


def _probabilities(logits: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(logits, dtype=np.float32)).softmax(dim=1)
