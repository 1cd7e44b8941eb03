"""Imports go one way (flows -> tasks -> lib); lib imports neither prefect nor mlflow; only tracking.py uses MLflow,
besides served_model.py, the registered model's own code, which imports nothing of the project but the contract."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("lib"), ids=lambda p: p.name)
def test_lib_imports_neither_orchestration_nor_tracking(path):
    assert imported_roots(path).isdisjoint({"prefect", "mlflow", "tasks", "flows"})


@pytest.mark.parametrize("path", modules("tasks"), ids=lambda p: p.name)
def test_tasks_never_import_flows_and_only_tracking_talks_to_mlflow(path):
    roots = imported_roots(path)
    assert "flows" not in roots
    if path.name not in ("tracking.py", "served_model.py"):
        assert "mlflow" not in roots


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports, as paths relative to the repository (lib/serve/contract.py)."""
    tree = ast.parse(path.read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return {name.replace(".", "/") + ".py" for name in names if name.split(".")[0] in ("lib", "tasks", "flows")}


def test_the_registered_models_code_carries_every_project_module_it_imports():
    # tasks/served_model.py runs wherever the model is loaded, with CONTRACT_MODULES as its only project code.
    from tasks.tracking import CONTRACT_MODULES

    carried = set(CONTRACT_MODULES)
    assert imported_roots(ROOT / "tasks" / "served_model.py") <= {"mlflow", "pandas", "torch", "lib", "__future__"}
    reached, queue = set(), [ROOT / "tasks" / "served_model.py"]
    while queue:
        for module in project_imports(queue.pop()) - reached:
            reached.add(module)
            queue.append(ROOT / module)
    assert reached and reached <= carried, sorted(reached - carried)


@pytest.mark.parametrize("path", modules("flows"), ids=lambda p: p.name)
def test_flows_do_not_talk_to_mlflow_directly(path):
    assert "mlflow" not in imported_roots(path)


def test_the_checker_sees_imports():
    assert {"prefect", "pandas"} <= imported_roots(ROOT / "tasks" / "data.py")


def test_the_cli_starts_without_loading_torch_prefect_or_mlflow():
    # `pets --help` must answer at once: flows/cli.py reads its defaults from import-free modules and loads the
    # flows (torch, Prefect, MLflow) only inside a command.
    import subprocess
    import sys

    probe = "import sys, flows.cli; print(sorted({'torch', 'prefect', 'mlflow'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_the_checks_before_the_temporary_prefect_api_starts_leave_torch_unloaded():
    # A training command checks the tracking store, then starts its Prefect API, which boots on the other core
    # while the command loads torch and the flows (flows/prefect_api.py): torch loaded before would serialise them.
    import subprocess
    import sys

    probe = (
        "import sys, flows.cli; from tasks.tracking import check_tracking_store; check_tracking_store(); "
        "print(sorted({'torch', 'pandas', 'mlflow'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
