"""Review decisions: reading a reviewed table, the versioned overrides file, and applying it to a manifest."""

import json

import pandas as pd
import pytest

from lib.common.errors import InputError, MissingInputError
from lib.data.overrides import (
    apply_overrides,
    describe_counts,
    load_overrides,
    read_review,
    record_review,
    review_run_of,
)

RUN = "0123456789abcdef0123456789abcdef"


def reviewed(path, actions):
    """A review table of four images (two cats, two dogs) with the given actions, written to path."""
    rows = [
        ("/a/cat_1.jpg", "cat", "dog", "s-cat1"),
        ("/a/cat_2.jpg", "cat", "cat", "s-cat2"),
        ("/a/dog_1.jpg", "dog", "cat", "s-dog1"),
        ("/a/dog_2.jpg", "dog", "dog", "s-dog2"),
    ]
    table = pd.DataFrame(rows, columns=["file", "label", "predicted", "sha256"])
    table.insert(3, "loss", 1.0)
    table["action"] = actions
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def data_manifest():
    return pd.DataFrame(
        {
            "path": ["/b/cat_1.jpg", "/b/cat_2.jpg", "/b/dog_1.jpg", "/b/dog_2.jpg", "/b/dog_2 copy.jpg"],
            "label": ["cat", "cat", "dog", "dog", "dog"],
            "sha256": ["s-cat1", "s-cat2", "s-dog1", "s-dog2", "s-dog2"],
        }
    )


def test_actions_become_decisions_keyed_by_sha256_and_blanks_are_no_decision(tmp_path):
    review = read_review(reviewed(tmp_path / "review.csv", ["delete", "", " Relabel:cat ", "keep"]))

    assert review.decisions == {
        "s-cat1": {"file": "cat_1.jpg", "was": "cat", "action": "delete"},
        "s-dog1": {"file": "dog_1.jpg", "was": "dog", "action": "relabel", "label": "cat"},
        "s-dog2": {"file": "dog_2.jpg", "was": "dog", "action": "keep"},
    }
    assert (review.deleted, review.relabelled, review.kept) == (1, 1, 2)


def test_an_unknown_action_or_class_is_one_line_naming_the_row(tmp_path):
    with pytest.raises(InputError, match=r"review.csv line 3 \(cat_2.jpg\): unknown action 'remove'; use keep"):
        read_review(reviewed(tmp_path / "review.csv", ["", "remove", "", ""]))
    with pytest.raises(
        InputError, match=r"line 4 \(dog_1.jpg\): 'relabel:emu' names no class of the dataset; .*cat, dog"
    ):
        read_review(reviewed(tmp_path / "review.csv", ["", "", "relabel:emu", ""]))
    with pytest.raises(InputError, match="names no class"):
        read_review(reviewed(tmp_path / "review.csv", ["relabel:", "", "", ""]))
    # a class the caller knows of (the dataset's) is accepted though no row shows it
    assert read_review(reviewed(tmp_path / "review.csv", ["relabel:emu", "", "", ""]), classes=["emu"]).relabelled == 1

    pd.DataFrame({"file": ["x.jpg"], "action": ["delete"]}).to_csv(tmp_path / "bare.csv", index=False)
    with pytest.raises(InputError, match=r"bare.csv lacks the review table's column\(s\) label, sha256"):
        read_review(tmp_path / "bare.csv")
    with pytest.raises(MissingInputError, match="No such review table"):
        read_review(tmp_path / "absent.csv")


def test_two_rows_of_one_image_must_agree(tmp_path):
    path = reviewed(tmp_path / "review.csv", ["delete", "keep", "", ""])
    table = pd.read_csv(path)
    table.loc[1, "sha256"] = "s-cat1"
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"lines 2 and 3 are the same image \(sha256 s-cat1\) with different actions"):
        read_review(path)


def test_applying_again_merges_later_decisions_win_and_the_version_goes_up(tmp_path):
    to = tmp_path / "overrides.json"
    first, _ = record_review(
        reviewed(tmp_path / "r1.csv", ["delete", "relabel:dog", "relabel:cat", ""]), to, review_run=RUN
    )
    assert first.version == 1 and first.review_run == RUN
    on_disk = json.loads(to.read_text())
    assert on_disk["version"] == 1 and set(on_disk["decisions"]) == {"s-cat1", "s-cat2", "s-dog1"}

    # The second review: cat_1 kept after all (undo), cat_2 shown with its new label and kept (the relabel stays),
    # dog_2 deleted; dog_1 left blank keeps its earlier relabel.
    second_csv = reviewed(tmp_path / "r2.csv", ["keep", "keep", "", "delete"])
    table = pd.read_csv(second_csv)
    table.loc[1, "label"] = "dog"
    table.to_csv(second_csv, index=False)
    second, review = record_review(second_csv, to)

    assert second.version == 2 and review.deleted == 1 and review.kept == 3
    decisions = load_overrides(to).decisions
    assert decisions["s-cat1"]["action"] == "keep"
    assert decisions["s-cat2"] == {"file": "cat_2.jpg", "was": "cat", "action": "relabel", "label": "dog"}
    assert decisions["s-dog1"]["label"] == "cat" and decisions["s-dog2"]["action"] == "delete"
    history = load_overrides(to).history
    assert [entry["version"] for entry in history] == [1, 2] and history[0]["review_run"] == RUN
    assert history[1]["source"] == "r2.csv" and history[1]["review_run"] is None  # unknown for the second


def test_the_review_run_is_read_from_where_a_run_wrote_its_table(tmp_path):
    assert review_run_of(tmp_path / RUN / "review" / "review.csv") == RUN
    assert review_run_of(tmp_path / "review" / "review.csv") is None
    assert review_run_of(tmp_path / RUN / "review.csv") is None


def test_apply_removes_and_relabels_by_content_and_leaves_the_original_manifest_alone(tmp_path):
    to = tmp_path / "overrides.json"
    record_review(reviewed(tmp_path / "r.csv", ["relabel:dog", "", "", "delete"]), to)
    manifest = data_manifest()
    before = manifest.copy()

    applied = apply_overrides(manifest, load_overrides(to))

    pd.testing.assert_frame_equal(manifest, before)  # the input is untouched
    # both copies of dog_2 (one sha256) are deleted, whatever their paths here
    assert applied.manifest["path"].tolist() == ["/b/cat_1.jpg", "/b/cat_2.jpg", "/b/dog_1.jpg"]
    assert applied.manifest["label"].tolist() == ["dog", "cat", "dog"]
    assert applied.counts == {"deleted": 2, "relabelled": 1, "kept": 0, "unmatched": 0}
    assert applied.changes.to_dict("records") == [
        {"path": "/b/cat_1.jpg", "sha256": "s-cat1", "action": "relabel", "label": "cat", "new_label": "dog"},
        {"path": "/b/dog_2.jpg", "sha256": "s-dog2", "action": "delete", "label": "dog", "new_label": ""},
        {"path": "/b/dog_2 copy.jpg", "sha256": "s-dog2", "action": "delete", "label": "dog", "new_label": ""},
    ]
    assert describe_counts(applied.counts) == "2 images deleted, 1 relabelled, 0 kept as reviewed"


def test_apply_counts_decisions_for_absent_images_and_refuses_a_class_the_data_lacks(tmp_path):
    to = tmp_path / "overrides.json"
    record_review(reviewed(tmp_path / "r.csv", ["relabel:dog", "", "", ""]), to)
    manifest = data_manifest()
    applied = apply_overrides(manifest[manifest["sha256"] != "s-cat1"], load_overrides(to))
    assert applied.counts["unmatched"] == 1 and applied.counts["relabelled"] == 0

    only_cats = manifest[manifest["label"] == "cat"]
    with pytest.raises(InputError, match=r"overrides.json relabels images to dog, no class of this dataset"):
        apply_overrides(only_cats, load_overrides(to), source=str(to))


def test_a_file_that_is_not_an_overrides_file_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match=r"bad.json is not an overrides file \(not JSON"):
        load_overrides(tmp_path / "bad.json")
    (tmp_path / "v0.json").write_text(json.dumps({"version": 0, "decisions": {}}))
    with pytest.raises(InputError, match="it needs a version >= 1 and decisions"):
        load_overrides(tmp_path / "v0.json")
    (tmp_path / "odd.json").write_text(json.dumps({"version": 1, "decisions": {"abc": {"action": "burn"}}}))
    with pytest.raises(InputError, match="the decision for sha256 abc is none of keep, delete, relabel"):
        load_overrides(tmp_path / "odd.json")
    with pytest.raises(MissingInputError, match="No such overrides file"):
        load_overrides(tmp_path / "absent.json")
