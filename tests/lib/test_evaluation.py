"""An exported model's validation predictions, without a Trainer, equal the Trainer's validation of the same weights."""

from functools import partial

import pytest
import torch

from lib.evaluate.evaluation import validation_images, validation_predictions
from lib.evaluate.interpret import Predictions, write_interpretation
from lib.serve.inference import export_classifier
from tests.support.pets import presized_pets, tiny_trainer

PRESIZE, SIZE, BATCH = 40, 32, 8


def trained_export(root, **settings):
    manifest, vocab = presized_pets(root, breeds=3, images_per_breed=16, presize=PRESIZE)
    trainer = tiny_trainer((manifest, vocab), presize=PRESIZE, size=SIZE, batch_size=BATCH, **settings)
    trainer.fit_one_cycle(1, 1e-2)
    path = export_classifier(
        root / "model.pth", trainer.model, arch="resnet18", vocab=vocab, size=SIZE, presize=PRESIZE
    )
    return trainer, manifest, vocab, path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_export(tmp_path_factory.mktemp("trained"))


def evaluate(trained, **settings):
    _, manifest, vocab, path = trained
    settings = {"presize": PRESIZE, "size": SIZE, "batch_size": BATCH, "workers": 0, "device": "cpu", **settings}
    return validation_predictions(path, manifest, vocab, **settings)


def test_the_exports_predictions_equal_the_trainers_validation_of_the_same_weights(trained):
    trainer, manifest, vocab, _ = trained
    predictions = evaluate(trained)
    loss, accuracy = trainer.validate()
    assert predictions.probabilities.shape == (len(trainer.valid_loader.dataset), len(vocab))
    assert predictions.targets.tolist() == manifest.loc[manifest["split"] == "valid", "target"].tolist()
    assert float(predictions.losses.double().mean()) == pytest.approx(loss, rel=1e-6)
    assert predictions.accuracy() == pytest.approx(accuracy)  # float32 against an exact fraction


def test_evaluating_builds_no_optimizer_and_no_grad_scaler(trained, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("evaluation built an optimizer or a GradScaler")

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse)
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", refuse)
    assert len(evaluate(trained).targets) > 0


def test_an_export_of_another_vocabulary_is_refused(trained):
    _, manifest, vocab, path = trained
    with pytest.raises(ValueError, match="another vocabulary"):
        validation_predictions(path, manifest, tuple(reversed(vocab)), presize=PRESIZE, size=SIZE, workers=0)


def test_validation_images_are_the_items_the_trainer_validates_on(trained):
    trainer, manifest, _, _ = trained
    inputs, _ = next(iter(trainer.valid_loader))
    expected = trainer.augmentation.decode(trainer.augmentation(inputs, train=False))
    images = validation_images(manifest, [0, 2], presize=PRESIZE, size=SIZE)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(images, expected[[0, 2]])


def test_interpretation_of_saved_predictions_describes_the_validation_set(trained, tmp_path):
    _, manifest, vocab, _ = trained
    evaluate(trained).save(tmp_path / "predictions.pt")
    predictions = Predictions.load(tmp_path / "predictions.pt")
    images = partial(validation_images, manifest, presize=PRESIZE, size=SIZE)
    paths = write_interpretation(predictions, vocab, images, tmp_path / "interpretation", top_k=4)
    assert set(paths) == {"confusion_matrix", "most_confused", "top_losses"}
    assert all(path.stat().st_size > 0 for path in paths.values())
    assert f"Validation items: {len(predictions.targets)}" in paths["most_confused"].read_text()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_evaluation_on_cuda_equals_the_trainers_fp16_validation(tmp_path):
    trainer, manifest, vocab, path = trained_export(tmp_path, device="cuda", precision="fp16")
    predictions = validation_predictions(
        path, manifest, vocab, presize=PRESIZE, size=SIZE, batch_size=BATCH, workers=0, device="cuda", precision="fp16"
    )
    loss, accuracy = trainer.validate()
    assert predictions.probabilities.dtype == torch.float32
    assert float(predictions.losses.double().mean()) == pytest.approx(loss, rel=1e-4)
    assert predictions.accuracy() == pytest.approx(accuracy)  # float32 against an exact fraction
