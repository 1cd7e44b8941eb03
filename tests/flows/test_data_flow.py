"""The data flow end to end under a real (temporary) Prefect API, over real HTTP on 127.0.0.1."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.data import prepare_data
from lib.data.synthetic import BROKEN_FILES, ODD_MODES, make_pets_dataset
from lib.recipe import Recipe
from tests.support.http_server import serve_directory
from tests.support.pets import pets_archive

BREEDS, PER_BREED, PRESIZE = 4, 10, 64


def data_recipe(**options) -> Recipe:
    """The default recipe at PRESIZE, with more settings by option name."""
    return Recipe().updated({"presize": PRESIZE, **options})


pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    return pets_archive(root, breeds=BREEDS, images_per_breed=PER_BREED, max_side=160, broken=True, odd_modes=True)


def test_prepare_data_over_http_then_a_warm_rerun_reuses_every_cache(archive, tmp_path):
    found = BREEDS * PER_BREED + len(BROKEN_FILES) + len(ODD_MODES)
    kept = found - len(BROKEN_FILES)
    with serve_directory(archive.parent) as server:
        common = {
            "data_url": server.url(archive.name),
            "presize": PRESIZE,
            "cache_dir": str(tmp_path / "cache"),
        }
        first = prepare_data(data_recipe(**common, out_dir=str(tmp_path / "run1")))
        requests_after_first = server.requests
        second = prepare_data(data_recipe(**common, out_dir=str(tmp_path / "run2")))

    assert requests_after_first == 1
    assert server.requests == requests_after_first  # the warm run did no network I/O
    report = json.loads((tmp_path / "run1" / "cleaning_report.json").read_text())
    assert report["counts"]["kept"] == kept and report["counts"]["excluded"] == len(BROKEN_FILES)
    for reason in set(BROKEN_FILES.values()):
        assert report["counts"][reason] == list(BROKEN_FILES.values()).count(reason)
    assert first["sizes"] == {"train": kept - int(0.2 * kept), "valid": int(0.2 * kept)}
    presized = pd.read_csv(first["manifest"])
    # Cleaning presizes each image while it has it decoded, so the presize stage finds them all cached, and the warm
    # run decodes only the broken files again (all but the empty one): no original is decoded twice.
    assert first["cache_hits"] == second["cache_hits"] == len(presized)
    assert first["decoded"] == found - 1 and second["decoded"] == len(BROKEN_FILES) - 1
    text = (tmp_path / "run1" / "summary.txt").read_text()
    assert f"Found {found} items" in text and f"2 datasets of sizes {first['sizes']['train']}," in text
    with Image.open(first["show_batch"]) as grid:
        assert grid.size[0] > 0
    assert second["manifest"] != first["manifest"] and pd.read_csv(second["manifest"]).equals(presized)


def test_unmatched_file_names_fail_the_flow_with_the_fix(tmp_path):
    images = make_pets_dataset(tmp_path / "pets", breeds=2, images_per_breed=3, max_side=120)
    (images / "IMG_0001.jpeg").write_bytes((images / "Abyssinian_1.jpg").read_bytes())

    recipe = data_recipe(data_dir=str(images), out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "c"))
    state = prepare_data(recipe, return_state=True)

    assert state.is_failed()
    with pytest.raises(ValueError, match=r"1 of 7 images \(14%\) got no label, more than --max-unlabelled 0.05"):
        state.result()


def test_download_task_retries_a_cut_off_transfer_and_resumes(archive, tmp_path):
    from tasks.data import download_dataset

    with serve_directory(archive.parent) as server:
        server.cut_after = archive.stat().st_size // 2
        images_dir = download_dataset(server.url(archive.name), None, str(tmp_path / "cache"))

    assert server.requests == 2
    assert server.range_headers[1] == f"bytes={archive.stat().st_size // 2}-"
    assert sorted(p.name for p in (tmp_path / "cache" / "extracted" / "pets" / "oxford-iiit-pet" / "images").iterdir())
    assert images_dir.endswith("oxford-iiit-pet/images")


def test_download_task_does_not_retry_a_404(archive, tmp_path):
    from tasks.data import download_dataset

    with serve_directory(archive.parent) as server:
        state = download_dataset(server.url("missing.tgz"), None, str(tmp_path / "cache"), return_state=True)

    assert state.is_failed() and server.requests == 1
    with pytest.raises(Exception, match="404"):
        state.result()


def test_pets_summary_cli_on_a_folder_prints_the_summary_and_writes_the_grid(tmp_path):
    images = make_pets_dataset(tmp_path / "pets", breeds=3, images_per_breed=6, max_side=120)
    out = tmp_path / "out"

    result = CliRunner().invoke(
        app,
        [
            "summary",
            "--data-dir",
            str(images),
            "--presize",
            "48",
            "--out-dir",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--valid-pct",
            "0.25",
        ],
    )

    assert result.exit_code == 0, result.output
    assert "Found 18 items" in result.output and "2 datasets of sizes 14,4" in result.output
    assert (out / "show_batch.png").is_file() and (out / "summary.txt").is_file()


def test_cli_help_tells_every_command_and_flag():
    result = subprocess.run(
        [sys.executable, "-m", "flows", "summary", "--help"], capture_output=True, text=True, check=True
    )
    for flag in (
        "--data-url",
        "--data-dir",
        "--labels",
        "--label-pattern",
        "--labels-csv",
        "--max-unlabelled",
        "--valid-pct",
        "--seed",
        "--presize",
        "--sha256",
        "--out-dir",
        "--cache-dir",
    ):
        assert flag in result.stdout
    top = subprocess.run([sys.executable, "-m", "flows", "--help"], capture_output=True, text=True, check=True)
    assert "summary" in top.stdout and "demo" in top.stdout


def test_pets_summary_cli_names_a_missing_folder_and_exits_2(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = CliRunner().invoke(app, ["summary", "--data-dir", str(missing), "--cache-dir", str(tmp_path / "c")])

    assert result.exit_code == 2  # a user error, found before the data stage starts
    assert result.stderr == f"Error: --data-dir {missing} does not exist: pass the folder that holds the images\n"


def test_pets_summary_refuses_an_archive_past_the_members_limit_it_was_given_in_one_line(archive, tmp_path):
    cache = tmp_path / "cache"
    options = ["--data-url", archive.resolve().as_uri(), "--cache-dir", str(cache), "--out-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(app, ["summary", *options, "--max-archive-members", "5"])

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"Error: Refusing to extract {cache / 'downloads' / archive.name}: it holds more than 5 members, the limit "
        "against zip and tar bombs. If you trust it, raise --max-archive-members (recipe: data.max_archive_members).\n"
    )
    assert list((cache / "extracted").iterdir()) == []


def test_unmatched_files_within_the_unlabelled_share_are_left_out_and_reported(tmp_path):
    images = make_pets_dataset(tmp_path / "pets", breeds=2, images_per_breed=4, max_side=120)
    (images / "IMG_0001.jpeg").write_bytes((images / "Abyssinian_1.jpg").read_bytes())

    recipe = data_recipe(
        data_dir=str(images), max_unlabelled=0.2, out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "c")
    )
    result = prepare_data(recipe)

    text = (tmp_path / "out" / "summary.txt").read_text()
    assert "Found 9 items" in text and "Left out while labelling 1 files (left_out.csv): no_match 1" in text
    left_out = pd.read_csv(tmp_path / "out" / "left_out.csv")
    assert left_out.to_dict("list") == {"path": [str(images / "IMG_0001.jpeg")], "reason": ["no_match"]}
    assert result["sizes"]["train"] + result["sizes"]["valid"] == 8


def test_download_task_is_cached_on_its_inputs_and_on_what_the_cache_holds(archive, tmp_path):
    import shutil

    from tasks.data import download_dataset

    url, cache = archive.resolve().as_uri(), tmp_path / "cache"
    states = [download_dataset(url, None, str(cache), return_state=True) for _ in range(3)]
    shutil.rmtree(cache / "extracted")  # the Prefect cache must not hand back a folder that is gone
    after_delete = download_dataset(url, None, str(cache), return_state=True)

    # The first call downloads; the second finds the data on disk and records it under its key; then cache hits.
    assert [state.name for state in states] == ["Completed", "Completed", "Cached"]
    assert after_delete.name == "Completed" and (cache / "extracted").is_dir()
    assert len({state.result() for state in [*states, after_delete]}) == 1


def test_two_flow_runs_sharing_one_cache_at_the_same_time_both_finish_and_leave_it_valid(archive, tmp_path):
    import os

    from prefect.settings import PREFECT_API_URL

    from lib.data.presize import PresizeCache

    cache = tmp_path / "cache"
    with serve_directory(archive.parent) as server:
        server.delay_seconds = 1.0  # both runs are inside the download step at the same time
        environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the test's Prefect server
        command = [sys.executable, "-m", "flows", "summary", "--data-url", server.url(archive.name)]
        command += ["--presize", str(PRESIZE), "--cache-dir", str(cache)]
        runs = [
            subprocess.Popen([*command, "--out-dir", str(tmp_path / name)], env=environment, stderr=subprocess.PIPE)
            for name in ("one", "two")
        ]
        try:
            errors = [run.communicate(timeout=240)[1].decode(errors="replace") for run in runs]
        finally:
            for run in runs:
                run.kill()  # no-op for finished ones; never leave one behind
        assert [run.returncode for run in runs] == [0, 0], "\n".join(error[-2000:] for error in errors)
        assert server.requests == 1  # one transfer: the other run waited and reused it

    manifests = [pd.read_csv(tmp_path / name / "presized.csv") for name in ("one", "two")]
    pd.testing.assert_frame_equal(manifests[0], manifests[1])
    presize_cache = PresizeCache(cache, PRESIZE)
    for digest, path in zip(manifests[0]["sha256"], manifests[0]["presized_path"], strict=True):
        assert presize_cache.lookup(digest) is not None  # facts readable, image present
        with Image.open(path) as image:
            image.load()  # decodes in full: no half-written file
            assert min(image.size) == PRESIZE
    assert not [p for p in cache.rglob("*.tmp")] and not list(cache.rglob("*.part"))


def test_a_missing_overrides_file_is_refused_before_the_data_stage_starts(tmp_path):
    missing = tmp_path / "overrides.json"
    data_dir = tmp_path / "images"
    data_dir.mkdir()
    result = CliRunner().invoke(
        app, ["summary", "--data-dir", str(data_dir), "--overrides", str(missing), "--cache-dir", str(tmp_path / "c")]
    )

    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: --overrides {missing} is not a file: pass the overrides file `pets review apply` wrote (or a "
        "reviewed review.csv)\n"
    )
