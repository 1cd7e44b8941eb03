"""The serving contract (lib/serve/contract.py): encoded pictures of any size in, labels and probabilities out."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lib.serve import contract
from lib.serve.contract import IMAGE_COLUMN, MAX_REQUEST_IMAGES, PictureClassifier, RequestError
from lib.serve.serving import ServingModel
from lib.train.model import create_model

PRESIZE, SIZE = 40, 32
VOCAB = ("abyssinian", "beagle", "chihuahua")


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    network = ServingModel(create_model("resnet18", len(VOCAB), pretrained=False), size=SIZE).eval()
    return PictureClassifier(network=network, vocab=VOCAB, presize=PRESIZE)


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def ask(classifier, pictures, **params) -> pd.DataFrame:
    return classifier.predict(pd.DataFrame({IMAGE_COLUMN: list(pictures)}), **params)


def oracle(classifier, image: Image.Image) -> np.ndarray:
    """The network on the validation square cut by hand: short side to the presize (bilinear), centre crop."""
    rgb = image.convert("RGB")
    scale = PRESIZE / min(rgb.size)
    resized = rgb.resize((max(PRESIZE, round(rgb.width * scale)), max(PRESIZE, round(rgb.height * scale))), 2)
    left, top = int(0.5 * (resized.width - PRESIZE)), int(0.5 * (resized.height - PRESIZE))
    square = np.asarray(resized.crop((left, top, left + PRESIZE, top + PRESIZE)))[None]
    with torch.inference_mode():
        return torch.softmax(classifier.network(torch.from_numpy(square.copy())), dim=1)[0].numpy()


def test_pictures_of_any_size_get_the_validation_squares_prediction_with_class_names(classifier):
    sources = [encoded(picture(90, 60, seed=1), "JPEG", quality=95), encoded(picture(40, 120, seed=2))]
    sources.append(encoded(picture(300, 300, seed=3), "WEBP", quality=90))
    answer = ask(classifier, sources)
    assert list(answer.columns) == ["label", "probability", "top_k", "error"]
    for row, data in zip(answer.to_dict("records"), sources, strict=True):
        expected = oracle(classifier, Image.open(io.BytesIO(data)))
        assert row["error"] is None
        assert row["label"] == VOCAB[int(expected.argmax())]
        assert row["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert list(row["top_k"]) == [VOCAB[i] for i in np.argsort(-expected)]  # best first; 3 classes < top 5
        assert sum(row["top_k"].values()) == pytest.approx(1, abs=1e-5)


def test_top_k_and_every_probability_come_on_request(classifier):
    image = encoded(picture(64, 48))
    (row,) = ask(classifier, [image], top_k=2, probabilities=True).to_dict("records")
    assert len(row["top_k"]) == 2 and list(row["top_k"].values()) == sorted(row["top_k"].values(), reverse=True)
    assert list(row["probabilities"]) == list(VOCAB) and sum(row["probabilities"].values()) == pytest.approx(1)
    assert row["probabilities"][row["label"]] == row["probability"]
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(RequestError, match="top_k must be a positive integer"):
            ask(classifier, [image], top_k=bad)


def test_base64_text_is_the_same_picture_as_its_bytes(classifier):
    image = encoded(picture(50, 70))
    as_bytes = ask(classifier, [image], probabilities=True)
    as_text = ask(classifier, [base64.b64encode(image).decode()], probabilities=True)
    assert as_text.to_dict("records") == as_bytes.to_dict("records")
    # MLflow's `inputs` requests arrive as the base64 text's bytes, with the line breaks base64.encodebytes puts in.
    as_text_bytes = ask(classifier, [base64.encodebytes(image)], probabilities=True)
    assert as_text_bytes.to_dict("records") == as_bytes.to_dict("records")


def test_a_broken_picture_gets_its_reason_and_the_others_their_predictions(classifier):
    good = [encoded(picture(60, 60, seed=5)), encoded(picture(80, 50, seed=6))]
    truncated = encoded(picture(80, 80, seed=7), "JPEG")[:200]
    answer = ask(classifier, [good[0], b"not an image at all", truncated, b"", good[1]]).to_dict("records")
    alone = ask(classifier, good).to_dict("records")
    assert [row["label"] for row in answer] == [alone[0]["label"], None, None, None, alone[1]["label"]]
    assert answer[0]["probability"] == pytest.approx(alone[0]["probability"], abs=1e-5)
    assert answer[1]["error"] == "UnidentifiedImageError: cannot identify image file image 1"
    assert answer[2]["error"] == "OSError: Truncated File Read"
    assert answer[3]["error"] == "ValueError: the image is empty (0 bytes)"
    assert all(answer[row][name] is None for row in (1, 2, 3) for name in ("probability", "top_k"))


def test_odd_pictures_are_predicted_as_the_pictures_they_show(classifier):
    upright = picture(30, 60, seed=8)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation 6: the stored pixels are rotated 90 degrees counter-clockwise
    rotated = encoded(upright.transpose(Image.Transpose.ROTATE_90), exif=exif)
    gray16 = Image.fromarray(np.full((40, 50), 257 * 90, dtype=np.uint16))
    cmyk = Image.new("CMYK", (48, 48), (20, 200, 40, 10))
    webp = picture(45, 70, seed=9)
    answer = ask(
        classifier,
        [rotated, encoded(gray16), encoded(cmyk, "JPEG", quality=95), encoded(webp, "WEBP", lossless=True)],
        probabilities=True,
    ).to_dict("records")
    shown = [upright, Image.new("L", (50, 40), 90), Image.open(io.BytesIO(encoded(cmyk, "JPEG", quality=95))), webp]
    for row, image in zip(answer, shown, strict=True):
        assert row["error"] is None
        assert list(row["probabilities"].values()) == pytest.approx(oracle(classifier, image).tolist(), abs=1e-5)


def test_a_one_pixel_picture_is_scaled_up_and_predicted(classifier):
    (row,) = ask(classifier, [encoded(Image.new("RGB", (1, 1), (200, 10, 10)))]).to_dict("records")
    assert row["error"] is None and row["label"] in VOCAB


def test_a_decompression_bomb_is_refused_in_its_row_before_its_pixels_are_decoded(classifier):
    bomb = encoded(Image.new("1", (10_000, 9_000)))  # 90 M pixels, above Pillow's 89.5 M limit, ~11 kB encoded
    (row,) = ask(classifier, [bomb]).to_dict("records")
    assert row["label"] is None and row["error"].startswith("ImageTooLargeError: image 0: 10000x9000")


def test_requests_without_pictures_or_over_the_limits_are_refused_whole(classifier, monkeypatch):
    with pytest.raises(RequestError, match="the request holds no image"):
        ask(classifier, [])
    with pytest.raises(RequestError, match=r"needs an 'image' column .* got \['picture'\]"):
        classifier.predict(pd.DataFrame({"picture": [b"x"]}))
    with pytest.raises(RequestError, match=rf"holds {MAX_REQUEST_IMAGES + 1} images, more than {MAX_REQUEST_IMAGES}"):
        ask(classifier, [b"x"] * (MAX_REQUEST_IMAGES + 1))
    monkeypatch.setattr(contract, "MAX_REQUEST_BYTES", 2**20)
    with pytest.raises(RequestError, match="holds 2 MiB of images, more than 1 MiB"):
        ask(classifier, [bytes(2**20), bytes(2**20)])
