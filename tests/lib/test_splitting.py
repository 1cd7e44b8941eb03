import pandas as pd
import pytest
import torch

from lib.data.splitting import random_split, split_manifest


def test_pets_split_sizes_match_the_book():
    train, valid = random_split(7390, valid_pct=0.2, seed=42)
    # fastbook ch. 5 summary: "2 datasets of sizes 5912,1478"
    assert (len(train), len(valid)) == (5912, 1478)
    assert sorted(train + valid) == list(range(7390))


def test_split_equals_fastai_randomsplitter_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    train, valid = random_split(1000, valid_pct=0.2, seed=42)
    assert torch.equal(torch.get_rng_state(), before)

    # Oracle: fastai's RandomSplitter calls torch.manual_seed(seed) then torch.randperm(n); valid = perm[:cut]
    torch.manual_seed(42)
    permutation = torch.randperm(1000).tolist()
    torch.set_rng_state(before)
    assert valid == permutation[:200]
    assert train == permutation[200:]


def test_split_is_deterministic_per_seed():
    assert random_split(50, seed=1) == random_split(50, seed=1)
    assert random_split(50, seed=1) != random_split(50, seed=2)
    assert random_split(50, seed=None) != random_split(50, seed=None)


@pytest.mark.parametrize("valid_pct", [0, 1, -0.1, 1.5])
def test_valid_pct_outside_open_interval_is_rejected(valid_pct):
    with pytest.raises(ValueError, match="valid_pct"):
        random_split(10, valid_pct=valid_pct)


def test_too_few_items_is_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        random_split(1)


def _manifest(labels):
    return pd.DataFrame({"path": [f"/x/{i}.jpg" for i in range(len(labels))], "label": labels})


def test_vocab_comes_from_training_split_in_python_string_order():
    labels = ["pug", "Bengal", "beagle", "Abyssinian"] * 10
    split = split_manifest(_manifest(labels), valid_pct=0.2, seed=42)

    assert split.vocab == ("Abyssinian", "Bengal", "beagle", "pug")  # upper-case cat breeds first
    assert split.sizes() == {"train": 32, "valid": 8}
    assert (split.manifest["target"] == split.manifest["label"].map(split.vocab.index)).all()
    assert list(split.manifest["path"]) == list(_manifest(labels)["path"])  # input order kept


def test_label_only_in_validation_is_reported_and_left_out():
    labels = ["pug"] * 30 + ["rare"]
    n = len(labels)
    _, valid = random_split(n, valid_pct=0.2, seed=0)
    # Put the single "rare" item where the seeded permutation sends it to validation.
    labels = ["pug"] * n
    labels[valid[0]] = "rare"

    split = split_manifest(_manifest(labels), valid_pct=0.2, seed=0)

    assert split.vocab == ("pug",)
    assert list(split.valid_only["label"]) == ["rare"]
    assert "rare" not in set(split.manifest["label"])
    assert split.sizes() == {"train": n - len(valid), "valid": len(valid) - 1}
