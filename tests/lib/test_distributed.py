"""Data-parallel pieces that need no process group: how ranks share a global batch, the validation set and the
augmentation, and the recipe's refusals. The ranks themselves train in tests/flows/test_data_parallel.py."""

import pytest
import torch

from lib.data.augment import aug_transforms
from lib.data.loading import CropSampler, Shard
from lib.recipe import Recipe, RecipeError
from lib.train.distributed import DataParallel, torchrun_arguments
from lib.train.trainer import rank_batch_size


def batches(requests: list, size: int) -> list[list]:
    return [requests[start : start + size] for start in range(0, len(requests), size)]


@pytest.mark.parametrize(("length", "world_size", "rank_batch"), [(37, 2, 4), (64, 4, 2), (23, 3, 5)])
def test_rank_k_batch_j_is_its_share_of_batch_j_of_one_process_with_the_global_batch(length, world_size, rank_batch):
    global_batch = world_size * rank_batch
    for epoch in range(2):
        one = CropSampler(length, train=True, seed=11)
        one.set_epoch(epoch)
        whole = batches(list(one), global_batch)[: length // global_batch]  # drop_last: the incomplete one goes
        ranks = []
        for rank in range(world_size):
            sampler = CropSampler(length, train=True, seed=11, shard=Shard(rank, world_size, rank_batch))
            sampler.set_epoch(epoch)
            drawn = list(sampler)
            assert len(drawn) == len(sampler) == len(whole) * rank_batch
            ranks.append(batches(drawn, rank_batch))
        for index, batch in enumerate(whole):  # the same images and the same crops, in the same places
            assert [request for rank in ranks for request in rank[index]] == batch
        seen = [request[0] for rank in ranks for batch in rank for request in batch]
        assert len(seen) == len(set(seen))  # DistributedSampler's promise: each item at most once an epoch


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("length", [0, 1, 4, 11])
def test_the_ranks_validate_every_image_once_none_padded_or_dropped(length, world_size):
    shards = [CropSampler(length, train=False, shard=Shard(rank, world_size, 4)) for rank in range(world_size)]
    drawn = [list(sampler) for sampler in shards]
    assert [request for rank in drawn for request in rank] == [(index, 0.5, 0.5) for index in range(length)]
    assert [len(sampler) for sampler in shards] == [len(rank) for rank in drawn]
    assert max(map(len, drawn)) - min(map(len, drawn)) <= 1


def test_a_rank_augments_its_share_as_one_process_augmenting_the_global_batch_would():
    augmentation = aug_transforms(24, 0.5)
    images = torch.randint(0, 256, (6, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = augmentation(images, train=True, generator=torch.Generator().manual_seed(5))
    for rank in range(3):
        rows = slice(2 * rank, 2 * rank + 2)
        share = augmentation(images[rows], train=True, generator=torch.Generator().manual_seed(5), share=(rank, 3))
        # The same parameters; the pixels to float32 rounding (a kernel over 2 images sums in another order than over 6)
        torch.testing.assert_close(share, whole[rows], rtol=0, atol=1e-4)
    # Without the share each rank would draw the first rows' parameters for its own images.
    alone = augmentation(images[2:4], train=True, generator=torch.Generator().manual_seed(5))
    assert (alone - whole[2:4]).abs().max() > 0.1


def test_the_global_batch_must_split_equally_over_the_processes():
    assert rank_batch_size(64, 8) == 8
    with pytest.raises(RecipeError, match=r"--bs 63 does not split equally over 2 training processes"):
        Recipe().updated({"bs": 63, "nproc_per_node": 2, "device": "cpu"}).check_runnable()
    with pytest.raises(ValueError, match="give a multiple of 3"):
        rank_batch_size(64, 3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"nproc_per_node": "0"}, "--nproc-per-node: String should match pattern"),
        ({"nproc_per_node": "two"}, "--nproc-per-node: String should match pattern"),
        ({"nnodes": 2}, "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "node0:29400"}, "--node-rank 2 must be below --nnodes 2"),
        ({"rdzv_endpoint": "node0"}, "--rdzv-endpoint: String should match pattern"),
    ],
)
def test_the_recipe_refuses_process_settings_that_cannot_run(settings, message):
    from flows.options import RecipeRequest

    with pytest.raises(RecipeError, match=message):
        RecipeRequest(given=settings).resolve()


def test_a_recipe_file_may_count_processes_as_a_number_and_auto_without_a_gpu_is_one(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("runtime:\n  nproc_per_node: 8\n  device: cpu\n")
    assert Recipe.load(path).runtime.processes_per_node() == 8
    assert Recipe().updated({"nproc_per_node": "auto", "device": "cpu"}).runtime.processes_per_node() == 1


def test_more_processes_than_visible_gpus_or_one_named_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a node with two GPUs, as the check sees it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Recipe().updated({"nproc_per_node": "auto"}).runtime.check_processes() == 2
    with pytest.raises(RecipeError, match=r"asks for 4 processes, one per GPU, but this node has 2 visible GPU"):
        Recipe().updated({"nproc_per_node": 4}).check_processes()
    with pytest.raises(RecipeError, match="--device cuda:1 names one GPU"):
        Recipe().updated({"nproc_per_node": 2, "device": "cuda:1"}).check_processes()
    Recipe().updated({"nproc_per_node": 4, "device": "cpu"}).check_processes()  # gloo: processes share the cores


def test_one_node_uses_a_standalone_rendezvous_and_several_a_static_one_that_follows_the_node_ranks():
    one = Recipe().updated({"nproc_per_node": 2, "device": "cpu"}).runtime
    assert "--standalone" in torchrun_arguments(one) and "--nproc-per-node=2" in torchrun_arguments(one)
    two = (
        Recipe()
        .updated({"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "node0:29400", "rdzv_timeout": 30, "device": "cpu"})
        .runtime
    )
    arguments = torchrun_arguments(two)
    assert "--standalone" not in arguments
    for expected in ("--nnodes=2", "--node-rank=1", "--rdzv-backend=static", "--rdzv-endpoint=node0:29400"):
        assert expected in arguments
    assert "--rdzv-conf=timeout=30" in arguments


def test_a_rank_reads_its_place_from_torchrun_s_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert DataParallel.from_environment() is None
    for name, value in {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    parallel = DataParallel.from_environment()
    assert parallel == DataParallel(rank=5, local_rank=1, world_size=8, local_world_size=4) and not parallel.main
