"""lib/train/checkpoint.py: checkpoints round-trip, refuse another plan, keep the one before; a damaged one is moved
aside and the stage resumes from the one before, or from the start."""

import random
import shutil
from pathlib import Path

import pytest
import torch

from lib.serve.inference import read_export
from lib.train.checkpoint import CheckpointMismatchError, load_checkpoint, move_aside, save_checkpoint
from lib.train.stages import fine_tune_stage, last_checkpoint
from tests.support.pets import stage_inputs

PLAN = {"kind": "fit_one_cycle", "epochs": 3, "lr": [1e-3, 1e-3, 1e-3]}


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"plan": PLAN, "weights": torch.arange(3.0), "done": 2})
    state = load_checkpoint(path, plan=PLAN)
    assert torch.equal(state["weights"], torch.arange(3.0)) and state["done"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_a_different_plan_is_refused_naming_the_setting(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"plan": PLAN})
    with pytest.raises(CheckpointMismatchError, match="epochs: 3 in the checkpoint, 4 now"):
        load_checkpoint(path, plan={**PLAN, "epochs": 4})


def test_missing_checkpoint_and_code_in_pickles_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt", plan=PLAN)
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "plan": PLAN, "payload": object()}, evil)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_checkpoint(evil, plan=PLAN)


def test_the_replaced_checkpoint_is_kept_as_previous(tmp_path):
    last, previous = tmp_path / "last.pt", tmp_path / "previous.pt"
    save_checkpoint(last, {"plan": PLAN, "done": 1}, keep_previous=previous)
    assert not previous.exists()  # nothing to keep yet
    first = last.read_bytes()
    save_checkpoint(last, {"plan": PLAN, "done": 2}, keep_previous=previous)
    assert previous.read_bytes() == first and load_checkpoint(last, plan=PLAN)["done"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]


# -- a stage whose checkpoint is damaged ------------------------------------------------------------------------------
FREEZE_EPOCHS, EPOCHS = 1, 2


@pytest.fixture(scope="module")
def request_for(tmp_path_factory):
    inputs = stage_inputs(tmp_path_factory.mktemp("pets"))

    def request(stage_dir: Path) -> dict:
        return {
            **inputs, "stage_dir": str(stage_dir), "epochs": EPOCHS, "base_lr": 1e-3, "freeze_epochs": FREEZE_EPOCHS,
            "lr_mult": 100,
        }  # fmt: skip

    return request


@pytest.fixture(scope="module")
def uninterrupted(request_for, tmp_path_factory):
    """A stage trained in one go: its exported weights and its checkpoints folder (last.pt and previous.pt)."""
    stage_dir = tmp_path_factory.mktemp("uninterrupted") / "probe"
    result = fine_tune_stage(request_for(stage_dir))
    return read_export(Path(result["model"])).model.state_dict(), last_checkpoint(stage_dir).parent


def interrupted_stage(uninterrupted, tmp_path: Path) -> tuple[Path, Path]:
    """A stage folder holding the uninterrupted run's checkpoints, as if its process died after writing them."""
    stage_dir = tmp_path / "probe"
    shutil.copytree(uninterrupted[1], stage_dir / "checkpoints")
    return stage_dir, last_checkpoint(stage_dir)


def damage(path: Path, how: str) -> bytes:
    """Damage a checkpoint the way a full disk, a crash of a copy or a stray write would; return what it holds."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:20_000])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(50_000))
    else:  # a readable file that is not a whole checkpoint: the format and plan, without the trainer's progress
        torch.save({"format": 1, "plan": {}}, path)
    return path.read_bytes()


def assert_weights_equal(result: dict, expected: dict) -> None:
    got = read_export(Path(result["model"])).model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def stderr_lines_with(text: str, capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if text in line]


def test_the_uninterrupted_stage_keeps_the_checkpoint_of_the_epoch_before_its_last(uninterrupted):
    folder = uninterrupted[1]
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "previous.pt"]
    epochs = [torch.load(folder / name, weights_only=True)["epochs_run"] for name in ("previous.pt", "last.pt")]
    assert epochs == [FREEZE_EPOCHS + EPOCHS - 1, FREEZE_EPOCHS + EPOCHS]


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "missing keys"])
def test_a_damaged_last_checkpoint_is_moved_aside_and_the_stage_resumes_from_the_previous_one(
    request_for, uninterrupted, tmp_path, capfd, how
):
    stage_dir, last = interrupted_stage(uninterrupted, tmp_path)
    damaged = damage(last, how)
    capfd.readouterr()

    result = fine_tune_stage(request_for(stage_dir))

    moved = last.with_name("last.pt.damaged")
    assert moved.read_bytes() == damaged  # kept for a look, under a name nothing resumes from
    (line,) = stderr_lines_with("is damaged", capfd)
    assert line.startswith(f"probe: {last} is damaged (") and line.endswith(
        f"); moved to {moved.name}; resuming from previous.pt (after epoch {FREEZE_EPOCHS + EPOCHS - 1})."
    )
    assert result["resumed_epochs"] == FREEZE_EPOCHS + EPOCHS - 1  # the last epoch was trained again
    assert_weights_equal(result, uninterrupted[0])
    assert torch.load(last, weights_only=True)["epochs_run"] == FREEZE_EPOCHS + EPOCHS  # a whole one replaces it


def test_a_stage_whose_two_checkpoints_are_damaged_starts_over_and_says_so(request_for, uninterrupted, tmp_path, capfd):
    stage_dir, last = interrupted_stage(uninterrupted, tmp_path)
    previous = last.with_name("previous.pt")
    damage(last, "truncated")
    damage(previous, "garbage")
    capfd.readouterr()

    result = fine_tune_stage(request_for(stage_dir))

    (line,) = stderr_lines_with("is damaged", capfd)
    assert f"{last} is damaged (20000 bytes, torch.load failed with OSError" in line
    assert f"{previous} is damaged (50000 bytes, torch.load failed with UnpicklingError" in line
    assert line.endswith("; training from the start.")
    assert last.with_name("last.pt.damaged").is_file() and last.with_name("previous.pt.damaged").is_file()
    assert result["resumed_epochs"] == 0
    assert_weights_equal(result, uninterrupted[0])


def test_a_stage_left_with_only_its_previous_checkpoint_resumes_from_it(request_for, uninterrupted, tmp_path, capfd):
    # What a crash between save_checkpoint's two renames leaves: last.pt already renamed, the new one not yet in.
    stage_dir, last = interrupted_stage(uninterrupted, tmp_path)
    last.unlink()
    capfd.readouterr()

    result = fine_tune_stage(request_for(stage_dir))

    previous = last.with_name("previous.pt")
    assert stderr_lines_with("resuming from", capfd) == [
        f"probe: resuming from {previous} (after epoch {FREEZE_EPOCHS + EPOCHS - 1})."
    ]
    assert result["resumed_epochs"] == FREEZE_EPOCHS + EPOCHS - 1
    assert_weights_equal(result, uninterrupted[0])


def test_a_second_damaged_checkpoint_does_not_replace_the_first_one_moved_aside(tmp_path):
    first = save_checkpoint(tmp_path / "last.pt", {"plan": PLAN})
    damage(first, "empty")
    assert move_aside(first) == tmp_path / "last.pt.damaged"
    damage(save_checkpoint(first, {"plan": PLAN}), "garbage")
    assert move_aside(first) == tmp_path / "last.pt.damaged-2"
    assert (tmp_path / "last.pt.damaged").read_bytes() == b""
