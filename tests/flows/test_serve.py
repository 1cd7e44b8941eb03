"""`pets serve`: the real `mlflow models serve` on 127.0.0.1 answering encoded images with class names."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app, serve_command
from lib.serve.contract import IMAGE_COLUMN, MAX_REQUEST_IMAGES
from tasks import tracking
from tests.support.registry import register_versions
from tests.support.served import register_classifier, store_uri

pytestmark = pytest.mark.usefixtures("prefect_harness")
PETS = Path(sys.executable).with_name("pets")
NAME = "pets-classifier"


def test_the_server_runs_from_this_interpreters_folder_whether_or_not_the_venv_is_active(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # an unactivated venv: its bin folder is not on PATH
    command, env = serve_command("models:/m/1", host="127.0.0.1", port=5009, workers=2)
    assert command[:6] == [sys.executable, "-m", "mlflow", "models", "serve", "-m"]
    assert command[6:] == ["models:/m/1", "--env-manager", "local", "--host", "127.0.0.1", "--port", "5009"] + [
        "--workers",
        "2",
    ]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # where MLflow finds uvicorn
    assert (Path(env["PATH"].split(os.pathsep)[0]) / "uvicorn").is_file()


def test_an_alias_or_version_the_model_lacks_is_one_line_naming_what_it_has(mlflow_uri, tmp_path):
    register_versions(mlflow_uri, NAME, 2, tmp_path)
    tracking.promote(NAME, "1", reason="first")
    for uri, missing in ((f"models:/{NAME}@champion2", "no alias 'champion2'"), (f"models:/{NAME}/7", "no version")):
        result = CliRunner().invoke(app, ["serve", uri], env={"COLUMNS": "200"})
        assert result.exit_code == 2 and result.output.count("Error:") == 1 and "Traceback" not in result.output
        assert f"The registered model '{NAME}' has {missing}" in result.output
        assert "it has versions 1, 2 (aliases: champion -> v1)" in result.output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, _mlflow_template_db):
    """`pets serve` of the champion, started with the venv's bin folder off PATH; stopped by its session's PID."""
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store_uri(root))
        registered = register_classifier(root, _mlflow_template_db, NAME)
        tracking.promote(NAME, registered.version, reason="the only one")
        port = free_port()
        env = {**os.environ, "PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": registered.uri}
        process = subprocess.Popen(
            [str(PETS), "serve", "--port", str(port)],
            env=env,
            cwd=root,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(url, process)
            yield {"url": url, "registered": registered, "process": process}
        finally:
            os.killpg(process.pid, signal.SIGTERM)  # pets execs mlflow, which runs uvicorn in the same session
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pets serve exited with {process.returncode}:\n{process.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"pets serve did not answer /ping in {timeout} s")


def jpeg(width: int, height: int, seed: int, format: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def post(url: str, images: list[bytes], **params):
    body = {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[base64.b64encode(i).decode()] for i in images]}}
    if params:
        body["params"] = params
    return httpx.post(f"{url}/invocations", json=body, timeout=120)


@pytest.mark.slow  # the server's start (download, uvicorn, torch, the model) takes 20-40 s
def test_the_server_labels_jpegs_and_a_png_of_any_size_like_the_pyfunc_and_reports_a_broken_one(server):
    images = [jpeg(90, 60, 1), jpeg(50, 120, 2), b"GIF89a but broken", jpeg(70, 70, 3, "PNG")]
    response = post(server["url"], images, top_k=2)
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]

    model, _ = tracking.load_served_model(server["registered"].model_uri)
    oracle = model.predict(pd.DataFrame({IMAGE_COLUMN: images}), params={"top_k": 2}).to_dict("records")
    assert [row["label"] for row in rows] == [row["label"] for row in oracle]
    for row, expected in zip(rows, oracle, strict=True):
        if expected["error"]:
            assert row["error"] == expected["error"] and row["label"] is None and row["probability"] is None
            continue
        assert row["error"] is None and row["label"] in server["registered"].vocab
        assert row["probability"] == pytest.approx(expected["probability"], abs=1e-5)
        assert list(row["top_k"]) == list(expected["top_k"]) and len(row["top_k"]) == 2
    assert rows[2]["error"].startswith("UnidentifiedImageError")


@pytest.mark.slow
def test_the_inputs_format_and_every_probability_on_request(server):
    image = jpeg(64, 64, 4)
    body = {"inputs": {IMAGE_COLUMN: [base64.b64encode(image).decode()]}, "params": {"probabilities": True}}
    response = httpx.post(f"{server['url']}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    (row,) = response.json()["predictions"]
    assert row["error"] is None, row
    assert set(row["probabilities"]) == set(server["registered"].vocab)
    assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert row["probabilities"][row["label"]] == pytest.approx(row["probability"])


@pytest.mark.slow
def test_an_empty_or_oversized_request_is_a_4xx_and_the_server_keeps_serving(server):
    empty = post(server["url"], [])
    assert empty.status_code == 400 and "the request holds no image" in empty.json()["message"]
    many = post(server["url"], [b"x"] * (MAX_REQUEST_IMAGES + 1))
    assert many.status_code == 400 and f"more than {MAX_REQUEST_IMAGES}" in many.json()["message"]
    assert post(server["url"], [jpeg(40, 40, 5)]).status_code == 200


def readme_block(marker: str, language: str, server) -> str:
    """The README's code block after `<!-- marker -->`, pointed at the test server's port."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split(f"<!-- {marker} -->")[1].split(f"```{language}\n")[1].split("```")[0]
    return block.replace("5001", server["url"].rsplit(":", 1)[1])


@pytest.mark.slow
def test_the_readmes_curl_prints_the_label(server, tmp_path):
    if subprocess.run(["which", "curl"], capture_output=True).returncode != 0:
        pytest.skip("curl is not installed")
    picture = tmp_path / "my_cat.jpg"
    picture.write_bytes(jpeg(80, 60, 6))
    done = subprocess.run(
        ["bash", "-c", readme_block("serve-curl", "bash", server)], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    model, _ = tracking.load_served_model(server["registered"].model_uri)
    expected = model.predict(pd.DataFrame({IMAGE_COLUMN: [picture.read_bytes()]}))["label"][0]
    assert done.stdout.strip() == expected


@pytest.mark.slow
def test_the_python_client_from_the_readme(server, tmp_path):
    picture = tmp_path / "my_cat.jpg"
    picture.write_bytes(jpeg(80, 60, 7))
    done = subprocess.run(
        [sys.executable, "-c", readme_block("serve-python", "python", server)], cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert rows[0]["label"] in server["registered"].vocab and 0 < rows[0]["probability"] <= 1
