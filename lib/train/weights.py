"""Pretrained torchvision weights: resolve a name, find or download the checkpoint, load it safely.

Checkpoints live where torchvision keeps them, `torch.hub.get_dir()/checkpoints` ($TORCH_HOME/hub/checkpoints,
by default ~/.cache/torch/hub/checkpoints), so a file torchvision already downloaded is reused and vice versa.
Set PETS_WEIGHTS_MIRROR to a base URL to download the same file names from another server (firewalled sites).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import torch
import torchvision
from torchvision.models import WeightsEnum
from tqdm.auto import tqdm

MIRROR_ENV = "PETS_WEIGHTS_MIRROR"
CHECKPOINT_SUFFIXES = (".pth", ".pt")
_READ_CHUNK = 1 << 20
_NO_PRETRAINING_HINT = "pretrained=False in Python, --no-pretrained on the pets CLI"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable; the message says where to put the file."""

    def __init__(self, reason: str, *, path: Path, url: str) -> None:
        self.reason = reason
        self.path = path
        self.url = url
        super().__init__(
            f"Pretrained weights are not available: {reason}\n"
            f"  missing file: {path}\n"
            f"  download it from: {url}\n"
            f"  and put it in {path.parent} (torch.hub.get_dir()/checkpoints: $TORCH_HOME/hub/checkpoints, "
            "by default ~/.cache/torch/hub/checkpoints),\n"
            f"  or set {MIRROR_ENV} to a base URL that serves {path.name},\n"
            f"  or train without pretraining: {_NO_PRETRAINING_HINT}."
        )


class ChecksumMismatchError(WeightsUnavailableError):
    """A downloaded checkpoint's sha256 does not start with the prefix in its file name; the file was discarded."""


class CheckpointLoadError(ValueError):
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
    return folder / _file_name(weights.url)


def download_url(weights: WeightsEnum) -> str:
    """Return the URL to download weights from: the official one, or the same file name under $PETS_WEIGHTS_MIRROR."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return weights.url
    return f"{mirror.rstrip('/')}/{_file_name(weights.url)}"


def expected_hash_prefix(file_name: str) -> str | None:
    """Return the sha256 prefix torchvision puts after the last '-' of a file name (resnet50-11ad3fa6.pth)."""
    _, dash, tail = Path(file_name).stem.rpartition("-")
    # torch.hub's check_hash reads the hex digits between a '-' and the suffix the same way.
    is_hex = bool(tail) and all(character in "0123456789abcdef" for character in tail)
    return tail if dash and is_hex else None


def load_pretrained(
    arch: str,
    spec: bool | str | Path | WeightsEnum | None = True,
    *,
    download: bool = True,
    weights_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor] | None:
    """Return the pretrained state dict that spec names, downloading it to the cache if needed.

    Args:
        arch: torchvision architecture name, e.g. "resnet34".
        spec: False/None for no weights; True or "DEFAULT"; a torchvision weights name such as "IMAGENET1K_V1";
            a weights enum member; or the path of a local .pth/.pt state dict.
        download: Download a checkpoint missing from the cache; when False a missing file raises.
        weights_dir: Folder holding the checkpoints instead of torch.hub.get_dir()/checkpoints.
        progress: Show a download progress bar.

    Raises:
        WeightsUnavailableError: The checkpoint is not cached and cannot be downloaded.
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


def _download_checkpoint(weights: WeightsEnum, path: Path, *, download: bool, progress: bool) -> None:
    """Download the checkpoint of weights to path, or explain why it cannot be had."""
    if not download:
        raise WeightsUnavailableError(f"{path.name} is not cached and downloading is off.", path=path, url=weights.url)
    url = download_url(weights)
    try:
        fetch_checkpoint(url, path, hash_prefix=expected_hash_prefix(path.name), progress=progress)
    except ChecksumMismatchError as exc:
        raise ChecksumMismatchError(exc.reason, path=path, url=weights.url) from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, HTTPError and timeouts are OSErrors
        raise WeightsUnavailableError(f"downloading {url} failed: {exc!r}", path=path, url=weights.url) from exc


def fetch_checkpoint(
    url: str, destination: Path, *, hash_prefix: str | None = None, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Download url to destination atomically, checking that the file's sha256 starts with hash_prefix.

    Args:
        url: http(s) URL of the file.
        destination: Final path; a temporary `.partial` sibling is renamed onto it only when complete and verified.
        hash_prefix: Expected leading hex digits of the sha256, as torch.hub's check_hash uses them.
        progress: Show a progress bar.
        timeout: Seconds to wait to connect and for each read (torch.hub's downloader has none and can hang).

    Raises:
        ChecksumMismatchError: The sha256 does not start with hash_prefix; nothing is kept.
        OSError, http.client.HTTPException: The transfer failed; nothing is kept.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f"{destination.name}.{uuid.uuid4().hex}.partial")
    try:
        digest = _stream_to_file(url, partial, progress=progress, timeout=timeout)
        if hash_prefix is not None and not digest.startswith(hash_prefix):
            raise ChecksumMismatchError(
                f"the sha256 of the file downloaded from {url} is {digest}, but its name promises {hash_prefix}...; "
                "the file was discarded (a wrong or corrupt file on the server or mirror).",
                path=destination,
                url=url,
            )
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination


def _stream_to_file(url: str, target: Path, *, progress: bool, timeout: float) -> str:
    """Write the body of url to target and return its sha256 hex digest."""
    sha256 = hashlib.sha256()
    request = Request(url, headers={"User-Agent": "torch.hub"})  # the agent torch.hub sends
    with urlopen(request, timeout=timeout) as response, target.open("wb") as file:
        expected = response.headers.get("Content-Length")
        total = int(expected) if expected and expected.isdigit() else None
        received = 0
        with tqdm(total=total, disable=not progress, unit="B", unit_scale=True, unit_divisor=1024) as bar:
            while chunk := response.read(_READ_CHUNK):
                file.write(chunk)
                sha256.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise http.client.IncompleteRead(b"", total - received)
    return sha256.hexdigest()


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


def _file_name(url: str) -> str:
    """Return the last path component of url."""
    return os.path.basename(urlparse(url).path)
