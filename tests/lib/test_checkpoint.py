import pytest
import torch

from lib.train.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint

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
