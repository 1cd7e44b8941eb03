"""Pretrained torchvision weights: resolve a name, find or download the checkpoint, load it safely.

Checkpoints live where torchvision keeps them, `torch.hub.get_dir()/checkpoints` ($TORCH_HOME/hub/checkpoints,
by default ~/.cache/torch/hub/checkpoints), so a file torchvision already downloaded is reused and vice versa.
Set PETS_WEIGHTS_MIRROR to a base URL to download the same file names from another server (firewalled sites).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torchvision.models import WeightsEnum

from lib.common.download import ChecksumMismatchError, DownloadError, download_file, download_lock, file_name
from lib.common.errors import UserError

MIRROR_ENV = "PETS_WEIGHTS_MIRROR"
CHECKPOINT_SUFFIXES = (".pth", ".pt")
_NO_PRETRAINING_HINT = "pretrained=False in Python, --no-pretrained on the pets CLI"
_LOCAL_FILE_HINT = "in Python, pretrained='/path/to/a/state_dict.pth'"


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights are neither cached nor downloadable; the message says where to put the file."""

    def __init__(self, reason: str, *, path: Path, url: str) -> None:
        self.reason = reason
        self.path = path
        self.url = url
        super().__init__(  # one line: the pets CLI prints a user error as one line
            f"Pretrained weights are not available: {reason} Download {url} to {path} (the folder is "
            "torch.hub.get_dir()/checkpoints: $TORCH_HOME/hub/checkpoints, by default "
            f"~/.cache/torch/hub/checkpoints), or set {MIRROR_ENV} to a base URL that serves {path.name}, or load a "
            f"local state dict ({_LOCAL_FILE_HINT}), or train without pretraining ({_NO_PRETRAINING_HINT})."
        )


class CheckpointLoadError(UserError, ValueError):
    """A checkpoint file is not a plain state dict of tensors (or is corrupt)."""


def weights_for(arch: str, name: str = "DEFAULT") -> WeightsEnum:
    """Return torchvision's weights entry for an architecture, e.g. DEFAULT for resnet50 is IMAGENET1K_V2."""
    try:
        weights_enum = torchvision.models.get_model_weights(arch)
    except ValueError as exc:
        known = ", ".join(torchvision.models.list_models(module=torchvision.models))
        raise ValueError(f"Unknown architecture {arch!r}; torchvision classification models are: {known}") from exc
    member = name.removeprefix(f"{weights_enum.__name__}.")  # accept "ResNet50_Weights.IMAGENET1K_V2" too
    if member not in weights_enum.__members__:
        valid = ", ".join(weights_enum.__members__)
        raise ValueError(f"Unknown weights {name!r} for {arch}; valid names are: {valid}")
    return weights_enum[member]


def checkpoint_path(weights: WeightsEnum, weights_dir: Path | None = None) -> Path:
    """Return where the checkpoint of weights is cached: weights_dir, else torch.hub.get_dir()/checkpoints."""
    # torch.hub.get_dir reads TORCH_HOME on every call, so a changed environment is honoured.
    folder = Path(weights_dir) if weights_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / file_name(weights.url)


def download_url(weights: WeightsEnum) -> str:
    """Return the URL to download weights from: the official one, or the same file name under $PETS_WEIGHTS_MIRROR."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return weights.url
    return f"{mirror.rstrip('/')}/{file_name(weights.url)}"


def expected_hash_prefix(name: str) -> str | None:
    """Return the sha256 prefix torchvision puts after the last '-' of a file name (resnet50-11ad3fa6.pth)."""
    _, dash, tail = Path(name).stem.rpartition("-")
    # torch.hub's check_hash reads the hex digits between a '-' and the suffix the same way.
    is_hex = bool(tail) and all(character in "0123456789abcdef" for character in tail)
    return tail if dash and is_hex else None


def load_pretrained(
    arch: str,
    spec: bool | str | Path | WeightsEnum | None = True,
    *,
    download: bool = True,
    weights_dir: Path | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor] | None:
    """Return the pretrained state dict that spec names, downloading it to the cache if needed.

    Args:
        arch: torchvision architecture name, e.g. "resnet34".
        spec: False/None for no weights; True or "DEFAULT"; a torchvision weights name such as "IMAGENET1K_V1";
            a weights enum member; or the path of a local .pth/.pt state dict.
        download: Download a checkpoint missing from the cache; when False a missing file raises.
        weights_dir: Folder holding the checkpoints instead of torch.hub.get_dir()/checkpoints.
        progress: Show a download progress bar: on a terminal (None), always (True) or never (False).

    Raises:
        WeightsUnavailableError: The checkpoint is not cached and cannot be downloaded.
        ChecksumMismatchError: The downloaded checkpoint's sha256 does not start with the prefix in its name.
        CheckpointLoadError: The file is not a plain state dict of tensors.
        FileNotFoundError: A local checkpoint path does not exist.
    """
    if spec is None or spec is False:
        return None
    local = _local_path(spec)
    if local is not None:
        return load_state_dict_file(local)
    weights = spec if isinstance(spec, WeightsEnum) else weights_for(arch, "DEFAULT" if spec is True else str(spec))
    path = checkpoint_path(weights, weights_dir)
    if not path.is_file():
        _download_checkpoint(weights, path, download=download, progress=progress)
    return load_state_dict_file(path)


def _local_path(spec: bool | str | Path | WeightsEnum) -> Path | None:
    """Return spec as a local checkpoint path, or None when it names torchvision weights."""
    if isinstance(spec, bool | WeightsEnum):
        return None
    looks_like_path = isinstance(spec, Path) or str(spec).endswith(CHECKPOINT_SUFFIXES) or os.sep in str(spec)
    if not looks_like_path:
        return None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Pretrained weights file {path} does not exist; pass an existing .pth state dict, "
            f"a torchvision weights name such as 'DEFAULT', or {_NO_PRETRAINING_HINT}"
        )
    return path


def _download_checkpoint(weights: WeightsEnum, path: Path, *, download: bool, progress: bool | None) -> None:
    """Download the checkpoint of weights to path through the shared downloader, or explain why it cannot be had.

    Raises:
        WeightsUnavailableError: Downloading is off, or the download failed (a cut-off keeps its `.part` file, and
            the next call resumes from it).
        ChecksumMismatchError: The file's sha256 does not start with the prefix in its name; it was discarded.
    """
    if not download:
        raise WeightsUnavailableError(f"{path.name} is not cached and downloading is off.", path=path, url=weights.url)
    url = download_url(weights)
    fix = (
        f"Check {MIRROR_ENV} if it is set, put a verified {path.name} in {path.parent}, load a local state dict "
        f"({_LOCAL_FILE_HINT}), or train without pretraining ({_NO_PRETRAINING_HINT})."
    )
    with download_lock(path):  # a second process downloading the same file waits, then finds it
        if path.is_file():
            return
        try:
            # As torchvision 0.29 does: torchvision/models/resnet.py loads weights.get_state_dict(check_hash=True), and
            # torch/hub.py's load_state_dict_from_url checks the sha256 prefix in the file name (HASH_REGEX).
            download_file(url, path, sha256=expected_hash_prefix(path.name), progress=progress, fix=fix)
        except ChecksumMismatchError:
            raise  # the checksum error the data stage raises too; its message ends with the fix
        except DownloadError as exc:
            raise WeightsUnavailableError(exc.reason, path=path, url=weights.url) from exc


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with torch.load(weights_only=True), refusing anything but tensors keyed by name."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only raises UnpicklingError; a truncated zip raises RuntimeError
        raise CheckpointLoadError(
            f"Cannot load {path} as a plain state dict: torch.load with weights_only=True refuses pickled objects "
            "other than tensors, and a truncated or corrupt file fails too. Use a file saved with "
            "torch.save(model.state_dict(), path); delete a corrupt cached file to download it again. "
            f"torch.load said: {exc}"
        ) from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise CheckpointLoadError(
            f"{path} holds a {type(loaded).__name__}, not a state dict mapping parameter names to tensors; "
            "save one with torch.save(model.state_dict(), path)."
        )
    return dict(loaded)
