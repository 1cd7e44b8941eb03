"""Validation predictions of an exported model, with no Trainer: no optimizer, no GradScaler, nothing trained.

The model runs in eval mode over the project's validation loader (centre crops at the presize, in manifest order)
with the augmentation's validation path, the device, precision and memory format the Trainer validates with, so the
numbers equal the Trainer's validation of the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from lib.common.errors import InputError
from lib.data.augment import BatchAugmentation, aug_transforms
from lib.data.loading import default_workers, make_loader, presized_images
from lib.evaluate.interpret import Predictions
from lib.recipe import DEFAULT_BATCH_SIZE, DEFAULT_PRESIZE
from lib.serve.inference import read_export
from lib.train.precision import Precision, resolve_precision, use_channels_last
from lib.train.trainer import check_presize, resolve_device

CENTRE = 0.5  # the validation crop: CropSampler's (0.5, 0.5) fractions


@dataclass(frozen=True)
class EvaluationModel:
    """An exported model on its device, in eval mode, with the precision and memory format the Trainer validates in."""

    model: torch.nn.Module
    device: torch.device
    policy: Precision
    channels_last: bool

    def logits(
        self,
        loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        augmentation: BatchAugmentation,
        *,
        train: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one pass over a loader's uint8 batches through the augmentation's validation (or train) path.

        Returns (logits N x C as float32 on the device, targets N).
        """
        logits, targets = [], []
        with torch.inference_mode():
            for inputs, batch_targets in loader:
                inputs = augmentation.on_device(
                    inputs, self.device, train=train, channels_last=self.channels_last, generator=generator
                )
                with self.policy.autocast():
                    batch_logits = self.model(inputs)
                logits.append(batch_logits.float())  # kept on the device: one copy to the host at the end
                targets.append(batch_targets)
        return torch.cat(logits), torch.cat(targets)


def evaluation_model(
    model_path: Path,
    manifest: pd.DataFrame,
    vocab: Sequence[str],
    *,
    presize: int,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> tuple[pd.DataFrame, EvaluationModel]:
    """Check the manifest against the export and return (its validation rows, the model ready to predict them).

    `vocab` is the one the manifest's targets index; the export must have been trained with the same one.
    """
    check_presize(manifest, presize)
    exported = read_export(Path(model_path))
    if exported.vocab != tuple(vocab):
        raise ValueError(
            f"{model_path} was trained with another vocabulary ({len(exported.vocab)} classes, first "
            f"{exported.vocab[:3]}) than the manifest's ({len(vocab)}, first {tuple(vocab[:3])}): evaluate it on the "
            "data it was trained on."
        )
    valid = manifest[manifest["split"] == "valid"]
    if valid.empty:
        raise InputError("The validation set is empty: raise --valid-pct so some images are held out.")
    device = resolve_device(device)
    policy = resolve_precision(precision, device)
    channels_last = use_channels_last(device, None)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = exported.model.to(device, memory_format=memory_format).eval()
    return valid, EvaluationModel(model=model, device=device, policy=policy, channels_last=channels_last)


def validation_predictions(
    model_path: Path,
    manifest: pd.DataFrame,
    vocab: Sequence[str],
    *,
    presize: int = DEFAULT_PRESIZE,
    size: int = 224,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> Predictions:
    """Predict the manifest's validation split with the model `lib.serve.inference.export_classifier` wrote.

    `vocab` is the one the manifest's targets index; the export must have been trained with the same one.
    """
    valid, runner = evaluation_model(model_path, manifest, vocab, presize=presize, device=device, precision=precision)
    workers = default_workers(runner.device) if workers is None else workers
    loader = make_loader(
        valid, size=presize, train=False, batch_size=batch_size, workers=workers,
        pin_memory=runner.device.type == "cuda",
    )  # fmt: skip
    augmentation = aug_transforms(size)  # the validation path depends on the size alone, not on min_scale
    return Predictions.from_logits(*runner.logits(loader, augmentation))


def validation_images(manifest: pd.DataFrame, indices: Sequence[int], *, presize: int, size: int) -> torch.Tensor:
    """Return validation items (by index in the split) as the model saw them, as uint8 images for plotting.

    `functools.partial(validation_images, manifest, presize=..., size=...)` is the `images` that
    `lib.evaluate.interpret.write_interpretation` asks for.
    """
    valid = manifest[manifest["split"] == "valid"]
    dataset = presized_images(valid, presize)
    raw = torch.stack([dataset[(int(index), CENTRE, CENTRE)][0] for index in indices])
    augmentation = aug_transforms(size)
    with torch.inference_mode():
        return augmentation.decode(augmentation(raw, train=False))
