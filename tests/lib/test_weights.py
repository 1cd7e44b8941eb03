"""Pretrained weights: names, cache location, loopback downloads with hash checks, safe loading, clear errors.

The downloads go through lib/common/download.py, the downloader the data stage uses too. No test reaches the
internet: TORCH_HOME is a temporary folder and PETS_WEIGHTS_MIRROR points at 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, Weights, WeightsEnum

from lib.common.download import ChecksumMismatchError, DownloadError, download_file
from lib.data.source import download_archive
from lib.train.model import create_model
from lib.train.weights import (
    MIRROR_ENV,
    CheckpointLoadError,
    WeightsUnavailableError,
    checkpoint_path,
    download_url,
    expected_hash_prefix,
    load_pretrained,
    weights_for,
)
from tests.support.http_server import refused_port, serve_directory, silent_port

OFFICIAL_RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


class NotATensor:
    """A pickleable object that torch.load(weights_only=True) must refuse."""


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Point the torch hub cache at a temporary folder and any download at a port that refuses connections."""
    torch_home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    with refused_port() as port:
        monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{port}/models")
        yield torch_home


def random_torchvision_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return a torchvision-format state dict (fc included) filled with seeded random numbers."""
    with torch.device("meta"):
        reference = torchvision.models.get_model(arch, weights=None)
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else torch.zeros_like(value)
        for key, value in reference.to_empty(device="cpu").state_dict().items()
    }


def saved_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> bytes:
    """Save state_dict to path and return the file's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return path.read_bytes()


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def served_weights(folder: Path, seed: int) -> tuple[dict[str, torch.Tensor], WeightsEnum, bytes]:
    """Save a resnet18 state dict under a torchvision-style name carrying its sha256 prefix, as torchvision does.

    Returns the state dict, a weights entry whose URL ends in that name, and the file's bytes.
    """
    state_dict = random_torchvision_state_dict("resnet18", seed=seed)
    staging = folder / "staging.pth"
    data = saved_checkpoint(state_dict, staging)
    file_name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    staging.rename(staging.with_name(file_name))

    class LoopbackWeights(WeightsEnum):  # a weights entry whose file name carries the right hash
        TEST = Weights(url=f"https://download.invalid/models/{file_name}", transforms=lambda: None, meta={})

    return state_dict, LoopbackWeights.TEST, data


def test_default_names_resolve_like_torchvision():
    assert weights_for("resnet50") is ResNet50_Weights.IMAGENET1K_V2  # not the V1 weights the 2020 book used
    assert weights_for("resnet34") is ResNet34_Weights.IMAGENET1K_V1
    assert weights_for("resnet50", "IMAGENET1K_V1") is ResNet50_Weights.IMAGENET1K_V1
    assert weights_for("resnet50", "ResNet50_Weights.IMAGENET1K_V1") is ResNet50_Weights.IMAGENET1K_V1


def test_unknown_weights_or_architecture_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid names are: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        weights_for("resnet50", "IMAGENET1K_V3")
    with pytest.raises(ValueError, match=r"Unknown architecture 'resnet7'.*resnet18"):
        weights_for("resnet7")


def test_checkpoint_path_follows_torch_home_at_call_time(isolated_cache, tmp_path, monkeypatch):
    weights = ResNet18_Weights.DEFAULT
    assert checkpoint_path(weights) == isolated_cache / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
    assert checkpoint_path(weights) == tmp_path / "elsewhere" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert checkpoint_path(weights, tmp_path / "mine") == tmp_path / "mine" / "resnet18-f37072fd.pth"


def test_mirror_replaces_everything_before_the_file_name(monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "http://mirror.example/weights/")
    assert download_url(ResNet18_Weights.DEFAULT) == "http://mirror.example/weights/resnet18-f37072fd.pth"
    monkeypatch.delenv(MIRROR_ENV)
    assert download_url(ResNet18_Weights.DEFAULT) == OFFICIAL_RESNET18_URL


def test_hash_prefix_is_read_from_the_file_name_like_torch_hub():
    assert expected_hash_prefix("resnet50-11ad3fa6.pth") == "11ad3fa6"
    assert expected_hash_prefix("my-resnet-0676ba61.pth") == "0676ba61"
    assert expected_hash_prefix("resnet50.pth") is None
    assert expected_hash_prefix("fine-tuned.pth") is None


def test_no_pretraining_gives_no_state_dict():
    assert load_pretrained("resnet18", False) is None
    assert load_pretrained("resnet18", None) is None


def test_cached_checkpoint_is_loaded_and_used_by_create_model():
    state_dict = random_torchvision_state_dict("resnet18")
    saved_checkpoint(state_dict, checkpoint_path(weights_for("resnet18")))
    assert_same_tensors(load_pretrained("resnet18", download=False), state_dict)
    assert_same_tensors(load_pretrained("resnet18", "IMAGENET1K_V1", download=False), state_dict)
    model = create_model("resnet18", 37, pretrained=True, download=False)
    assert torch.equal(model[0].conv1.weight, state_dict["conv1.weight"])
    assert torch.equal(model[0].layer4[1].bn2.running_var, state_dict["layer4.1.bn2.running_var"])


def test_weights_dir_overrides_the_hub_cache(tmp_path):
    state_dict = random_torchvision_state_dict("resnet18", seed=3)
    saved_checkpoint(state_dict, tmp_path / "mine" / "resnet18-f37072fd.pth")
    model = create_model("resnet18", 2, weights_dir=tmp_path / "mine", download=False)
    assert torch.equal(model[0].conv1.weight, state_dict["conv1.weight"])


def test_missing_checkpoint_without_download_says_where_to_put_it(isolated_cache):
    expected = isolated_cache / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsUnavailableError) as caught:
        load_pretrained("resnet18", download=False)
    message = str(caught.value)
    assert str(expected) in message
    assert OFFICIAL_RESNET18_URL in message
    assert "$TORCH_HOME/hub/checkpoints" in message and "~/.cache/torch/hub/checkpoints" in message
    assert "pretrained=False" in message and "--no-pretrained" in message
    assert caught.value.path == expected


def test_download_file_keeps_a_checkpoint_whose_hash_prefix_matches(tmp_path):
    data = saved_checkpoint(random_torchvision_state_dict("resnet18"), tmp_path / "served" / "weights.pth")
    digest = hashlib.sha256(data).hexdigest()
    destination = tmp_path / "cache" / "weights.pth"
    with serve_directory(tmp_path / "served") as server:
        assert download_file(server.url("weights.pth"), destination, sha256=digest[:8], progress=False) == digest
    assert destination.read_bytes() == data
    assert [path.name for path in destination.parent.iterdir()] == ["weights.pth"]  # no .part left behind


def test_download_file_discards_a_checkpoint_whose_hash_prefix_differs(tmp_path):
    data = saved_checkpoint(random_torchvision_state_dict("resnet18"), tmp_path / "served" / "weights.pth")
    wrong = format(int(hashlib.sha256(data).hexdigest()[:8], 16) ^ 1, "08x")
    destination = tmp_path / "cache" / "weights.pth"
    with serve_directory(tmp_path / "served") as server, pytest.raises(ChecksumMismatchError, match=wrong):
        download_file(server.url("weights.pth"), destination, sha256=wrong, progress=False)
    assert list(destination.parent.iterdir()) == []


def test_download_through_the_mirror_verifies_and_caches(tmp_path, monkeypatch):
    state_dict, weights, _ = served_weights(tmp_path / "served", seed=5)

    with serve_directory(tmp_path / "served") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url("").rstrip("/"))
        assert_same_tensors(load_pretrained("resnet18", weights, progress=False), state_dict)
        assert checkpoint_path(weights).is_file()
        assert_same_tensors(load_pretrained("resnet18", weights, progress=False), state_dict)
        assert server.requests == 1  # the second load used the cache


def test_a_wrong_file_on_the_mirror_is_rejected_and_not_kept(tmp_path, monkeypatch):
    saved_checkpoint(random_torchvision_state_dict("resnet18"), tmp_path / "served" / "resnet18-f37072fd.pth")
    with serve_directory(tmp_path / "served") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url(""))
        with pytest.raises(ChecksumMismatchError, match="f37072fd") as caught:
            load_pretrained("resnet18", progress=False)
        assert server.requests == 1
    assert caught.value.transient is False and caught.value.expected == "f37072fd"
    assert "--no-pretrained" in str(caught.value) and MIRROR_ENV in str(caught.value)
    path = checkpoint_path(weights_for("resnet18"))
    assert not path.exists() and not path.with_name(path.name + ".part").exists()


def test_both_stages_raise_one_checksum_error_from_one_downloader(tmp_path, monkeypatch):
    served = tmp_path / "served"
    saved_checkpoint(random_torchvision_state_dict("resnet18"), served / "resnet18-f37072fd.pth")  # not f37072fd…
    with tarfile.open(served / "pets.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("images/a.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"jpg"))
    with serve_directory(served) as server:
        monkeypatch.setenv(MIRROR_ENV, server.url(""))
        with pytest.raises(ChecksumMismatchError) as weights_error:
            load_pretrained("resnet18", progress=False)
        with pytest.raises(ChecksumMismatchError) as data_error:
            download_archive(server.url("pets.tgz"), tmp_path / "cache", sha256="0" * 64, progress=False)
    assert type(weights_error.value) is type(data_error.value) is ChecksumMismatchError
    assert "downloaded from" in weights_error.value.reason and "downloaded from" in data_error.value.reason
    assert "--no-pretrained" in weights_error.value.fix and "--data-dir" in data_error.value.fix


def test_a_cut_transfer_is_weights_unavailable_and_the_next_load_resumes(tmp_path, monkeypatch):
    state_dict, weights, data = served_weights(tmp_path / "served", seed=9)
    path = checkpoint_path(weights)
    part = path.with_name(path.name + ".part")
    with serve_directory(tmp_path / "served") as server:
        server.cut_after = 1000  # the first response only
        monkeypatch.setenv(MIRROR_ENV, server.url(""))
        with pytest.raises(WeightsUnavailableError, match="cut off after 1000") as caught:
            load_pretrained("resnet18", weights, progress=False)
        assert isinstance(caught.value.__cause__, DownloadError) and caught.value.__cause__.transient
        assert not path.exists() and part.read_bytes() == data[:1000]

        assert_same_tensors(load_pretrained("resnet18", weights, progress=False), state_dict)
        assert server.range_headers == [None, "bytes=1000-"]
    assert path.read_bytes() == data and not part.exists()


def test_two_loads_at_once_download_the_checkpoint_once(tmp_path, monkeypatch):
    state_dict, weights, _ = served_weights(tmp_path / "served", seed=11)
    with serve_directory(tmp_path / "served") as server:
        server.delay_seconds = 0.5  # both loads ask while the first transfer is still pending
        monkeypatch.setenv(MIRROR_ENV, server.url(""))
        with ThreadPoolExecutor(max_workers=2) as pool:
            loaded = list(pool.map(lambda _: load_pretrained("resnet18", weights, progress=False), range(2)))
        assert server.requests == 1  # the second waited for the first, then found the file
    for result in loaded:
        assert_same_tensors(result, state_dict)


def test_connection_refused_is_weights_unavailable(isolated_cache):
    with pytest.raises(WeightsUnavailableError) as caught:
        load_pretrained("resnet34", progress=False)
    assert isinstance(caught.value.__cause__, DownloadError) and caught.value.__cause__.transient
    assert "resnet34-b627a593.pth" in str(caught.value) and "pretrained=False" in str(caught.value)
    assert not (isolated_cache / "hub" / "checkpoints" / "resnet34-b627a593.pth").exists()


def test_http_error_is_weights_unavailable(tmp_path, monkeypatch):
    (tmp_path / "served").mkdir()
    with serve_directory(tmp_path / "served") as server:
        monkeypatch.setenv(MIRROR_ENV, server.url(""))
        with pytest.raises(WeightsUnavailableError, match="404"):
            load_pretrained("resnet18", progress=False)


def test_a_silent_server_times_out(tmp_path):
    with silent_port() as port, pytest.raises(DownloadError, match="Timeout") as caught:
        download_file(f"http://127.0.0.1:{port}/w.pth", tmp_path / "w.pth", timeout=0.3, progress=False)
    assert caught.value.transient is True
    assert list(tmp_path.iterdir()) == []


def test_a_local_state_dict_path_is_loaded(tmp_path):
    state_dict = random_torchvision_state_dict("resnet18", seed=7)
    path = tmp_path / "my weights.pth"
    saved_checkpoint(state_dict, path)
    assert_same_tensors(load_pretrained("resnet18", path), state_dict)
    assert_same_tensors(load_pretrained("resnet18", str(path)), state_dict)
    model = create_model("resnet18", 3, pretrained=str(path))
    assert torch.equal(model[0].conv1.weight, state_dict["conv1.weight"])


def test_a_missing_local_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth does not exist.*pretrained=False"):
        load_pretrained("resnet18", missing)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": NotATensor()}, path)
    with pytest.raises(CheckpointLoadError, match=r"unsafe\.pth.*weights_only=True") as caught:
        load_pretrained("resnet18", path)
    assert isinstance(caught.value, ValueError)


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointLoadError, match="holds a list, not a state dict"):
        load_pretrained("resnet18", path)
