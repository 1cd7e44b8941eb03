"""Batch prediction (lib/serve/batch.py, lib/serve/inputs.py) against the served contract on the same network."""

import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lib.common.errors import MissingInputError
from lib.data.synthetic import pack_tgz
from lib.serve.batch import BatchPredictor, predictions_table, read_predictions
from lib.serve.contract import PictureClassifier
from lib.serve.inputs import PredictInputError, collect_inputs, input_digest, input_kind
from lib.serve.serving import ServingModel, tta_probabilities
from lib.train.model import create_model
from tests.support.http_server import serve_directory
from tests.support.images import write_image

VOCAB = ("cat", "dog", "fox")
SIZE, PRESIZE = 32, 40


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("resnet18", len(VOCAB), pretrained=False).eval()


def png_header_only(path, width: int, height: int):
    """A PNG whose header claims width x height pixels (a decompression bomb: Pillow refuses it from the header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")))
    return path


def bad_inputs(folder):
    """Every odd file of the brief, by the outcome expected: predicted, or reported in its row."""
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "plain.jpg", (60, 48))
    Image.new("RGB", (1, 1), (9, 200, 9)).save(folder / "one_pixel.png")
    Image.new("CMYK", (50, 40), (10, 200, 30, 5)).save(folder / "cmyk.jpg", "JPEG")
    Image.new("I;16", (50, 50), 40_000).save(folder / "sixteen_bit.png", "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.fromarray(np.tile(np.arange(60, dtype=np.uint8), (30, 1))).convert("RGB").save(
        folder / "rotated.jpg", "JPEG", exif=exif
    )
    (folder / "not_an_image.jpg").write_text("hello, I am text")
    whole = (folder / "plain.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    png_header_only(folder / "bomb.png", 30_000, 30_000)
    predicted = ["cmyk.jpg", "one_pixel.png", "plain.jpg", "rotated.jpg", "sixteen_bit.png"]
    reported = ["bomb.png", "not_an_image.jpg", "truncated.jpg"]
    return predicted, reported


def oracle(net, paths) -> pd.DataFrame:
    """The served contract (what the registered pyfunc runs) on the files' bytes, every probability returned."""
    classifier = PictureClassifier(network=ServingModel(net, size=SIZE).eval(), vocab=VOCAB, presize=PRESIZE)
    request = pd.DataFrame({"image": [path.read_bytes() for path in paths]})
    return classifier.predict(request, top_k=2, probabilities=True)


def test_every_bad_input_is_predicted_as_the_contract_does_or_reported_with_its_reason(net, tmp_path):
    predicted, reported = bad_inputs(tmp_path / "images")
    inputs = collect_inputs(str(tmp_path / "images"), tmp_path / "cache")
    assert inputs["file"].tolist() == sorted(predicted + reported)

    predictor = BatchPredictor(net, size=SIZE, presize=PRESIZE, device="cpu", precision="fp16")  # fp32 on the CPU
    found = predictor.predict(inputs["path"].tolist(), batch_size=3, workers=0, show_progress=False)
    table = predictions_table(inputs["file"], found, VOCAB, top_k=2, probabilities=True)
    table.to_csv(tmp_path / "predictions.csv", index=False)
    rows = read_predictions(tmp_path / "predictions.csv").set_index("file")
    expected = oracle(net, [tmp_path / "images" / name for name in inputs["file"]])
    expected.index = inputs["file"]

    assert found.precision == "fp32" and found.unreadable == len(reported)
    assert sorted(rows.index[rows["error"].notna()]) == reported
    for name in reported:
        assert expected.loc[name, "error"] is not None and rows.loc[name, "label"] is None
    assert "cannot identify image file" in rows.loc["not_an_image.jpg", "error"]
    assert "truncated" in rows.loc["truncated.jpg", "error"].lower()
    assert "decompression bomb" in rows.loc["bomb.png", "error"]
    for name in predicted:
        want, got = expected.loc[name], rows.loc[name]
        assert got["label"] == want["label"] and got["probability"] == pytest.approx(want["probability"], abs=1e-5)
        assert list(got["top_k"]) == list(want["top_k"]) and len(got["top_k"]) == 2
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        assert sum(got["probabilities"].values()) == pytest.approx(1, abs=1e-5)


def test_tta_blends_the_views_tta_probabilities_draws_in_the_same_order(net, tmp_path):
    paths = [write_image(tmp_path / f"{index}.jpg", (40 + 9 * index, 44), (30 * index, 90, 200)) for index in range(5)]
    (tmp_path / "broken.jpg").write_text("no picture")  # an unreadable file in between draws no views
    files = [str(paths[0]), str(tmp_path / "broken.jpg"), *map(str, paths[1:])]
    predictor = BatchPredictor(net, size=SIZE, presize=PRESIZE, device="cpu", precision="fp32")

    found = predictor.predict(files, batch_size=2, workers=0, tta=True, show_progress=False)

    serving = ServingModel(net, size=SIZE).eval()

    def logits(pictures: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return serving(torch.from_numpy(pictures)).numpy()

    expected = tta_probabilities(logits, paths, PRESIZE)
    assert found.scores[1] is None and "cannot identify" in found.errors[1]
    got = torch.stack([score for score in found.scores if score is not None]).numpy()
    assert np.allclose(got, expected, atol=1e-5)
    plain = predictor.predict(files, batch_size=2, workers=0, show_progress=False)
    assert not np.allclose(got, torch.stack([s for s in plain.scores if s is not None]).numpy(), atol=1e-3)


def test_inputs_from_an_archive_a_csv_of_paths_and_urls_and_their_digest(tmp_path):
    images = tmp_path / "served" / "pets"
    for index in range(3):
        write_image(images / "sub" / f"pic_{index}.jpg", (50, 40), (60 * index, 20, 20))
    (images / "notes.txt").write_text("not listed: not an image extension")
    archive = pack_tgz(images, tmp_path / "served" / "pets.tgz", top_level="pets")
    csv = tmp_path / "list.csv"
    with serve_directory(tmp_path / "served") as server:
        urls = [server.url("pets/sub/pic_0.jpg"), server.url("pets/missing.jpg")]
        pd.DataFrame({"url": ["sub/pic_1.jpg", str(images / "sub" / "pic_2.jpg"), *urls, ""]}).to_csv(csv, index=False)
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "pic_1.jpg").write_bytes((images / "sub" / "pic_1.jpg").read_bytes())
        from_csv = collect_inputs(str(csv), tmp_path / "cache")
        from_archive = collect_inputs(server.url("pets.tgz"), tmp_path / "cache")
    assert archive.is_file()

    assert from_archive["file"].tolist() == [f"sub/pic_{index}.jpg" for index in range(3)]
    assert (from_archive["error"] == "").all()
    assert from_csv["file"].tolist()[:3] == ["sub/pic_1.jpg", str(images / "sub" / "pic_2.jpg"), urls[0]]
    assert from_csv["sha256"].tolist()[:3] == from_archive["sha256"].iloc[[1, 2, 0]].tolist()
    assert "404" in from_csv.loc[3, "error"] and from_csv.loc[3, "path"] == ""
    assert "empty" in from_csv.loc[4, "error"]

    digest = input_digest(from_archive)
    assert input_digest(collect_inputs(str(images), tmp_path / "cache")) == digest  # same names, same bytes
    (images / "sub" / "pic_2.jpg").write_bytes(b"changed")
    assert input_digest(collect_inputs(str(images), tmp_path / "cache")) != digest


def test_an_input_that_is_no_folder_csv_or_archive_is_refused_naming_it(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(PredictInputError, match="neither a folder, a CSV"):
        input_kind(str(tmp_path / "photo.jpg"))
    with pytest.raises(MissingInputError, match="does not exist"):
        input_kind(str(tmp_path / "nowhere"))
    pd.DataFrame({"name": ["a.jpg"]}).to_csv(tmp_path / "list.csv", index=False)
    with pytest.raises(PredictInputError, match=r"no path or url column \(its columns: name\)"):
        collect_inputs(str(tmp_path / "list.csv"), tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictInputError, match="holds no image"):
        collect_inputs(str(tmp_path / "empty"), tmp_path / "cache")
    assert input_kind(str(tmp_path / "empty")) == "folder"
