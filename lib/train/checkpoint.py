"""Training checkpoints: everything needed to continue a run where it stopped, written atomically and durably.

The Trainer writes one at the end of every epoch, so a resumed run starts at the first batch of the next epoch. It
holds the model, the optimizer, GradScaler and loss-smoother state, the training plan it belongs to, the position in
that plan (phase, epochs done in it) and the record so far (epoch rows, loss curves). It contains only tensors and
plain Python values, so it loads with `torch.load(weights_only=True)`: opening a checkpoint never runs code from the
file.

The Trainer keeps two: `last.pt`, and `previous.pt`, the one it replaced (an epoch earlier). A `last.pt` that cannot
be read back (a disk that filled up, a file copied in half) is moved aside, never deleted, and the run resumes from
`previous.pt`, or from the start when that is damaged too (`resume_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib.common.errors import InputError, UserError
from lib.common.files import write_atomically

CHECKPOINT_FORMAT = 1
LAST_CHECKPOINT = "last.pt"
PREVIOUS_CHECKPOINT = "previous.pt"
DAMAGED_SUFFIX = ".damaged"
REASON_CHARACTERS = 100  # enough for torch.load's first sentence; the line naming a damaged file stays one line


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint belongs to a different training plan than the one asked to resume."""


class DamagedCheckpointError(InputError):
    """A checkpoint torch.load cannot read (truncated, empty, overwritten) or that lacks a key every one holds."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is damaged ({reason}): move it aside, or delete it, to train from the start.")
        self.path, self.reason = Path(path), reason


def previous_checkpoint(last: Path) -> Path:
    """Where the checkpoint before `last` is kept: `previous.pt` in the same folder."""
    return Path(last).with_name(PREVIOUS_CHECKPOINT)


def save_checkpoint(path: Path, state: dict[str, Any], *, keep_previous: Path | None = None) -> Path:
    """Write a checkpoint atomically and flushed to the disk, so a crash or a power cut never leaves half of one.

    keep_previous: where the checkpoint being replaced is renamed to first (the Trainer's `previous.pt`).
    """
    payload = {"format": CHECKPOINT_FORMAT, **state}
    return write_atomically(
        Path(path), lambda temporary: torch.save(payload, temporary), durable=True, keep_previous=keep_previous
    )


def load_checkpoint(path: Path, *, plan: dict[str, Any], keys: Iterable[str] = ()) -> dict[str, Any]:
    """Load a checkpoint and check it was written by the same training plan.

    Raises DamagedCheckpointError when torch.load fails or the payload lacks `format`, `plan` or one of `keys`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: pass the `{LAST_CHECKPOINT}` file a previous run wrote.")
    state = _read(path, keys)
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{path} is not a checkpoint of format {CHECKPOINT_FORMAT}.")
    differences = plan_differences(state["plan"], plan)
    if differences:
        raise CheckpointMismatchError(
            f"{path} was written by a different training plan ({'; '.join(differences)}). Resume with the same "
            f"settings, or delete {path.parent} to train that stage from the start."
        )
    return state


def _read(path: Path, keys: Iterable[str]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:  # a file this user may not read is not damaged: moving it aside would hide the cause
        raise
    # torch 2.14 fails on a damaged file with whatever its reader hits: OSError (a truncated zip), EOFError (empty),
    # UnpicklingError (garbage, or objects other than tensors and plain values), KeyError, RuntimeError...
    except Exception as error:
        raise DamagedCheckpointError(path, _load_failure(path, error)) from error
    if not isinstance(state, dict):
        raise DamagedCheckpointError(path, f"it holds a {type(state).__name__}, not a checkpoint's dict")
    missing = [key for key in ("format", "plan", *keys) if key not in state]
    if missing:
        raise DamagedCheckpointError(path, f"it lacks {', '.join(missing)}")
    return state


def _load_failure(path: Path, error: Exception) -> str:
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    lines = str(error).strip().splitlines()
    first = lines[0].split(". ")[0].strip() if lines else ""  # torch's messages go on for paragraphs
    said = f": {first[:REASON_CHARACTERS]}" if first else ""
    return f"{size} bytes, torch.load failed with {type(error).__name__}{said}"


def move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `<name>.damaged` beside it (`.damaged-2`, ... when an earlier one is kept)."""
    path = Path(path)
    target, count = path.with_name(path.name + DAMAGED_SUFFIX), 1
    while target.exists():
        count += 1
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{count}")
    return path.rename(target)


@dataclass(frozen=True)
class Resumption:
    """What `resume_checkpoint` found: the state to continue from (None: train from the start), the file it came
    from, and a line per damaged file, naming it and the name it was moved to beside it."""

    state: dict[str, Any] | None
    path: Path | None
    damaged: tuple[str, ...]


def resume_checkpoint(last: Path, *, plan: dict[str, Any], keys: Iterable[str] = ()) -> Resumption:
    """Load `last`, or the `previous.pt` beside it when `last` is damaged or absent, for a run to continue from.

    Each damaged one is moved aside (`move_aside`); when neither loads, the state is None and the run starts over. A
    checkpoint of another plan still raises CheckpointMismatchError, and FileNotFoundError when neither file exists.
    `last` is absent but `previous.pt` complete only when a crash came between the two renames of `save_checkpoint`.
    """
    last, keys = Path(last), tuple(keys)
    candidates = [path for path in (last, previous_checkpoint(last)) if path.is_file()]
    if not candidates:
        load_checkpoint(last, plan=plan)  # raises FileNotFoundError, naming `last`
    damaged = []
    for path in candidates:
        try:
            return Resumption(load_checkpoint(path, plan=plan, keys=keys), path, tuple(damaged))
        except DamagedCheckpointError as error:
            damaged.append(f"{path} is damaged ({error.reason}); moved to {move_aside(path).name}")
    return Resumption(None, None, tuple(damaged))


def plan_differences(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """List the settings whose values differ between two plans, e.g. 'epochs: 4 in the checkpoint, 6 now'."""
    keys = sorted(set(saved) | set(requested))
    return [
        f"{key}: {saved.get(key)!r} in the checkpoint, {requested.get(key)!r} now"
        for key in keys
        if saved.get(key) != requested.get(key)
    ]
