import hashlib
import math

import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from lib.data.loading import CropSampler, make_loader, make_loaders
from lib.data.pictures import crop_offset
from lib.data.presize import presize_images
from tests.support.images import write_image

SIZE = 32


@pytest.fixture(scope="module")
def presized(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    sizes = [(60, 40), (40, 70), (50, 50), (80, 33), (33, 45)] * 4
    paths = [write_image(root / "src" / f"pug_{i}.jpg", s, (10 * i, 0, 90)) for i, s in enumerate(sizes, 1)]
    manifest = pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths],
            "target": [i % 3 for i in range(len(paths))],
            "split": ["valid" if i % 4 == 0 else "train" for i in range(len(paths))],
        }
    )
    return presize_images(manifest, root / "cache", presize=SIZE, progress=False).manifest


def test_batches_are_uint8_at_the_presize_with_fastai_drop_last(presized):
    train_loader, valid_loader = make_loaders(presized, size=SIZE, batch_size=4, workers=0, seed=0)
    train_batches, valid_batches = list(train_loader), list(valid_loader)
    n_train, n_valid = (presized["split"] == "train").sum(), (presized["split"] == "valid").sum()

    assert len(train_batches) == n_train // 4  # drop_last on train
    assert len(valid_batches) == math.ceil(n_valid / 4)
    images, targets = train_batches[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, SIZE, SIZE)
    assert targets.dtype == torch.int64


def test_validation_is_in_order_centre_crops(presized):
    valid = presized[presized["split"] == "valid"]
    loader = make_loader(valid, size=SIZE, train=False, batch_size=len(valid), workers=0)
    images, targets = next(iter(loader))

    assert targets.tolist() == valid["target"].tolist()
    for image, path in zip(images, valid["presized_path"], strict=True):
        with Image.open(path) as cached:
            pixels = pil_to_tensor(cached.convert("RGB"))
        top, left = crop_offset(pixels.shape[1], SIZE, 0.5), crop_offset(pixels.shape[2], SIZE, 0.5)
        assert torch.equal(image, pixels[:, top : top + SIZE, left : left + SIZE])


def test_training_crops_are_reproducible_for_a_seed_whatever_the_workers(presized):
    train = presized[presized["split"] == "train"]

    def epoch(workers, seed):
        loader = make_loader(train, size=SIZE, train=True, batch_size=3, workers=workers, seed=seed)
        return torch.cat([images for images, _ in loader])

    assert torch.equal(epoch(0, 7), epoch(2, 7))
    assert not torch.equal(epoch(0, 7), epoch(0, 8))


def test_sampler_shuffles_each_epoch_with_crops_inside_the_image():
    sampler = CropSampler(50, train=True, seed=3)
    first, second = list(sampler), list(sampler)
    assert [i for i, _, _ in first] != [i for i, _, _ in second]
    assert sorted(i for i, _, _ in first) == list(range(50))
    assert all(0 <= fx < 1 and 0 <= fy < 1 for _, fx, fy in first)
    assert list(CropSampler(3, train=False)) == [(0, 0.5, 0.5), (1, 0.5, 0.5), (2, 0.5, 0.5)]


def test_sampler_epoch_draws_depend_only_on_seed_and_epoch():
    running = CropSampler(20, train=True, seed=5)
    epochs = [list(running) for _ in range(3)]
    resumed = CropSampler(20, train=True, seed=5)
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]
    assert epochs[1] != epochs[2]


def test_loading_leaves_global_rng_alone(presized):
    before = torch.get_rng_state()
    train_loader, _ = make_loaders(presized, size=SIZE, batch_size=4, workers=0, seed=1)
    list(train_loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_batch_larger_than_training_set_is_a_clear_error(presized):
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        make_loaders(presized, size=SIZE, batch_size=64, workers=0)


def test_images_presized_for_another_size_are_refused(presized):
    loader = make_loader(presized[presized["split"] == "valid"], size=SIZE * 4, train=False, batch_size=2, workers=0)
    with pytest.raises(ValueError, match="presized for another size"):
        next(iter(loader))


def test_default_workers_leave_the_cores_to_a_cpu_model_and_feed_a_gpu(monkeypatch):
    from lib.data import loading

    monkeypatch.setattr(loading.os, "sched_getaffinity", lambda pid: set(range(2)))
    assert loading.default_workers("cpu") == 0 and loading.default_workers("cuda") == 2
    monkeypatch.setattr(loading.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert loading.default_workers("cpu") == 64 // loading.CPU_CORES_PER_WORKER
    assert loading.default_workers("cuda") == loading.MAX_DEFAULT_WORKERS  # fastai's min(16, cpus)


def test_kept_decoded_images_give_the_same_batches_and_are_not_opened_again(presized, monkeypatch):
    from PIL import Image

    train = presized[presized["split"] == "train"]
    from_disk = make_loader(train, size=SIZE, train=True, batch_size=3, workers=0, seed=1, keep_decoded=False)
    in_memory = make_loader(train, size=SIZE, train=True, batch_size=3, workers=0, seed=1, keep_decoded=True)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path: opened.append(path) or real_open(path))
    for _ in range(2):  # two epochs: other orders and crops, the same pixels
        for (a, ta), (b, tb) in zip(from_disk, in_memory, strict=True):
            assert torch.equal(a, b) and torch.equal(ta, tb)
    assert len(opened) == 2 * len(train) + len(train)  # from disk: every epoch; in memory: the first epoch only


def test_images_are_kept_decoded_only_without_workers_and_within_the_memory_budget(presized, monkeypatch):
    from lib.data import loading

    sized = presized.assign(width=60, height=40)  # every original 60x40: 48x32 at presize 32
    assert loading.decoded_bytes(sized, SIZE) == len(sized) * 48 * 32 * 3
    assert loading.decoded_bytes(presized, SIZE) is None  # no sizes recorded: no estimate
    assert loading.keep_decoded_default(sized, SIZE, workers=0)
    assert not loading.keep_decoded_default(sized, SIZE, workers=2)  # each worker would hold its own copy
    assert not loading.keep_decoded_default(presized, SIZE, workers=0)
    monkeypatch.setattr(loading, "physical_memory", lambda: 4 * len(sized) * 48 * 32 * 3)
    assert not loading.keep_decoded_default(sized, SIZE, workers=0)  # 20% of that is under the estimate
