"""prefect.yaml's pull steps for real: a worker elsewhere clones the deployed commit, installs it and runs the flow.

The "other host" is a worker whose working directory and Python environment are not this checkout's: a venv that
reaches the test venv's dependencies but not the project (its editable install is not seen there), started from a
folder of its own. The repository it clones is a local bare repository holding this checkout's HEAD, named to
`prefect deploy` through PETS_REPOSITORY as a remote URL would be. The install step is the one production runs
(`python -m pip install .` into the worker's Python), kept offline by pip settings in the worker's environment.
"""

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.prefect_server import prefect_server

ROOT = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((ROOT / "prefect.yaml").read_text())
CLONE_NAME = CONFIG["pull"][0]["prefect.deployments.steps.git_clone"]["clone_directory_name"]


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _environment_without_the_project(path: Path) -> Path:
    """A venv (no pip of its own) holding the test venv's packages but not this project; returns its python.

    Its site-packages links every entry of the test venv's, except the project's editable install (its finder, its
    .pth and its metadata), so pip there sees no pets-pipeline and `import lib` fails outside a clone.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([Path(sys.base_prefix) / "bin" / version, "-m", "venv", "--without-pip", path], check=True)
    target = path / "lib" / version / "site-packages"
    for source in site.getsitepackages():
        for entry in Path(source).iterdir():
            if not entry.name.startswith(("__editable__", "pets_pipeline-")) and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return path / "bin" / "python"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_elsewhere_clones_the_deployed_commit_installs_it_and_runs_data_smoke_from_the_clone(tmp_path):
    commit = _git("rev-parse", "HEAD")
    repository = tmp_path / "pets-pipeline.git"
    _git("init", "--quiet", "--bare", str(repository))
    # A branch, not a clone of refs: CI may have HEAD detached, and the worker fetches the commit itself.
    _git("push", "--quiet", str(repository), "HEAD:refs/heads/main")

    host = tmp_path / "worker-host"  # the worker's folder: nothing of the checkout in it
    runs = host / "runs"
    (host / "tmp").mkdir(parents=True)
    runs.mkdir()
    python = _environment_without_the_project(host / "venv")
    # An empty PYTHONPATH adds nothing to sys.path: the tests' own (the checkout, in development) stays out.
    outside = {**os.environ, "PYTHONPATH": ""}
    probe = subprocess.run([python, "-c", "import lib"], cwd=host, env=outside, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'lib'" in probe.stderr, "the worker's Python sees the project"
    worker_env = {
        "PYTHONPATH": "",
        # The install step runs `python` from the PATH: the worker's own interpreter, as with an activated venv.
        "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}",
        # Offline, fast: every dependency is already importable, so pip needs no index; without build isolation it
        # builds with the setuptools already there instead of fetching it. pip 26 reads PIP_NO_BUILD_ISOLATION=0
        # as --no-build-isolation (=1 leaves isolation on: tried here).
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "TMPDIR": str(host / "tmp"),
        "PETS_HOME": str(host / "pets-home"),
        "MLFLOW_TRACKING_URI": (host / "mlruns").as_uri(),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    with prefect_server(tmp_path / "prefect", extra_env={"PETS_REPOSITORY": str(repository)}) as server:
        server.create_work_pools()
        server.cli("--no-prompt", "deploy", "--all")  # from the checkout, as a user deploys
        (deployment,) = server.post("/deployments/filter", {"deployments": {"name": {"any_": ["data-smoke"]}}})
        clone_step, install_step = deployment["pull_steps"]
        assert clone_step == {
            "prefect.deployments.steps.git_clone": {
                "id": "clone-step",
                "repository": str(repository),
                "commit_sha": commit,
                "clone_directory_name": CLONE_NAME,
            }
        }, deployment["pull_steps"]
        assert "pip install" in install_step["prefect.deployments.steps.run_shell_script"]["script"]

        server.start_worker("cpu", cwd=host, python=python, extra_env=worker_env)
        # working_dir (a process job variable) keeps the run's folder after it ends, so the clone can be inspected;
        # out_dir is relative: it lands in the run's working directory.
        run = server.post(
            f"/deployments/{deployment['id']}/create_flow_run",
            {
                "parameters": {"out_dir": "outputs/data-smoke", "cache_dir": str(host / "cache")},
                "job_variables": {"working_dir": str(runs)},
            },
        )
        final = server.wait_for_final_state(run["id"], timeout=240)
        diagnostics = server.diagnostics()
    assert final["state_type"] == "COMPLETED", f"{final['state']}\n{diagnostics}"

    clone = runs / CLONE_NAME
    assert _git("rev-parse", "HEAD", cwd=clone) == commit, diagnostics
    assert Path(_git("config", "--get", "remote.origin.url", cwd=clone)) == repository
    # The flow ran in the clone: its relative out_dir is there.
    assert (clone / "outputs" / "data-smoke" / "data" / "summary.txt").is_file(), diagnostics
    # The install step put the clone's package, not an editable link to this checkout, into the worker's Python.
    shown = subprocess.run(
        [python, "-m", "pip", "show", "pets-pipeline"], cwd=host, env=outside, capture_output=True, text=True
    )
    assert shown.returncode == 0, f"{shown.stderr}\n{diagnostics}"
    assert "Editable project location" not in shown.stdout
    located = subprocess.run(
        [python, "-c", "import lib; print(lib.__file__)"], cwd=host, env=outside, capture_output=True, text=True
    )
    assert Path(located.stdout.strip()).is_relative_to(host / "venv"), located
