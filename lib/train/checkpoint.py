"""Training checkpoints: everything needed to continue a run where it stopped, written atomically.

The Trainer writes one at the end of every epoch, so a resumed run starts at the first batch of the next epoch. It
holds the model, the optimizer, GradScaler and loss-smoother state, the training plan it belongs to, the position in
that plan (phase, epochs done in it) and the record so far (epoch rows, loss curves). It contains only tensors and
plain Python values, so it loads with `torch.load(weights_only=True)`: opening a checkpoint never runs code from the
file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lib.common.errors import UserError
from lib.common.files import write_atomically

CHECKPOINT_FORMAT = 1
LAST_CHECKPOINT = "last.pt"


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint belongs to a different training plan than the one asked to resume."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically, so a crash mid-write leaves the previous one intact."""
    payload = {"format": CHECKPOINT_FORMAT, **state}
    return write_atomically(Path(path), lambda temporary: torch.save(payload, temporary))


def load_checkpoint(path: Path, *, plan: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint and check it was written by the same training plan."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: pass the `{LAST_CHECKPOINT}` file a previous run wrote.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{path} is not a checkpoint of format {CHECKPOINT_FORMAT}.")
    differences = plan_differences(state["plan"], plan)
    if differences:
        raise CheckpointMismatchError(
            f"{path} was written by a different training plan ({'; '.join(differences)}). Resume with the same "
            f"settings, or delete {path.parent} to train that stage from the start."
        )
    return state


def plan_differences(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """List the settings whose values differ between two plans, e.g. 'epochs: 4 in the checkpoint, 6 now'."""
    keys = sorted(set(saved) | set(requested))
    return [
        f"{key}: {saved.get(key)!r} in the checkpoint, {requested.get(key)!r} now"
        for key in keys
        if saved.get(key) != requested.get(key)
    ]
