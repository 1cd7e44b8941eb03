"""Test-time augmentation the way fastai 2.8's `Learner.tta` does it (fastai/learner.py, fastai 2.8.x).

fastai's `tta(ds_idx=1, dl=None, n=4, item_tfms=None, batch_tfms=None, beta=0.25, use_max=False)` predicts the
validation set `n` times with the training transforms (`dl.dataset.set_split_idx(0)`: the random crop of `Resize`
and the batch augmentation's train path), averages those probabilities (`get_preds` applies the loss's activation,
a softmax for cross-entropy), predicts it once more with the validation transforms, and returns
`torch.lerp(aug_preds, preds, beta)` = (1 - beta) * mean(augmented) + beta * plain: beta weights the plain view.

Here the augmented passes are in-order random crops of the presized images (`CropSampler(train=True,
shuffle=False)`) through `BatchAugmentation`'s train path, every draw from generators seeded by one seed.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor

from lib.data.augment import aug_transforms
from lib.data.images import open_rgb, to_rgb
from lib.data.loading import (
    CropSampler,
    default_workers,
    epoch_seed,
    keep_decoded_default,
    presized_images,
)
from lib.data.pictures import presize_image, tensor_square_crop
from lib.evaluate.evaluation import evaluation_model, validation_predictions
from lib.evaluate.interpret import Predictions
from lib.recipe import DEFAULT_BATCH_SIZE, DEFAULT_MIN_SCALE, DEFAULT_PRESIZE

TTA_VIEWS = 4  # fastai 2.8 fastai/learner.py: Learner.tta(n=4)
TTA_BETA = 0.25  # fastai 2.8 fastai/learner.py: Learner.tta(beta=0.25), the plain predictions' weight
AUGMENTATION_STREAM = -1  # epoch_seed(seed, -1) seeds the batch augmentation; passes 0..n-1 seed the crops


def blend(plain: torch.Tensor, augmented: torch.Tensor, beta: float = TTA_BETA) -> torch.Tensor:
    """Blend plain N x C probabilities with n x N x C augmented ones: lerp(mean of augmented, plain, beta).

    With no augmented view (n = 0) the plain probabilities come back unchanged.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1] (the plain view's weight), got {beta!r}")
    if augmented.ndim != 3 or augmented.shape[1:] != plain.shape:
        raise ValueError(
            f"expected augmented probabilities n x {tuple(plain.shape)}, got shape {tuple(augmented.shape)}"
        )
    if len(augmented) == 0:
        return plain
    return torch.lerp(augmented.mean(dim=0), plain, beta)


def _seed_or_fresh(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else seed


def tta_predictions(
    model_path: Path,
    manifest: pd.DataFrame,
    vocab: Sequence[str],
    *,
    presize: int = DEFAULT_PRESIZE,
    size: int = 224,
    min_scale: float = DEFAULT_MIN_SCALE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    views: int = TTA_VIEWS,
    beta: float = TTA_BETA,
    seed: int | None = None,
    plain: Predictions | None = None,
) -> Predictions:
    """Predict the validation split with test-time augmentation: `views` augmented passes blended with the plain one.

    `plain` is the validation pass `validation_predictions` returned for the same model, when there is one (it is
    run here otherwise). The losses are the negative log-likelihood of the blended probabilities. One seed gives the
    same predictions on every run; None draws a fresh one.
    """
    if views < 0:
        raise ValueError(f"views must be >= 0, got {views}")
    settings = {"presize": presize, "device": device, "precision": precision}
    if plain is None:
        plain = validation_predictions(
            model_path, manifest, vocab, size=size, batch_size=batch_size, workers=workers, **settings
        )
    if views == 0:
        return plain
    valid, runner = evaluation_model(model_path, manifest, vocab, **settings)
    seed = _seed_or_fresh(seed)
    workers = default_workers(runner.device) if workers is None else workers
    loader = DataLoader(
        presized_images(valid, presize, keep_decoded=keep_decoded_default(valid, presize, workers)),
        batch_size=batch_size,
        sampler=CropSampler(len(valid), train=True, shuffle=False, seed=seed),  # pass i crops from (seed, i)
        num_workers=workers,
        pin_memory=runner.device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),  # worker seeds, never the global RNG
    )
    augmentation = aug_transforms(size, min_scale)
    generator = torch.Generator().manual_seed(epoch_seed(seed, AUGMENTATION_STREAM))
    augmented = []
    for _ in range(views):
        logits, targets = runner.logits(loader, augmentation, train=True, generator=generator)
        if not torch.equal(targets.cpu(), plain.targets):
            raise ValueError("the plain predictions given are not of this manifest's validation split, in order")
        augmented.append(logits.float().softmax(dim=1).cpu())
    return Predictions.from_probabilities(blend(plain.probabilities, torch.stack(augmented), beta), plain.targets)


def augmented_pictures(
    image: Path | str | Image.Image,
    presize: int,
    *,
    views: int = TTA_VIEWS,
    min_scale: float = DEFAULT_MIN_SCALE,
    generator: torch.Generator,
) -> torch.Tensor:
    """Return `views` augmented versions of a picture as uint8 views x presize x presize x 3 for the served model.

    Each view is what training showed the model, drawn from `generator`: a random presize square of the presized
    picture (fastai's `Resize` on the train split), then the batch augmentation's train path (random-resized crop
    of at least `min_scale` of the area, flip, rotation, zoom, warp, lighting) rendered at the presize, so the served
    model's own resize to the training size follows. The picture is read the way `prepare_image` reads it.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    picture = to_rgb(image) if isinstance(image, Image.Image) else open_rgb(Path(image))
    pixels = pil_to_tensor(presize_image(picture, presize))
    return augmented_views(pixels, presize, views=views, min_scale=min_scale, generator=generator)


def augmented_views(
    pixels: torch.Tensor,
    presize: int,
    *,
    views: int = TTA_VIEWS,
    min_scale: float = DEFAULT_MIN_SCALE,
    generator: torch.Generator,
) -> torch.Tensor:
    """Return `views` augmented versions of a presized uint8 3 x H x W picture as uint8 views x presize x presize x 3.

    What `augmented_pictures` does once the picture is read and presized: batch prediction decodes in its loader's
    workers and augments here, in order, so one generator draws what `augmented_pictures` would draw.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    fractions = torch.rand(views, 2, generator=generator).tolist()
    crops = [tensor_square_crop(pixels, presize, fraction_x, fraction_y) for fraction_x, fraction_y in fractions]
    augmentation = aug_transforms(presize, min_scale)
    views_nchw = augmentation.decode(augmentation(torch.stack(crops), train=True, generator=generator))
    return views_nchw.permute(0, 2, 3, 1).contiguous()
