import numpy as np
import pytest
import torch
from torch.export import Dim, export

from lib.data.augment import aug_transforms
from lib.serve.inference import Classifier, export_classifier, read_export
from lib.serve.serving import ServingModel, serving_batch, serving_model
from lib.train.model import create_model
from tests.support.pets import presized_pets

PRESIZE, SIZE = 40, 32


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return presized_pets(tmp_path_factory.mktemp("pets"), breeds=3, images_per_breed=8, presize=PRESIZE)


def test_serving_model_eats_uint8_nhwc_and_equals_the_validation_path():
    net = create_model("resnet18", 3, pretrained=False).eval()
    pictures = torch.randint(0, 256, (2, PRESIZE, PRESIZE, 3), dtype=torch.uint8)
    expected = net(aug_transforms(SIZE)(pictures.permute(0, 3, 1, 2), train=False))
    with torch.inference_mode():
        assert torch.allclose(ServingModel(net, size=SIZE).eval()(pictures), expected, atol=1e-5)


def test_exported_program_keeps_the_batch_dimension_dynamic():
    # mlflow logs the model in pt2 format: torch.export from a 2-image example must still serve 1 or 5 pictures.
    model = ServingModel(create_model("resnet18", 3, pretrained=False), size=SIZE).eval()
    example = torch.randint(0, 256, (2, PRESIZE, PRESIZE, 3), dtype=torch.uint8)
    program = export(model, (example,), dynamic_shapes=({0: Dim.AUTO},)).module()
    for batch in (1, 5):
        pictures = torch.randint(0, 256, (batch, PRESIZE, PRESIZE, 3), dtype=torch.uint8)
        with torch.inference_mode():
            assert torch.allclose(program(pictures), model(pictures), atol=1e-5)


def test_serving_batch_is_the_presized_centre_square_the_classifier_sees(pets, tmp_path):
    manifest, vocab = pets
    net = create_model("resnet18", len(vocab), pretrained=False)
    path = export_classifier(tmp_path / "m.pth", net, arch="resnet18", vocab=vocab, size=SIZE, presize=PRESIZE)
    exported = read_export(path)
    images = manifest["path"].head(3).tolist()
    batch = serving_batch(images, PRESIZE)
    assert batch.dtype == np.uint8 and batch.shape == (3, PRESIZE, PRESIZE, 3)
    # The cache holds the same presized pixels, so the served model scores originals like the validation loader.
    with torch.inference_mode():
        logits = serving_model(exported)(torch.from_numpy(batch))

    probabilities = [p.probability for p in Classifier.load(path, device="cpu").predict(images)]
    assert torch.softmax(logits, dim=1).max(dim=1).values.tolist() == pytest.approx(probabilities, abs=1e-5)
