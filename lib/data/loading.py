"""Datasets and loaders over the presize cache, yielding uint8 batches at the presize.

Random square crops (train) and centre crops (valid) reproduce fastai's `Resize(460)` crop on the cached images. The
crop fractions are drawn in the main process by the sampler, so a run is reproducible for a seed whatever the number
of workers, and no global RNG state is read or changed.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2.functional import pil_to_tensor

from lib.common.errors import InputError
from lib.data.pictures import presized_shape, tensor_square_crop
from lib.data.presize import read_presized
from lib.recipe import CPU_CORES_PER_WORKER, DEFAULT_BATCH_SIZE, MAX_DEFAULT_WORKERS

# fastai DataLoaders defaults (fastai 2.8.12 fastai/data/core.py): bs=64, val_bs=bs, shuffle+drop_last on train only.

CropRequest = tuple[int, float, float]  # (item index, fraction along x, fraction along y)
# At most this share of the machine's memory holds decoded training and validation images (Pets at 460 px takes
# ~6 GB decoded, so it stays on disk on machines under ~30 GB; a bench set of 400 images at 256 px takes ~100 MB).
DECODED_MEMORY_FRACTION = 0.2


def default_workers(device: torch.device | str | None = None) -> int:
    """Return loader worker processes sized to the machine and to where the model runs.

    With a GPU training, fastai's min(16, usable CPUs): the cores are free to decode. On the CPU the model's
    intra-op threads already use every core, and a worker only takes cores from it: one worker per
    `CPU_CORES_PER_WORKER` cores, none on small machines (BENCHMARKS.md, "Loader workers on the CPU").
    """
    cpus = len(os.sched_getaffinity(0))
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cpu":
        return min(MAX_DEFAULT_WORKERS, cpus // CPU_CORES_PER_WORKER)
    return min(MAX_DEFAULT_WORKERS, cpus)


class PresizedImages(Dataset):
    """Square crops of presized images, as uint8 CxSxS tensors, with their integer targets.

    Each image is read through `lib.data.presize.read_presized`: checked against its cache record, and rebuilt from
    its original (`originals`, the manifest's `path` column) when damaged, so one bad cache file does not end an
    epoch. With `keep_decoded`, each image is decoded once and kept in memory as uint8, so later epochs only crop:
    decoding was the largest cost of a CPU training epoch outside the model (BENCHMARKS.md). Loaders turn it on only
    when the decoded set fits their memory budget and no worker process would hold a copy of its own.
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int],
        size: int,
        *,
        originals: Sequence[str] | None = None,
        keep_decoded: bool = False,
    ):
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        if originals is not None and len(originals) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(originals)} originals")
        self.paths = list(paths)
        self.originals = None if originals is None else [str(original) for original in originals]
        self.targets = [int(t) for t in targets]
        self.size = size
        self.decoded: dict[int, torch.Tensor] | None = {} if keep_decoded else None

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, index: int) -> torch.Tensor:
        """Return the whole presized image as uint8 CxHxW (from memory when it was decoded before)."""
        if self.decoded is not None and index in self.decoded:
            return self.decoded[index]
        original = None if self.originals is None else self.originals[index]
        pixels = pil_to_tensor(read_presized(self.paths[index], original))
        height, width = pixels.shape[1:]
        if min(height, width) < self.size:
            raise ValueError(
                f"{self.paths[index]} is {width}x{height}, smaller than the {self.size}px crop: it was presized for "
                "another size. Re-run the presize stage with the same --presize."
            )
        if self.decoded is not None:
            self.decoded[index] = pixels
        return pixels

    def __getitem__(self, request: CropRequest) -> tuple[torch.Tensor, int]:
        index, fraction_x, fraction_y = request
        return tensor_square_crop(self.pixels(index), self.size, fraction_x, fraction_y), self.targets[index]


def presized_images(manifest: pd.DataFrame, size: int, *, keep_decoded: bool = False) -> PresizedImages:
    """PresizedImages over manifest rows (`presized_path`, `target`, and `path` for rebuilding damaged entries)."""
    originals = manifest["path"].tolist() if "path" in manifest.columns else None
    return PresizedImages(
        manifest["presized_path"].tolist(),
        manifest["target"].tolist(),
        size,
        originals=originals,
        keep_decoded=keep_decoded,
    )


class CropSampler(Sampler[CropRequest]):
    """Yield (index, fraction_x, fraction_y): shuffled random crops for training, in-order centre crops otherwise.

    Each epoch's order and crops depend only on (seed, epoch), so training resumed from a checkpoint at epoch k draws
    what an uninterrupted run would have drawn. The epoch advances by itself after each pass; `set_epoch` moves it.
    `shuffle=False` with `train=True` keeps the items in order and still draws random crops (test-time augmentation).

    A `shard` (rank, world size, the rank's batch size) makes it one rank's part of a data-parallel epoch, with
    DistributedSampler's promise (each item once per epoch over the ranks) and more: in training, the rank's batch k
    is its share of what batch k of one process with the global batch would hold, crops included, and the last
    incomplete global batch is dropped; in validation, the ranks take consecutive runs of the items, none repeated
    and none left out.
    """

    def __init__(
        self,
        length: int,
        *,
        train: bool,
        seed: int | None = None,
        shuffle: bool | None = None,
        shard: Shard | None = None,
    ):
        self.length = length
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.seed = secrets.randbits(63) if seed is None else seed
        self.shard = shard
        self.epoch = 0

    def __len__(self) -> int:
        if self.shard is None:
            return self.length
        if self.train:
            return self.length // self.shard.global_batch * self.shard.batch_size
        return len(self.shard.run_of(self.length))

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass draw the order and crops of this epoch (0-based)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[CropRequest]:
        if not self.train:
            items = range(self.length) if self.shard is None else self.shard.run_of(self.length)
            return iter([(i, 0.5, 0.5) for i in items])
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        order = torch.randperm(self.length, generator=generator).tolist() if self.shuffle else range(self.length)
        fractions = torch.rand(self.length, 2, generator=generator).tolist()
        requests = [(i, fx, fy) for i, (fx, fy) in zip(order, fractions, strict=True)]
        return iter(requests if self.shard is None else self.shard.batches_of(requests))


@dataclass(frozen=True)
class Shard:
    """One rank's part of a data-parallel epoch: `rank` of `world_size`, taking `batch_size` items of each batch."""

    rank: int
    world_size: int
    batch_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_of(self, items: Sequence[CropRequest]) -> list[CropRequest]:
        """This rank's share of every complete global batch of `items`, in order."""
        mine = []
        for start in range(0, len(items) - self.global_batch + 1, self.global_batch):
            first = start + self.rank * self.batch_size
            mine.extend(items[first : first + self.batch_size])
        return mine

    def run_of(self, length: int) -> range:
        """This rank's consecutive run of `length` items (runs differ in length by one at most)."""
        return range(length * self.rank // self.world_size, length * (self.rank + 1) // self.world_size)


def decoded_bytes(manifest: pd.DataFrame, presize: int) -> int | None:
    """Estimate the memory the manifest's presized images take decoded (uint8 RGB), from the originals' sizes.

    None when the manifest does not record them (`width` and `height` come from the cleaning stage).
    """
    if not {"width", "height"} <= set(manifest.columns):
        return None
    sizes = zip(manifest["width"], manifest["height"], strict=True)
    shapes = (presized_shape(int(width), int(height), presize) for width, height in sizes)
    return sum(width * height * 3 for width, height in shapes)


def keep_decoded_default(manifest: pd.DataFrame, presize: int, workers: int, *, copies: int = 1) -> bool:
    """Keep decoded images in memory when there are no worker processes and `copies` of them (one per data-parallel
    rank: each decodes every image over the epochs) fit the memory budget."""
    estimate = decoded_bytes(manifest, presize)
    return workers == 0 and estimate is not None and estimate * copies <= DECODED_MEMORY_FRACTION * physical_memory()


def physical_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def epoch_seed(seed: int, epoch: int) -> int:
    """Derive a 63-bit seed for one epoch from a run's seed (tuple hashes of ints are stable across processes)."""
    return hash((seed, epoch)) & (2**63 - 1)


def make_loader(
    manifest: pd.DataFrame,
    *,
    size: int,
    train: bool,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    seed: int | None = None,
    pin_memory: bool = False,
    keep_decoded: bool | None = None,
    shard: Shard | None = None,
) -> DataLoader:
    """Build a loader over manifest rows (needs `presized_path` and `target` columns; `path` lets it heal the cache).

    Training loaders shuffle and drop the last incomplete batch, as fastai's do. `workers` defaults to
    `default_workers()` for the default device; `keep_decoded` to `keep_decoded_default` (see PresizedImages). With a
    `shard`, `batch_size` is the rank's share of the global batch and the loader yields the rank's part (CropSampler).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    global_batch = batch_size if shard is None else shard.global_batch
    if train and len(manifest) < global_batch:
        raise InputError(
            f"The training set has {len(manifest)} images, fewer than one batch of {global_batch}: with drop_last "
            "there would be no batch at all. Lower --bs or add images."
        )
    workers = default_workers() if workers is None else workers
    if keep_decoded is None:
        keep_decoded = keep_decoded_default(manifest, size, workers)
    dataset = presized_images(manifest, size, keep_decoded=keep_decoded)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=CropSampler(len(dataset), train=train, seed=seed, shard=shard),
        drop_last=train,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        # Worker seeds are drawn from this generator, not from the global RNG.
        generator=torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed),
    )


def make_loaders(
    manifest: pd.DataFrame,
    *,
    size: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    seed: int | None = None,
    pin_memory: bool = False,
    shard: Shard | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Build (train_loader, valid_loader) from a split manifest (a rank's parts of them, with a `shard`)."""
    by_split = {name: manifest[manifest["split"] == name] for name in ("train", "valid")}
    workers = default_workers() if workers is None else workers
    copies = 1 if shard is None else shard.world_size
    keep_decoded = keep_decoded_default(manifest, size, workers, copies=copies)  # the budget covers both loaders
    common = {
        "size": size, "batch_size": batch_size, "workers": workers, "pin_memory": pin_memory,
        "keep_decoded": keep_decoded, "shard": shard,
    }  # fmt: skip
    return (
        make_loader(by_split["train"], train=True, seed=seed, **common),
        make_loader(by_split["valid"], train=False, seed=seed, **common),
    )
