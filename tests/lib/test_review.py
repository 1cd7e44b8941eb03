"""The review table: per-class order, losses in closed form, fastai's probability, the CSV and contact sheets."""

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.evaluate.review import COLUMNS, review_table, write_review
from tests.support.images import write_image

VOCAB = ("cat", "dog", "owl")


def manifest(rows):
    """rows: (name, label, split); sha256 is the name's stand-in."""
    return pd.DataFrame(
        [
            {"path": f"/data/{name}.jpg", "label": label, "split": split, "sha256": f"sha-{name}"}
            for name, label, split in rows
        ]
    )


ROWS = [
    ("d1", "dog", "train"),
    ("c1", "cat", "valid"),
    ("c2", "cat", "train"),
    ("o1", "owl", "train"),
    ("d2", "dog", "valid"),
]
PROBABILITIES = np.array(
    [
        [0.7, 0.2, 0.1],  # d1: a dog the model calls a cat
        [0.9, 0.05, 0.05],  # c1: a confident cat
        [0.1, 0.6, 0.3],  # c2: a cat called a dog
        [0.2, 0.2, 0.6],  # o1
        [0.1, 0.8, 0.1],  # d2
    ]
)


def test_rows_come_per_class_in_vocab_order_worst_loss_first_with_the_loss_in_closed_form():
    table = review_table(manifest(ROWS), PROBABILITIES, VOCAB)

    assert list(table.columns) == [*COLUMNS, "action"]
    assert table["file"].tolist() == ["/data/c2.jpg", "/data/c1.jpg", "/data/d1.jpg", "/data/d2.jpg", "/data/o1.jpg"]
    # cross-entropy of the given label is -log p(label), whatever the model predicted
    assert table["loss"].tolist() == pytest.approx(
        [-math.log(0.1), -math.log(0.9), -math.log(0.2), -math.log(0.8), -math.log(0.6)]
    )
    # fastai plot_top_losses shows the predicted class's probability (r.max()), not the label's
    assert table["predicted"].tolist() == ["dog", "cat", "cat", "dog", "owl"]
    assert table["probability"].tolist() == pytest.approx([0.6, 0.9, 0.7, 0.8, 0.6])
    assert table["split"].tolist() == ["train", "valid", "train", "valid", "train"]
    assert table["sha256"].tolist() == ["sha-c2", "sha-c1", "sha-d1", "sha-d2", "sha-o1"]
    assert (table["action"] == "").all()


def test_a_label_quality_ranks_lowest_first_and_adds_its_columns_before_the_action():
    quality = np.array([0.9, 0.1, 0.5, 0.3, 0.2])  # per manifest row
    issue = np.array([False, True, False, False, True])
    table = review_table(manifest(ROWS), PROBABILITIES, VOCAB, label_quality=quality, is_issue=issue)

    assert list(table.columns) == [*COLUMNS, "label_quality", "issue", "action"]
    assert table["file"].tolist() == ["/data/c1.jpg", "/data/c2.jpg", "/data/d2.jpg", "/data/d1.jpg", "/data/o1.jpg"]
    assert table["label_quality"].tolist() == [0.1, 0.5, 0.2, 0.9, 0.3]
    assert table["issue"].tolist() == [True, False, True, False, False]


def test_an_underflowed_probability_gives_a_finite_loss_and_shapes_are_checked():
    probabilities = np.array([[1.0, 0.0, 0.0]])
    table = review_table(manifest([("d1", "dog", "train")]), probabilities, VOCAB)
    assert np.isfinite(table["loss"]).all() and table["loss"].iloc[0] > 700  # -log of the smallest normal float64

    with pytest.raises(ValueError, match=r"Expected probabilities of shape \(5, 3\)"):
        review_table(manifest(ROWS), PROBABILITIES[:4], VOCAB)
    with pytest.raises(ValueError, match=r"Labels \['emu'\] are not in the model's vocabulary"):
        review_table(manifest([("e1", "emu", "train")]), PROBABILITIES[:1], VOCAB)


def test_write_review_writes_the_csv_and_one_titled_sheet_per_class_of_its_top_rows(tmp_path):
    rows = [(f"{label}{k}", label, "train") for label in ("cat", "dog") for k in range(5)]
    table_in = manifest(rows)
    table_in["path"] = [
        str(write_image(tmp_path / "images" / f"{name}.jpg", (60 + k, 40))) for k, (name, _, _) in enumerate(rows)
    ]
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=len(rows))
    table = review_table(table_in, probabilities, VOCAB)

    written = write_review(table, tmp_path / "review", per_class=3)

    assert written["table"] == tmp_path / "review" / "review.csv"
    read = pd.read_csv(written["table"], keep_default_na=False)
    assert read["file"].tolist() == table["file"].tolist() and read["loss"].tolist() == pytest.approx(
        table["loss"].tolist()
    )
    assert set(written["sheets"]) == {"cat", "dog"}  # the owl has no images: no sheet
    assert [path.name for path in written["sheets"].values()] == ["review_000_cat.png", "review_001_dog.png"]
    for path in written["sheets"].values():
        with Image.open(path) as sheet:
            assert sheet.size[0] > 300 and sheet.size[1] > 200

    # a second review into the same folder leaves no sheet of the first behind
    again = write_review(table[table["label"] == "dog"], tmp_path / "review", per_class=3)
    assert sorted(p.name for p in (tmp_path / "review").glob("*.png")) == ["review_000_dog.png"]
    assert list(again["sheets"]) == ["dog"]


def test_the_sheet_titles_follow_fastai_plot_top_losses():
    from lib.evaluate.review import _titles

    table = review_table(manifest(ROWS), PROBABILITIES, VOCAB)
    assert _titles(table.head(1)) == [f"dog/cat / {-math.log(0.1):.2f} / 0.60"]
