"""Test-time augmentation: fastai's blend of augmented and plain predictions, in evaluation and for `predict`."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lib.evaluate.evaluation import validation_predictions
from lib.evaluate.tta import augmented_pictures, blend, tta_predictions
from lib.recipe import Recipe
from lib.serve.inference import export_classifier, read_export
from lib.serve.serving import serving_batch, serving_model, tta_probabilities
from lib.train.model import create_model
from tasks.training import evaluate_classifier
from tests.support.pets import presized_pets

PRESIZE, SIZE, BATCH = 40, 32, 8


def exported(root, manifest_vocab, *, blind=False):
    """Export a seeded random resnet18; a `blind` one has a zero last layer (no bias), so its logits are all 0."""
    _, vocab = manifest_vocab
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("resnet18", len(vocab), pretrained=False)
    if blind:
        head = [module for module in model.modules() if isinstance(module, torch.nn.Linear)][-1]
        assert head.bias is None  # fastai's head: the last linear layer follows a BatchNorm1d, without a bias
        with torch.no_grad():
            head.weight.zero_()
    return export_classifier(root / "model.pth", model, arch="resnet18", vocab=vocab, size=SIZE, presize=PRESIZE)


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    manifest_vocab = presized_pets(root, breeds=3, images_per_breed=8, presize=PRESIZE)
    return root, manifest_vocab, exported(root, manifest_vocab)


def tta(pets, **settings):
    _, (manifest, vocab), path = pets
    settings = {"presize": PRESIZE, "size": SIZE, "batch_size": BATCH, "workers": 0, "device": "cpu", **settings}
    return tta_predictions(path, manifest, vocab, **settings)


def plain(pets):
    _, (manifest, vocab), path = pets
    return validation_predictions(path, manifest, vocab, presize=PRESIZE, size=SIZE, batch_size=BATCH, workers=0)


def test_the_blend_is_the_augmented_mean_lerped_toward_the_plain_view_by_beta():
    plain_view = torch.tensor([[1.0, 0.0]])
    augmented = torch.tensor([[[0.0, 1.0]], [[0.5, 0.5]]])  # mean (0.25, 0.75)
    # (1 - 0.25) * (0.25, 0.75) + 0.25 * (1, 0) = (0.4375, 0.5625)
    assert torch.allclose(blend(plain_view, augmented), torch.tensor([[0.4375, 0.5625]]))
    assert torch.equal(blend(plain_view, augmented, beta=1.0), plain_view)
    assert torch.allclose(blend(plain_view, augmented, beta=0.0), torch.tensor([[0.25, 0.75]]))
    assert torch.equal(blend(plain_view, augmented[:0]), plain_view)  # no augmented view
    with pytest.raises(ValueError, match="beta must be in"):
        blend(plain_view, augmented, beta=1.5)


def test_a_blind_model_gives_uniform_probabilities_and_a_loss_of_log_classes(tmp_path, pets):
    _, (manifest, vocab), _ = pets
    path = exported(tmp_path, (manifest, vocab), blind=True)
    predictions = tta_predictions(path, manifest, vocab, presize=PRESIZE, size=SIZE, workers=0, device="cpu", seed=1)
    # every view of every image gives logits 0: probabilities 1/C, whatever the blend, and a loss of log C
    assert torch.allclose(predictions.probabilities, torch.full_like(predictions.probabilities, 1 / len(vocab)))
    assert torch.allclose(predictions.losses, torch.full_like(predictions.losses, np.log(len(vocab))))


def test_the_same_seed_gives_the_same_predictions_and_another_seed_others(pets):
    first, again, other = tta(pets, seed=3), tta(pets, seed=3), tta(pets, seed=4)
    assert torch.equal(first.probabilities, again.probabilities)
    assert not torch.allclose(first.probabilities, other.probabilities)
    assert torch.allclose(first.probabilities.sum(1), torch.ones(len(first.targets)))
    assert torch.equal(first.targets, plain(pets).targets)


def test_no_views_or_beta_one_give_the_plain_predictions_and_beta_weights_the_plain_side(pets):
    reference = plain(pets)
    assert torch.equal(tta(pets, views=0).probabilities, reference.probabilities)
    assert torch.allclose(tta(pets, beta=1.0, seed=5).probabilities, reference.probabilities)
    augmented = tta(pets, views=1, beta=0.0, seed=5, plain=reference).probabilities
    half = tta(pets, views=1, beta=0.5, seed=5, plain=reference).probabilities
    assert not torch.allclose(augmented, reference.probabilities, atol=1e-4)  # the augmented view differs
    assert torch.allclose(half, (augmented + reference.probabilities) / 2, atol=1e-6)


def test_evaluation_reports_the_error_rate_with_and_without_tta(pets, tmp_path):
    root, (manifest, vocab), path = pets
    manifest.to_csv(tmp_path / "presized.csv", index=False)
    (tmp_path / "vocab.json").write_text(json.dumps(list(vocab)))
    recipe = Recipe().updated(
        {"presize": PRESIZE, "size": SIZE, "bs": BATCH, "workers": 0, "device": "cpu", "fp16": False, "seed": 3}
    )
    arguments = (str(path), str(tmp_path / "presized.csv"), str(tmp_path / "vocab.json"), str(tmp_path))
    result = evaluate_classifier.fn(*arguments, recipe)
    expected = tta(pets, seed=3)
    assert result["tta_error_rate"] == pytest.approx(expected.error_rate())
    assert result["tta_accuracy"] == pytest.approx(1 - expected.error_rate())
    assert result["tta_valid_loss"] == pytest.approx(float(expected.losses.double().mean()))
    assert result["error_rate"] == pytest.approx(plain(pets).error_rate())
    without = evaluate_classifier.fn(*arguments, recipe.updated({"tta": False}))
    assert not any(name.startswith("tta_") for name in without) and without["error_rate"] == result["error_rate"]


def test_predict_views_are_seeded_augmented_presize_pictures(pets):
    _, (manifest, _), _ = pets
    image = pd.Series(manifest["path"]).iloc[0]
    views = augmented_pictures(image, PRESIZE, views=4, generator=torch.Generator().manual_seed(0))
    again = augmented_pictures(image, PRESIZE, views=4, generator=torch.Generator().manual_seed(0))
    assert views.dtype == torch.uint8 and views.shape == (4, PRESIZE, PRESIZE, 3)
    assert torch.equal(views, again)
    centre = torch.from_numpy(serving_batch([image], PRESIZE))[0]
    assert all(not torch.equal(view, centre) for view in views)


def test_predict_with_tta_blends_the_served_models_views(pets):
    _, (manifest, _), path = pets
    model = serving_model(read_export(path))
    images = manifest["path"].head(3).tolist()

    def predict(pictures: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(pictures)).numpy()

    probabilities = tta_probabilities(predict, images, PRESIZE, seed=0)
    assert probabilities.shape == (3, model.net(torch.zeros(1, 3, SIZE, SIZE)).shape[1])
    assert np.allclose(probabilities.sum(1), 1, atol=1e-6)
    assert np.array_equal(probabilities, tta_probabilities(predict, images, PRESIZE, seed=0))
    plain_probabilities = torch.from_numpy(predict(serving_batch(images, PRESIZE))).softmax(1).numpy()
    assert np.allclose(tta_probabilities(predict, images, PRESIZE, beta=1.0), plain_probabilities, atol=1e-6)
    assert not np.allclose(probabilities, plain_probabilities, atol=1e-4)
