import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib.evaluate.interpret import (
    Predictions,
    _confusion_figure,
    _loss_figure,
    _top_losses_figure,
    confusion_matrix,
    interpretation_report,
    most_confused,
    plot_confusion_matrix,
    plot_loss_curves,
    plot_losses,
    plot_top_losses,
    top_loss_titles,
    top_losses,
    write_interpretation,
)

# The pairs fastbook ch. 5 reports for interp.most_confused(min_val=5), in fastai's sorted vocabulary order.
BOOK_VOCAB = (
    "Bengal",
    "Birman",
    "Egyptian_Mau",
    "Ragdoll",
    "Siamese",
    "american_bulldog",
    "american_pit_bull_terrier",
    "staffordshire_bull_terrier",
)
BOOK_CONFUSIONS = [
    ("american_pit_bull_terrier", "staffordshire_bull_terrier", 10),
    ("Ragdoll", "Birman", 8),
    ("Siamese", "Birman", 6),
    ("Bengal", "Egyptian_Mau", 5),
    ("american_pit_bull_terrier", "american_bulldog", 5),
]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture
def random_predictions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=generator) * 3
    targets = torch.randint(0, 5, (200,), generator=generator)
    return logits, targets, Predictions.from_logits(logits, targets)


def _book_matrix() -> np.ndarray:
    index = {name: i for i, name in enumerate(BOOK_VOCAB)}
    cm = np.diag(np.full(len(BOOK_VOCAB), 40)).astype(np.int64)
    for actual, predicted, count in BOOK_CONFUSIONS:
        cm[index[actual], index[predicted]] = count
    cm[index["Birman"], index["Ragdoll"]] = 4  # below min_val=5
    cm[index["staffordshire_bull_terrier"], index["american_pit_bull_terrier"]] = 2
    return cm


def _assert_png(path, size=None):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.width > 0 and image.height > 0
        if size is not None:
            assert image.size == size


def test_from_logits_matches_softmax_and_per_item_cross_entropy(random_predictions):
    logits, targets, predictions = random_predictions
    torch.testing.assert_close(predictions.probabilities.sum(dim=1), torch.ones(200))
    torch.testing.assert_close(predictions.probabilities, torch.softmax(logits, dim=1))
    torch.testing.assert_close(predictions.losses, F.cross_entropy(logits, targets, reduction="none"))
    assert predictions.targets.dtype == torch.int64
    assert torch.equal(predictions.predicted, logits.argmax(dim=1))
    wrong = (logits.argmax(dim=1) != targets).sum().item()
    assert predictions.error_rate() == pytest.approx(wrong / 200)
    assert predictions.accuracy() == pytest.approx(1 - wrong / 200)


def test_from_logits_computes_half_precision_logits_in_float32():
    logits = torch.tensor([[10.0, 0.0], [0.0, 3.0]], dtype=torch.float16)
    predictions = Predictions.from_logits(logits, torch.tensor([1, 1]))
    assert predictions.probabilities.dtype == torch.float32 and predictions.losses.dtype == torch.float32
    torch.testing.assert_close(
        predictions.losses, F.cross_entropy(logits.float(), torch.tensor([1, 1]), reduction="none")
    )


def test_predictions_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="targets"):
        Predictions.from_logits(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        Predictions.from_logits(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)).error_rate()


def test_confusion_matrix_hand_built_case():
    # Predicted classes by one-hot logits: actual [0,0,1,1,1,2] -> predicted [0,1,1,1,2,0].
    logits = F.one_hot(torch.tensor([0, 1, 1, 1, 2, 0]), 3).float() * 5
    predictions = Predictions.from_logits(logits, torch.tensor([0, 0, 1, 1, 1, 2]))
    cm = confusion_matrix(predictions, 3)
    assert cm.dtype == np.int64
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 0]]


def test_confusion_matrix_matches_an_independent_count(random_predictions):
    logits, targets, predictions = random_predictions
    expected = np.zeros((5, 5), dtype=np.int64)
    np.add.at(expected, (targets.numpy(), logits.argmax(dim=1).numpy()), 1)
    cm = confusion_matrix(predictions, 5)
    assert np.array_equal(cm, expected) and cm.sum() == 200
    with pytest.raises(ValueError, match="n_classes=4"):
        confusion_matrix(predictions, 4)


def test_most_confused_reproduces_the_book_pairs_in_order():
    assert most_confused(_book_matrix(), BOOK_VOCAB, min_val=5) == BOOK_CONFUSIONS


def test_most_confused_filters_excludes_the_diagonal_and_breaks_ties_row_major():
    cm = np.array([[50, 3, 1], [3, 60, 0], [2, 3, 70]])
    vocab = ["a", "b", "c"]
    assert most_confused(cm, vocab) == [("a", "b", 3), ("b", "a", 3), ("c", "b", 3), ("c", "a", 2), ("a", "c", 1)]
    assert most_confused(cm, vocab, min_val=3) == [("a", "b", 3), ("b", "a", 3), ("c", "b", 3)]
    assert most_confused(cm, vocab, min_val=4) == []
    assert cm[0, 0] == 50  # the caller's matrix keeps its diagonal
    with pytest.raises(ValueError, match="len\\(vocab\\) = 2"):
        most_confused(cm, vocab[:2])
    with pytest.raises(ValueError, match="min_val"):
        most_confused(cm, vocab, min_val=0)


def test_top_losses_match_torch_topk(random_predictions):
    _, _, predictions = random_predictions
    values, indices = top_losses(predictions, 7)
    expected_values, expected_indices = torch.topk(predictions.losses, 7)
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)
    assert torch.equal(predictions.losses[indices], values)
    smallest, smallest_indices = top_losses(predictions, 4, largest=False)
    assert torch.equal(smallest, torch.sort(predictions.losses).values[:4])
    assert torch.equal(predictions.losses[smallest_indices], smallest)
    everything, _ = top_losses(predictions)
    assert torch.equal(everything, torch.sort(predictions.losses, descending=True).values)
    with pytest.raises(ValueError, match="k=201"):
        top_losses(predictions, 201)


def test_top_loss_titles_show_the_predicted_class_probability():
    # Probabilities 0.6 / 0.3 / 0.1; the target is class 1, so the loss is -ln(0.3) and the title shows 0.6, not 0.3.
    logits = torch.tensor([[math.log(6), math.log(3), math.log(1)], [0.0, 0.0, math.log(8)]])
    predictions = Predictions.from_logits(logits, torch.tensor([1, 2]))
    titles = top_loss_titles(predictions, torch.tensor([0, 1]), ["Birman", "Ragdoll", "pug"])
    assert titles == [f"Birman/Ragdoll / {-math.log(0.3):.2f} / 0.60", f"pug/pug / {-math.log(0.8):.2f} / 0.80"]
    assert titles[0] == "Birman/Ragdoll / 1.20 / 0.60"


def test_confusion_figure_labels_ticks_and_text_colours():
    cm = np.array([[9, 1], [2, 3]])
    axis = _confusion_figure(cm, ["cat", "dog"], title="CM").axes[0]
    assert [label.get_text() for label in axis.get_xticklabels()] == ["cat", "dog"]
    assert [label.get_text() for label in axis.get_yticklabels()] == ["cat", "dog"]
    assert all(label.get_rotation() == 90 for label in axis.get_xticklabels())
    assert axis.get_title() == "CM" and axis.get_ylabel() == "Actual" and axis.get_xlabel() == "Predicted"
    cells = {tuple(text.get_position()): text for text in axis.texts}
    # Text at (x=predicted, y=actual); only 9 exceeds max/2 = 4.5.
    assert {position: text.get_text() for position, text in cells.items()} == {
        (0, 0): "9",
        (1, 0): "1",
        (0, 1): "2",
        (1, 1): "3",
    }
    assert cells[(0, 0)].get_color() == "white"
    assert {cells[p].get_color() for p in [(1, 0), (0, 1), (1, 1)]} == {"black"}


def test_confusion_figure_normalize_divides_rows():
    cm = np.array([[6, 2, 0], [1, 1, 2], [0, 0, 0]])
    axis = _confusion_figure(cm, ["a", "b", "c"], normalize=True, norm_dec=3).axes[0]
    shown = np.asarray(axis.images[0].get_array())
    np.testing.assert_allclose(shown[:2].sum(axis=1), [1.0, 1.0])
    np.testing.assert_allclose(shown[0], [0.75, 0.25, 0.0])
    assert np.array_equal(shown[2], [0, 0, 0])  # a class with no items shows zeros, not NaN
    texts = {tuple(text.get_position()): text for text in axis.texts}
    assert texts[(0, 0)].get_text() == "0.750" and texts[(0, 0)].get_color() == "white"
    assert texts[(1, 0)].get_text() == "0.250" and texts[(1, 0)].get_color() == "black"


def test_plot_confusion_matrix_writes_a_png_at_the_book_size(tmp_path):
    path = plot_confusion_matrix(_book_matrix(), BOOK_VOCAB, tmp_path / "plots" / "cm.png")
    _assert_png(path, size=(720, 720))  # figsize=(12, 12) at dpi=60


def test_top_losses_figure_grid_and_titles(tmp_path):
    images = torch.randint(0, 256, (5, 3, 8, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    titles = [f"Birman/Ragdoll{i} / 1.20 / 0.60" for i in range(5)]
    figure = _top_losses_figure(images, titles, suptitle="Prediction/Actual/Loss/Probability")
    assert len(figure.axes) == 6  # int(sqrt(5)) = 2 rows, ceil(5 / 2) = 3 columns
    # prediction/actual on the first line, loss and probability on the second
    assert [axis.get_title() for axis in figure.axes] == [f"Birman/Ragdoll{i}\n1.20 / 0.60" for i in range(5)] + [""]
    assert np.array_equal(figure.axes[2].images[0].get_array(), images[2].permute(1, 2, 0).numpy())
    assert figure.get_suptitle() == "Prediction/Actual/Loss/Probability"
    _assert_png(plot_top_losses(images, titles, tmp_path / "top.png"))
    with pytest.raises(ValueError, match="uint8"):
        plot_top_losses(images.float(), titles, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="4 titles for 5 images"):
        plot_top_losses(images, titles[:4], tmp_path / "bad.png")


def test_loss_figure_places_train_per_batch_and_valid_at_epoch_ends(tmp_path):
    train = [2.0 - 0.05 * i for i in range(30)]
    valid = [(3, 1.9), (10, 1.5), (20, 1.2), (30, 1.0)]
    axis = _loss_figure(train, valid, skip_start=5).axes[0]
    train_line, valid_line = axis.get_lines()
    assert list(train_line.get_xdata()) == list(range(5, 30))
    assert list(train_line.get_ydata()) == train[5:]
    assert list(valid_line.get_xdata()) == [10, 20, 30]  # the point inside the skipped batches is left out
    assert list(valid_line.get_ydata()) == [1.5, 1.2, 1.0]
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["train", "valid"]
    assert axis.get_xlabel() and axis.get_ylabel() == "Loss"
    _assert_png(plot_loss_curves(train, valid, tmp_path / "loss.png"))
    with pytest.raises(ValueError, match="skip_start=5"):
        plot_loss_curves(train[:5], valid, tmp_path / "short.png")


def test_plots_close_their_figures(tmp_path):
    import matplotlib.pyplot as plt

    plot_confusion_matrix(np.eye(2, dtype=np.int64), ["a", "b"], tmp_path / "cm.png")
    plot_loss_curves([1.0] * 10, [(10, 0.5)], tmp_path / "loss.png")
    assert plt.get_fignums() == []


def test_interpretation_report_lists_the_most_confused_pairs():
    report = interpretation_report(_book_matrix(), BOOK_VOCAB, min_val=5)
    lines = report.splitlines()
    total = int(_book_matrix().sum())
    assert lines[0] == f"Validation items: {total}, correct: 320, accuracy: {320 / total:.4f}"
    assert lines[2].split() == ["american_pit_bull_terrier", "->", "staffordshire_bull_terrier", "10"]
    assert len(lines) == 2 + len(BOOK_CONFUSIONS) and "Ragdoll  4" not in report
    assert "No class pair" in interpretation_report(np.eye(2, dtype=np.int64), ["a", "b"], min_val=1)


def test_predictions_saved_and_loaded_are_the_same(random_predictions, tmp_path):
    _, _, predictions = random_predictions
    loaded = Predictions.load(predictions.save(tmp_path / "evaluation" / "predictions.pt"))
    for name in ("probabilities", "targets", "losses"):
        assert torch.equal(getattr(loaded, name), getattr(predictions, name)), name


def test_interpretation_files_show_the_top_losses_images_asks_for(random_predictions, tmp_path):
    _, _, predictions = random_predictions
    vocab = [f"breed{i}" for i in range(5)]
    asked = []

    def images(indices):
        asked.append(list(indices))
        return torch.zeros(len(indices), 3, 8, 8, dtype=torch.uint8)

    paths = write_interpretation(predictions, vocab, images, tmp_path, top_k=4, min_val=3)
    assert asked == [top_losses(predictions, 4)[1].tolist()]
    assert set(paths) == {"confusion_matrix", "most_confused", "top_losses"}
    _assert_png(paths["confusion_matrix"])
    _assert_png(paths["top_losses"])
    cm = confusion_matrix(predictions, 5)
    assert paths["most_confused"].read_text() == interpretation_report(cm, vocab, min_val=3)


def test_plot_losses_keeps_one_point_of_a_run_shorter_than_the_skipped_start(tmp_path):
    _assert_png(plot_losses([2.0, 1.5, 1.2], [(3, 1.1)], tmp_path / "short.png"))  # plot_loss_curves would refuse
    with pytest.raises(ValueError, match="train at least one epoch"):
        plot_losses([], [], tmp_path / "empty.png")
