import pytest
import torch
from PIL import Image

from lib.evaluate.evaluation import validation_predictions
from lib.serve.inference import Classifier, export_classifier
from tests.support.pets import presized_pets, tiny_trainer

PRESIZE, SIZE = 40, 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    manifest, vocab = presized_pets(tmp_path_factory.mktemp("pets"), breeds=3, images_per_breed=16, presize=PRESIZE)
    trainer = tiny_trainer((manifest, vocab), presize=PRESIZE, size=SIZE, batch_size=8)
    trainer.fit_one_cycle(1, 1e-2)
    return trainer, manifest


def test_exported_classifier_predicts_what_the_validation_pass_predicted(trained, tmp_path):
    trainer, manifest = trained
    path = export_classifier(
        tmp_path / "model.pt", trainer.model, arch="resnet18", vocab=trainer.vocab, size=SIZE, presize=PRESIZE
    )
    classifier = Classifier.load(path, device="cpu")
    valid = manifest[manifest["split"] == "valid"]
    # The presized files are already at the presize, so preparing them is a no-op resize plus the centre crop.
    results = classifier.predict(valid["presized_path"].tolist())
    expected = validation_predictions(
        path, manifest, trainer.vocab, presize=PRESIZE, size=SIZE, batch_size=8, workers=0, device="cpu"
    ).probabilities

    assert [r.label for r in results] == [trainer.vocab[i] for i in expected.argmax(dim=1).tolist()]
    got = torch.tensor([[r.probabilities[name] for name in trainer.vocab] for r in results])
    assert torch.allclose(got, expected, atol=1e-5)
    assert all(r.probability == max(r.probabilities.values()) for r in results)


def test_predict_accepts_pil_images_of_any_mode_and_size(trained, tmp_path):
    trainer, _ = trained
    path = export_classifier(
        tmp_path / "model.pt", trainer.model, arch="resnet18", vocab=trainer.vocab, size=SIZE, presize=PRESIZE
    )
    classifier = Classifier.load(path, device="cpu")
    results = classifier.predict([Image.new("L", (90, 50), 128), Image.new("RGBA", (30, 60), (9, 9, 9, 0))])
    assert len(results) == 2 and all(sum(r.probabilities.values()) == pytest.approx(1.0) for r in results)
    assert classifier.predict([]) == []


def test_loading_something_that_is_not_an_export_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not an exported classifier"):
        Classifier.load(path)
