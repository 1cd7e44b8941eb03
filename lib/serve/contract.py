"""The serving contract: encoded images of any size in, per image the top class, its probability and the top k out.

A request is a table with one `image` column of encoded pictures (JPEG, PNG, WebP, anything Pillow reads), as bytes
or as base64 text (what MLflow's `dataframe_split` and `inputs` JSON carry for a binary column). Each picture is
decoded and prepared exactly as validation prepares it: upright RGB (EXIF orientation, every Pillow mode, lib/data/
images.py), short side scaled to the run's presize, centre square (lib/data/pictures.py). The network then does the
resize to the training size and the normalisation (lib/serve/serving.py, inside the exported program), so the
served probabilities are the validation probabilities, and the contract does not change with the presize.

The answer has one row per picture: `label`, `probability`, `top_k` ({class: probability}, best first, as
TorchServe's image classifier answers), `error` (why this picture could not be read; the other rows still come
back) and, on request, `probabilities` over every class. A request with no picture, or with more than the limits
below, is refused as a whole with `RequestError`.

This file travels inside the registered model with the two modules it imports from the project, so the model loads
where the project is not installed: keep its project imports to those.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from lib.data.images import open_rgb
from lib.data.pictures import validation_picture

IMAGE_COLUMN = "image"
# TorchServe's image classifier answers the top 5 classes (pytorch/serve ts/torch_handler/image_classifier.py, topk=5).
DEFAULT_TOP_K = 5
# One request is one batch through the network: these keep a request's memory bounded (a batch of 256 presize-460
# pictures is 162 MB of uint8); more pictures go in more requests, or through `pets predict-images`.
MAX_REQUEST_IMAGES = 256
MAX_REQUEST_BYTES = 64 * 2**20
RESULT_COLUMNS = ("label", "probability", "top_k", "error")
# What decoding a picture can raise: Pillow's "not an image", broken or truncated data, a decompression bomb.
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError)


class RequestError(ValueError):
    """The request as a whole cannot be served: no picture, too many, too large, or no `image` column."""


Network = Callable[[torch.Tensor], torch.Tensor]  # uint8 N x presize x presize x 3 -> N x classes logits


@dataclass(frozen=True)
class PictureClassifier:
    """Label encoded pictures with a network that takes uint8 presize squares (NHWC) and returns logits."""

    network: Network
    vocab: tuple[str, ...]
    presize: int

    def predict(self, request: pd.DataFrame, *, top_k: int = DEFAULT_TOP_K, probabilities: bool = False):
        """Return one row per picture of the request (see the module's docstring for the columns)."""
        encoded = request_pictures(request)
        top_k = checked_top_k(top_k, len(self.vocab))
        pictures, errors = {}, {}
        for row, data in enumerate(encoded):
            try:
                pictures[row] = decode_picture(data, self.presize, name=f"image {row}")
            except UNREADABLE as error:
                errors[row] = unreadable_reason(error)
        scores = self.probabilities(list(pictures.values())) if pictures else torch.empty(0, len(self.vocab))
        by_row = dict(zip(pictures, scores, strict=True))
        return answer_table(
            [by_row.get(row) for row in range(len(encoded))],
            [errors.get(row) for row in range(len(encoded))],
            self.vocab,
            top_k=top_k,
            probabilities=probabilities,
        )

    @torch.inference_mode()
    def probabilities(self, pictures: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return the N x classes softmax of uint8 3 x presize x presize pictures."""
        batch = torch.stack(list(pictures)).permute(0, 2, 3, 1).contiguous()
        return torch.softmax(self.network(batch).float(), dim=1)


def request_pictures(request: pd.DataFrame) -> list:
    """Return the request's encoded pictures, or raise RequestError naming what is wrong and the fix."""
    if not isinstance(request, pd.DataFrame) or IMAGE_COLUMN not in request.columns:
        columns = list(request.columns) if isinstance(request, pd.DataFrame) else type(request).__name__
        raise RequestError(
            f"a request needs an {IMAGE_COLUMN!r} column of encoded images (bytes or base64 text), got {columns}"
        )
    encoded = request[IMAGE_COLUMN].tolist()
    if not encoded:
        raise RequestError(f"the request holds no image: send at least one in the {IMAGE_COLUMN!r} column")
    if len(encoded) > MAX_REQUEST_IMAGES:
        raise RequestError(
            f"the request holds {len(encoded)} images, more than {MAX_REQUEST_IMAGES}: send them in smaller "
            "requests, or label a folder with `pets predict-images`"
        )
    size = sum(len(data) for data in encoded if isinstance(data, bytes | bytearray | str))
    if size > MAX_REQUEST_BYTES:
        raise RequestError(
            f"the request holds {size / 2**20:.0f} MiB of images, more than {MAX_REQUEST_BYTES // 2**20} MiB: "
            "send them in smaller requests"
        )
    return encoded


def checked_top_k(top_k: int, classes: int) -> int:
    """Return top_k capped at the number of classes, or raise RequestError when it is not a positive integer."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise RequestError(f"top_k must be a positive integer (default {DEFAULT_TOP_K}), got {top_k!r}")
    return min(top_k, classes)


def decode_picture(data: bytes | bytearray | memoryview | str, presize: int, *, name: str) -> torch.Tensor:
    """Decode one encoded picture (bytes, or base64 text) into the validation square, uint8 3 x presize x presize."""
    return validation_picture(open_picture(data, name=name), presize)


def open_picture(data: bytes | bytearray | memoryview | str, *, name: str) -> Image.Image:
    """Open one encoded picture (bytes, or base64 text) upright in RGB, named `name` in the errors it raises."""
    if not isinstance(data, str | bytes | bytearray | memoryview):
        raise ValueError(f"expected encoded image bytes or base64 text, got {type(data).__name__}")
    if isinstance(data, str):
        try:
            data = base64.b64decode(data)
        except binascii.Error as error:
            raise ValueError(f"the image text is not base64 ({error})") from error
    elif _BASE64_TEXT.fullmatch(bytes(data)):
        # MLflow 3.17 decodes a binary column's base64 for `dataframe_split` requests, but hands `inputs` requests
        # over as the text's bytes (mlflow/utils/proto_json_utils.py, convert_data_type). An encoded picture always
        # holds bytes outside the base64 alphabet (JPEG, PNG and WebP headers do), so text-only bytes are base64.
        with contextlib.suppress(binascii.Error):  # not base64 after all: Pillow says what it is not
            data = base64.b64decode(data)
    if not data:
        raise ValueError("the image is empty (0 bytes)")
    stream = io.BytesIO(data)
    stream.name = name  # names the picture in Pillow's and open_rgb's messages
    return open_rgb(stream)


def unreadable_reason(error: BaseException) -> str:
    """Say in one line why a picture could not be read."""
    return f"{type(error).__name__}: {error}"


def answer_table(
    scores: Sequence[torch.Tensor | None],
    errors: Sequence[str | None],
    vocab: Sequence[str],
    *,
    top_k: int = DEFAULT_TOP_K,
    probabilities: bool = False,
) -> pd.DataFrame:
    """Return the answer rows: label, probability, top_k and error per picture; every probability on request.

    `scores` holds each picture's probabilities over `vocab`, or None where `errors` says why it has none. The
    columns hold Python objects, so a row without a prediction serialises as JSON null (not NaN).
    """
    columns: dict[str, list] = {name: [] for name in RESULT_COLUMNS}
    if probabilities:
        columns["probabilities"] = []
    for score, error in zip(scores, errors, strict=True):
        if score is None:
            for name in columns:
                columns[name].append(error if name == "error" else None)
            continue
        values, indices = torch.topk(score, top_k)
        best = {vocab[index]: float(value) for value, index in zip(values.tolist(), indices.tolist(), strict=True)}
        columns["label"].append(next(iter(best)))
        columns["probability"].append(next(iter(best.values())))
        columns["top_k"].append(best)
        columns["error"].append(None)
        if probabilities:
            columns["probabilities"].append(dict(zip(vocab, map(float, score.tolist()), strict=True)))
    return pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()})
