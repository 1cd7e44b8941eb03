"""`pets promote` and `pets champion` on a registry of versions registered without training."""

import json

import mlflow
import pytest
from typer.testing import CliRunner

from flows.cli import app
from lib.recipe import DEFAULT_REGISTERED_MODEL
from tests.support.registry import register_versions


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "200"})


@pytest.fixture
def registry(mlflow_uri, tmp_path):
    """The recipe's default registered model with versions 1, 2 and 3; the store's client."""
    register_versions(mlflow_uri, DEFAULT_REGISTERED_MODEL, 3, tmp_path)
    return mlflow.MlflowClient(mlflow_uri)


def test_promote_prints_one_line_and_a_rollback_is_another_promote(registry):
    first = invoke("promote", "2")
    second = invoke("promote", "v3", "--reason", "fewer errors on sphynx")
    rollback = invoke("promote", "2", "--reason", "rollback: v3 is slow")

    assert first.exit_code == second.exit_code == rollback.exit_code == 0, rollback.output
    assert first.stdout == "pets-classifier@champion -> v2 (was unset): promoted by hand\n"
    assert second.stdout == "pets-classifier@champion -> v3 (was v2): fewer errors on sphynx\n"
    assert rollback.stdout == "pets-classifier@champion -> v2 (was v3): rollback: v3 is slow\n"
    assert registry.get_model_version_by_alias(DEFAULT_REGISTERED_MODEL, "champion").version == 2


def test_promoting_the_champion_says_so_and_records_nothing(registry):
    invoke("promote", "2")

    again = invoke("promote", "2", "--reason", "again")

    assert again.exit_code == 0 and again.stdout == "pets-classifier@champion is v2 already: nothing changed.\n"
    assert [entry["reason"] for entry in json.loads(invoke("champion", "--json").stdout)["history"]] == [
        "promoted by hand"
    ]


def test_champion_json_is_the_current_version_and_the_history_newest_first(registry):
    invoke("promote", "1")
    invoke("promote", "3", "--reason", "better")

    result = invoke("champion", "--json")

    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert (shown["model"], shown["alias"], shown["version"]) == (DEFAULT_REGISTERED_MODEL, "champion", "3")
    assert [(e["version"], e["previous"], e["reason"]) for e in shown["history"]] == [
        ("3", "1", "better"),
        ("1", None, "promoted by hand"),
    ]
    assert set(shown["history"][0]) == {"version", "previous", "time", "reason", "by"}


def test_champion_prints_the_version_then_a_table_newest_first(registry):
    invoke("promote", "1")
    invoke("promote", "3", "--reason", "better")

    lines = invoke("champion").stdout.splitlines()

    assert lines[0] == "pets-classifier@champion -> v3"
    assert lines[1].split() == ["time", "(UTC)", "version", "from", "by", "reason"]
    assert lines[2].split()[1:3] == ["v3", "v1"] and lines[2].endswith("better")
    assert lines[3].split()[1:3] == ["v1", "-"] and lines[3].endswith("promoted by hand")
    assert len(lines) == 4


def test_champion_says_when_the_alias_was_moved_outside_promote(registry):
    invoke("promote", "1")
    registry.set_registered_model_alias(DEFAULT_REGISTERED_MODEL, "champion", "2")  # as the MLflow UI would

    lines = invoke("champion").stdout.splitlines()

    assert lines[0] == "pets-classifier@champion -> v2"
    assert lines[1] == "The alias was moved outside `pets promote` after v1: that move is not below."


def test_champion_of_a_model_never_promoted(registry):
    result = invoke("champion")

    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "pets-classifier@champion is not set: `pets compare` sets it, or `pets promote VERSION`.",
        "No promotions recorded.",
    ]


def test_an_unknown_version_is_one_line_naming_the_versions_and_aliases(registry):
    invoke("promote", "1")

    result = invoke("promote", "9")

    assert result.exit_code == 2 and result.stderr == (
        "Error: The registered model 'pets-classifier' has no version '9'; it has versions 1, 2, 3 "
        "(aliases: champion -> v1). Pass one of them.\n"
    )


@pytest.mark.parametrize("command", [["promote", "1", "--model", "no-such-model"], ["champion", "--model", "nope"]])
def test_an_unknown_model_is_one_line_naming_the_registered_models(registry, command):
    result = invoke(*command)

    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "registered models: pets-classifier" in result.stderr and "name one of them" in result.stderr
