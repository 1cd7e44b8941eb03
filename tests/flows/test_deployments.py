"""Deployments for real: a Prefect server, `prefect deploy --all` of prefect.yaml, process workers, MLflow on disk.

Everything runs in separate processes, as in production: the server and the workers are started by
tests/support/prefect_server.py and stopped by PID when the test ends, whatever happens in it. The workers run the
flows from clones of this checkout's HEAD (prefect.yaml's pull steps), made from a local bare repository. The `gpu`
pool is only a name here (CI has no GPU): what is proved is that compare runs its trainings as runs of the training
deployments, on the pool's `training` queue, at the same time.
"""

import copy
import subprocess
import time
from datetime import datetime
from pathlib import Path

import mlflow
import pytest
import yaml

from lib.data.synthetic import make_shapes_dataset, pack_tgz
from lib.recipe import Recipe
from tests.support.prefect_server import prefect_server

ROOT = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = {entry["name"]: entry for entry in CONFIG["deployments"]}
TEMPLATES = {  # the trigger's recipe.data templates, by the payload key each renders
    key: f"{{{{ event.payload.{key} }}}}" for key in ("data_url", "labels", "labels_csv")
}
# The smallest demo that still trains and registers a model: a few breeds, a few tiny images, one epoch per stage.
# base_lr skips the LR finder, whose 100 mini-batches would take most of the run (minutes on 2 busy CPUs).
SMOKE_PARAMETERS = {
    "breeds": 3,
    "images_per_breed": 8,
    "epochs": 1,
    "settings": {"base_lr": 1e-3, "presize": 40, "size": 32, "bs": 8, "freeze_epochs": 1, "baseline_epochs": 1},
}
# The same for each of compare's trainings (resnet50 and resnet101, random init): seconds of training, no LR finder.
COMPARE_SETTINGS = {
    "pretrained": False,
    "presize": 40,
    "size": 32,
    "bs": 8,
    "freeze_epochs": 1,
    "epochs": 1,
    "baseline": False,
    "base_lr": 1e-3,
    "fp16": False,
    "workers": 0,
}
COMPARE_EXPERIMENT = "pets-deployments-test"
COMPARE_MODEL = "pets-deployments-test-classifier"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_deploy_all_then_workers_run_smoke_and_compare_runs_its_trainings_in_parallel_on_the_gpu_pool(
    tmp_path, mlflow_uri
):
    worker_env = {
        "MLFLOW_TRACKING_URI": mlflow_uri,  # a migrated store (the fixture's copy): no process races to create it
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PETS_HOME": str(tmp_path / "pets-home"),
        "TORCH_HOME": str(tmp_path / "torch-home"),
    }
    # compare trains on a dataset of the user's own layout: train/ and val/ folders holding class folders.
    shapes = make_shapes_dataset(tmp_path / "shapes", layout="split", valid_name="val", images_per_class=8)
    archive = pack_tgz(shapes, tmp_path / "served" / "shapes.tgz", top_level="shapes")
    repository = _bare_repository_of_head(tmp_path / "pets-pipeline.git")
    with prefect_server(tmp_path / "prefect", extra_env={"PETS_REPOSITORY": str(repository)}) as server:
        server.create_work_pools()
        server.cli("--no-prompt", "deploy", "--all")  # from the repository root: prefect.yaml as committed

        deployed = _deployments_by_name(server)
        assert set(deployed) == set(DEPLOYMENTS), server.diagnostics()
        full_names = {f"{deployment['flow_name']}/{name}": deployment for name, deployment in deployed.items()}
        assert "demo-pets/smoke" in full_names
        # compare starts its trainings by deployment name: every one it would start must exist.
        compare_defaults = DEPLOYMENTS["compare"]["parameters"]
        training_names = [compare_defaults["train_deployment"].format(arch=arch) for arch in compare_defaults["archs"]]
        assert set(training_names) <= set(full_names), full_names
        for name, entry in DEPLOYMENTS.items():
            _assert_registered_as_configured(deployed[name], entry, repository)
        # The multi-GPU deployment's parameters are a recipe that trains on every visible GPU.
        multi_gpu = Recipe.model_validate(deployed["train-multi-gpu"]["parameters"]["recipe"])
        assert (multi_gpu.runtime.nproc_per_node, multi_gpu.runtime.nnodes) == ("auto", 1)
        compare = deployed["compare"]
        _assert_weekly_schedule(compare)
        automation = _assert_event_trigger(server, compare)

        server.start_worker("cpu", extra_env=worker_env)
        smoke = deployed["smoke"]
        parameters = {
            **SMOKE_PARAMETERS,
            "out_dir": str(tmp_path / "outputs"),
            "cache_dir": str(tmp_path / "pets-home"),
        }
        smoke_run = server.post(f"/deployments/{smoke['id']}/create_flow_run", {"parameters": parameters})
        # The data stage alone, on its own generated data (prefect.yaml gives it no parameters): only the folders.
        data_folders = {"out_dir": str(tmp_path / "data-smoke"), "cache_dir": str(tmp_path / "data-smoke-cache")}
        data_smoke = deployed["data-smoke"]
        data_run = server.post(f"/deployments/{data_smoke['id']}/create_flow_run", {"parameters": data_folders})

        # While the cpu worker trains, and before any gpu worker runs: announce a dataset the way `pets
        # announce-dataset` does, and check the automation schedules a compare run for it.
        payload = {"data_url": "http://127.0.0.1:9/pets-2026-11-26.tgz", "labels": "csv", "labels_csv": "train.csv"}
        _announce_dataset(server, payload)  # never fetched: the run is deleted unstarted
        triggered = _wait_for_automation_run(server, compare, automation, timeout=30)
        try:
            expected = {**compare_defaults, **_render(_trigger_parameters(DEPLOYMENTS["compare"]), payload)}
            assert triggered["parameters"]["recipe"]["data"]["url"] == payload["data_url"], triggered["parameters"]
            assert triggered["parameters"] == expected
            data = Recipe.model_validate(triggered["parameters"]["recipe"]).data
            assert (data.labels, data.labels_csv) == ("csv", "train.csv")
            assert triggered["work_queue_name"] == DEPLOYMENTS["compare"]["work_pool"]["work_queue_name"]
        finally:  # nothing may be left for the gpu workers but the compare run below
            server.delete(f"/flow_runs/{triggered['id']}")
        with pytest.raises(AssertionError, match="404"):
            server.flow_run(triggered["id"])

        # The gpu pool as prefect.yaml describes it: an orchestrator for compare runs, and a training worker that
        # takes two runs at once (one per GPU in production; here both share the CPUs).
        server.start_worker("gpu", work_queue="orchestration", name="test-orchestrator", extra_env=worker_env)
        server.start_worker("gpu", work_queue="training", name="test-trainer", limit=2, extra_env=worker_env)
        compare_parameters = {
            "archs": compare_defaults["archs"],
            "train_deployment": compare_defaults["train_deployment"],
            "recipe": Recipe()
            .updated(
                {
                    **COMPARE_SETTINGS,
                    "data_url": archive.as_uri(),
                    "cache_dir": str(tmp_path / "compare-cache"),
                    "out_dir": str(tmp_path / "compare-runs"),
                    "experiment": COMPARE_EXPERIMENT,
                    "registered_model": COMPARE_MODEL,
                }
            )
            .model_dump(mode="json"),
        }
        compare_run = server.post(f"/deployments/{compare['id']}/create_flow_run", {"parameters": compare_parameters})

        final = server.wait_for_final_state(smoke_run["id"], timeout=8 * 60)
        assert final["state_type"] == "COMPLETED", f"{final['state']}\n{server.diagnostics()}"
        data_final = server.wait_for_final_state(data_run["id"], timeout=60)
        assert data_final["state_type"] == "COMPLETED", f"{data_final['state']}\n{server.diagnostics()}"
        assert data_final["total_run_time"] < 60, data_final  # offline, on generated data: no 811 MB download
        assert (tmp_path / "data-smoke" / "data" / "summary.txt").is_file()
        assert not (tmp_path / "data-smoke-cache" / "downloads" / "oxford-iiit-pet.tgz").exists()
        train_runs = server.post(
            "/flow_runs/filter",
            {
                "flow_runs": {"parent_flow_run_id": {"any_": [smoke_run["id"]]}},
                "flows": {"name": {"any_": ["train-pets"]}},
            },
        )
        assert len(train_runs) == 1, train_runs

        compared = server.wait_for_final_state(compare_run["id"], timeout=10 * 60)
        assert compared["state_type"] == "COMPLETED", f"{compared['state']}\n{server.diagnostics()}"
        assert compared["work_queue_name"] == "orchestration", f"{compared}\n{server.diagnostics()}"
        children = server.post(
            "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [compare_run["id"]]}}}
        )
        diagnostics = server.diagnostics()

    # Deployment runs of the two training deployments, on the gpu pool's training queue, both completed.
    training_ids = {full_names[name]["id"]: name for name in training_names}
    summary = [
        {
            "deployment": training_ids.get(child["deployment_id"], child["deployment_id"]),
            **{
                key: child[key]
                for key in ("name", "state_type", "created", "start_time", "end_time", "work_queue_name")
            },
        }
        for child in children
    ]
    assert sorted(child["deployment_id"] for child in children) == sorted(training_ids), f"{summary}\n{diagnostics}"
    for child in children:
        assert child["state_type"] == "COMPLETED", f"{summary}\n{diagnostics}"
        assert (child["work_pool_name"], child["work_queue_name"]) == ("gpu", "training"), f"{summary}\n{diagnostics}"
    # In parallel: each started running before the other ended.
    latest_start = max(_time(child["start_time"]) for child in children)
    earliest_end = min(_time(child["end_time"]) for child in children)
    assert latest_start < earliest_end, f"the trainings ran one after the other: {summary}\n{diagnostics}"

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(COMPARE_EXPERIMENT).experiment_id])
    by_child = {run.data.tags.get("prefect.flow_run_id"): run for run in runs}
    assert len(runs) == 2 and set(by_child) == {child["id"] for child in children}, f"{runs}\n{summary}\n{diagnostics}"
    for child in children:
        run = by_child[child["id"]]
        assert run.info.status == "FINISHED", f"{run}\n{diagnostics}"
        arch = child["parameters"]["recipe"]["model"]["arch"]
        assert training_ids[child["deployment_id"]] == compare_defaults["train_deployment"].format(arch=arch)
        assert run.data.tags["arch"] == arch and run.data.params["data.size"] == "32", run.data
        assert run.data.params["data.label_source"] == "split-folders", run.data  # what `auto` chose
    (comparison,) = {run.data.tags.get("comparison") for run in runs}
    assert comparison and comparison.startswith("cmp-"), comparison
    assert (tmp_path / "compare-runs" / comparison / "comparison.md").is_file()
    best = min(runs, key=lambda run: (run.data.metrics["error_rate"], run.data.metrics["valid_loss"]))
    champion = client.get_model_version_by_alias(COMPARE_MODEL, "champion")
    assert (champion.run_id, str(champion.version)) == (best.info.run_id, best.data.tags["model_version"]), [
        (run.data.tags["arch"], run.data.metrics["error_rate"], run.data.metrics["valid_loss"]) for run in runs
    ]

    runs = client.search_runs(
        [experiment.experiment_id for experiment in client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{train_runs[0]['id']}'",
    )
    assert len(runs) == 1, f"{runs}\n{diagnostics}"
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert {"error_rate", "valid_loss", "accuracy"} <= set(run.data.metrics)
    version = client.get_model_version(run.data.tags["registered_model"], run.data.tags["model_version"])
    assert version.status == "READY"


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _bare_repository_of_head(path: Path) -> Path:
    """A bare repository holding this checkout's HEAD on a branch (CI may have HEAD detached); returns its path."""
    subprocess.run(["git", "init", "--quiet", "--bare", str(path)], check=True)
    subprocess.run(["git", "push", "--quiet", str(path), "HEAD:refs/heads/main"], cwd=ROOT, check=True)
    return path


def _deployments_by_name(server) -> dict[str, dict]:
    deployments = server.post("/deployments/filter", {})
    flows = {flow["id"]: flow["name"] for flow in server.post("/flows/filter", {})}
    return {deployment["name"]: {**deployment, "flow_name": flows[deployment["flow_id"]]} for deployment in deployments}


def _assert_registered_as_configured(deployment: dict, entry: dict, repository: Path) -> None:
    name = entry["name"]
    assert deployment["entrypoint"] == entry["entrypoint"], name
    assert deployment["work_pool_name"] == entry["work_pool"]["name"], name
    assert deployment["work_queue_name"] == entry["work_pool"].get("work_queue_name", "default"), name
    assert sorted(deployment["tags"]) == sorted(entry["tags"]), name
    assert deployment["parameters"] == entry.get("parameters", {}), name
    # The pull steps clone the deployed commit (this checkout's HEAD) from PETS_REPOSITORY, then install it.
    clone, install = deployment["pull_steps"]
    assert clone["prefect.deployments.steps.git_clone"]["repository"] == str(repository), name
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True, text=True)
    assert clone["prefect.deployments.steps.git_clone"]["commit_sha"] == head.stdout.strip(), name
    assert install["prefect.deployments.steps.run_shell_script"]["directory"] == "{{ clone-step.directory }}", name
    # The server keeps a deployment's concurrency limit as a global concurrency limit named after it.
    limit = entry.get("concurrency_limit")
    if limit is None:
        assert deployment["global_concurrency_limit"] is None, name
        return
    settings = limit if isinstance(limit, dict) else {"limit": limit}
    assert deployment["global_concurrency_limit"]["limit"] == settings["limit"], name
    assert deployment["global_concurrency_limit"]["name"] == f"deployment:{deployment['id']}", name
    strategy = settings.get("collision_strategy")
    if strategy is None:
        assert deployment["concurrency_options"] is None, name
    else:
        assert deployment["concurrency_options"]["collision_strategy"] == strategy, name


def _assert_weekly_schedule(compare: dict) -> None:
    assert [(s["schedule"].get("cron"), s["schedule"].get("timezone"), s["active"]) for s in compare["schedules"]] == [
        ("0 3 * * 1", "UTC", True)
    ]


def _trigger_parameters(entry: dict) -> dict:
    (trigger,) = entry["triggers"]
    return trigger["parameters"]


def _assert_event_trigger(server, compare: dict) -> dict:
    """The trigger is stored as an automation named `<deployment>__automation_1` that runs the deployment."""
    automations = server.get(f"/automations/related-to/prefect.deployment.{compare['id']}")
    assert [automation["name"] for automation in automations] == ["compare__automation_1"]
    (automation,) = automations
    assert automation["enabled"] is True
    trigger = automation["trigger"]
    assert trigger["type"] == "event" and trigger["posture"] == "Reactive" and trigger["threshold"] == 1
    assert trigger["match"] == {"prefect.resource.id": "pets.dataset.*"}
    assert trigger["expect"] == ["pets.dataset.published"]
    (action,) = automation["actions"]
    assert action["type"] == "run-deployment" and action["deployment_id"] == compare["id"]
    # The templates are stored as written; they are rendered when the event arrives.
    assert action["parameters"] == _trigger_parameters(DEPLOYMENTS["compare"])
    data = {"url": TEMPLATES["data_url"], "labels": TEMPLATES["labels"], "labels_csv": TEMPLATES["labels_csv"]}
    assert action["parameters"]["recipe"] == {"data": data}
    return automation


def _announce_dataset(server, payload: dict) -> None:
    """Send the dataset event with flows.events.announce_dataset, from a process of its own (as the CLI does)."""
    labels = {key: payload[key] for key in ("labels", "labels_csv")}
    done = server.python(
        "from flows.events import announce_dataset\n"
        f"print(announce_dataset({payload['data_url']!r}, name='test', **{labels!r}))\n"
    )
    assert done.stdout.strip(), f"announce_dataset printed no event id\n{done.stderr}"


def _wait_for_automation_run(server, deployment: dict, automation: dict, timeout: float) -> dict:
    """The flow run the automation created for the deployment (cron runs are created by its schedule instead)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = server.post("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
        created = [run for run in runs if (run["created_by"] or {}).get("id") == automation["id"]]
        if created:
            assert len(created) == 1, created
            assert created[0]["created_by"]["type"] == "AUTOMATION"
            return created[0]
        if time.monotonic() > deadline:
            summary = [(run["name"], run["created_by"], run["parameters"]) for run in runs]
            raise AssertionError(f"no run from {automation['name']} in {timeout} s; runs: {summary}\n")
        time.sleep(0.5)


def _render(parameters: dict, payload: dict) -> dict:
    """The trigger parameters with the event payload's values in place of their templates, at any depth."""
    values = {template: payload[key] for key, template in TEMPLATES.items()}

    def render(value):
        if isinstance(value, dict):
            return {key: render(item) for key, item in value.items()}
        if isinstance(value, list):
            return [render(item) for item in value]
        return values.get(value, value) if isinstance(value, str) else value

    return render(copy.deepcopy(parameters))
