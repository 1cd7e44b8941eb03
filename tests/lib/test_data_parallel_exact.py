"""Two gloo ranks train exactly like one process when nothing in the model depends on the batch.

The project's resnet18 with every BatchNorm swapped for a per-image norm (GroupNorm with one group, LayerNorm in the
head) and its dropout removed: the two differences lib/train/distributed.py names go away, and what is left is the
order in which all-reduce adds the two halves of each gradient. So `fine_tune` over two ranks (each loading its share
of every global batch, drawing the whole batch's augmentation and applying its rows, DDP averaging the gradients,
validation summed over the ranks) must end with one process's weights and metrics to float32 rounding. A rank that
saw other images, a learning rate scaled by the world, a schedule of another length or a validation sample counted
twice would all move them by far more.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lib.train import distributed, trainer
from lib.train.distributed import DataParallel
from tests.support.pets import STAGE_PRESIZE, presized_pets

BATCH = 8  # global: 4 a rank
# Small enough that 19 images of random-init training stay stable: at 2e-3 the unfrozen epoch's validation loss
# jumps from 0.9 to 3.4 here, and a training that unstable turns float32 rounding into percent-size differences.
BASE_LR = 1e-3


def per_image_norms(model: nn.Module) -> nn.Module:
    """The model with each BatchNorm as a norm over one image's features, and no dropout."""
    for name, module in model.named_children():
        if isinstance(module, nn.BatchNorm2d):
            setattr(model, name, nn.GroupNorm(1, module.num_features))
        elif isinstance(module, nn.BatchNorm1d):
            setattr(model, name, nn.LayerNorm(module.num_features))
        elif isinstance(module, nn.Dropout):
            setattr(model, name, nn.Identity())
        else:
            per_image_norms(module)
    return model


def train(rank: int, world_size: int, port: int, folder: str) -> None:
    """fine_tune(1, BASE_LR, freeze_epochs=1) on the pets under folder as rank `rank` of `world_size` (1: alone)."""
    torch.set_num_threads(1)
    parallel = None
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
        parallel = DataParallel(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size)
        distributed.join(parallel, "cpu", timeout_seconds=60)
    building = trainer.create_model
    trainer.create_model = lambda *args, **kwargs: per_image_norms(building(*args, **kwargs))
    try:
        manifest, vocab = torch.load(os.path.join(folder, "pets.pt"), weights_only=False)
        torch.manual_seed(0)
        fitted = trainer.vision_trainer(
            manifest, vocab, arch="resnet18", pretrained=False, presize=STAGE_PRESIZE, size=32, batch_size=BATCH,
            workers=0, seed=3, device="cpu", progress=False, epoch_table=False, parallel=parallel,
        )  # fmt: skip
        start = {name: tensor.clone() for name, tensor in fitted.model.state_dict().items()}
        history = fitted.fine_tune(1, BASE_LR, freeze_epochs=1)
        if rank == 0:
            end = {name: tensor.clone() for name, tensor in fitted.model.state_dict().items()}
            epochs = [(row.train_loss, row.valid_loss, row.error_rate) for row in history]
            torch.save((start, end, epochs), os.path.join(folder, f"trained-{world_size}.pt"))
    finally:
        trainer.create_model = building
        if parallel is not None:
            distributed.leave()


def trained(world_size: int, folder) -> tuple[dict, dict, list]:
    """(weights before, weights after, [(train loss, valid loss, error rate)] per epoch) of rank 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(train, args=(world_size, port, str(folder)), nprocs=world_size, start_method="spawn")
    return torch.load(folder / f"trained-{world_size}.pt", weights_only=False)


@pytest.mark.slow  # three spawned processes that import torch and train: ~15 s; CI runs it (make test-slow)
def test_two_gloo_ranks_end_with_the_weights_and_metrics_of_one_process_when_no_layer_sees_the_batch(tmp_path):
    manifest, vocab = presized_pets(tmp_path, breeds=3, images_per_breed=8, presize=STAGE_PRESIZE)
    torch.save((manifest, vocab), tmp_path / "pets.pt")
    start, one_weights, one_history = trained(1, tmp_path)
    two_start, two_weights, two_history = trained(2, tmp_path)
    assert len(two_history) == len(one_history) == 2  # the frozen epoch, then the unfrozen one
    for one, two in zip(one_history, two_history, strict=True):  # measured: within 1e-6 of each other
        assert two == pytest.approx(one, rel=1e-5), (one_history, two_history)
    for name, tensor in one_weights.items():
        assert torch.equal(two_start[name], start[name]), name  # the same init
        # measured: every tensor within 2e-4 of its largest value (float32 sums in another order, then Adam)
        scale = tensor.abs().max().item() if tensor.is_floating_point() else 0
        torch.testing.assert_close(two_weights[name], tensor, rtol=0, atol=1e-3 * scale, msg=name)
    assert not all(torch.equal(start[name], tensor) for name, tensor in one_weights.items())  # and it trained
