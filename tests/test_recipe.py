"""The typed recipe (lib/recipe.py) and the walking test: every setting is an option of every command that trains or
reads data, a parameter of every flow, and an MLflow param (tests/flows/test_cli.py checks that on a real run)."""

import json

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.cli import app
from lib.recipe import OPTIONS, SECTIONS, Recipe, describe_error, fields, option_name

RECIPE_COMMANDS = ("train", "compare", "lr-find", "summary")
SET_BY_THE_COMMAND = {"compare": {"arch"}}  # compare trains each of --archs: it sets model.arch itself


def command_options(name: str) -> set[str]:
    command = typer.main.get_command(app).commands[name]
    return {flag for parameter in command.params for flag in [*parameter.opts, *parameter.secondary_opts]}


def recipe_flags(option: str) -> list[str]:
    section, name = OPTIONS[option]
    flag = "--" + option.replace("_", "-")
    is_switch = SECTIONS[section].model_fields[name].annotation is bool
    return [flag, "--no-" + flag[2:]] if is_switch else [flag]


@pytest.mark.parametrize("command", RECIPE_COMMANDS)
def test_every_setting_is_an_option_of_every_command_that_trains_or_reads_data(command):
    options = command_options(command)
    expected = [flag for option in OPTIONS if option not in SET_BY_THE_COMMAND.get(command, ()) for flag in
                recipe_flags(option)]  # fmt: skip
    assert [flag for flag in expected if flag not in options] == []
    assert "--recipe" in options
    for option in SET_BY_THE_COMMAND.get(command, ()):
        assert not set(recipe_flags(option)) & options  # no option that the command would silently override


def test_help_shows_every_default_and_bound():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "[default: 64]" in text and "[1<=x]" in text  # --bs
    assert "[0<x<1]" in text and "[default: 0.2]" in text  # --valid-pct
    assert "[0<x<=1]" in text  # --min-scale
    for section, name in fields():
        default = SECTIONS[section].model_fields[name].default
        if isinstance(default, int | float) and not isinstance(default, bool):
            shown = str(default) if isinstance(default, int) else f"{default:g}"  # click prints an int in full
            assert f"[default: {shown}]" in text, (section, name)


@pytest.mark.parametrize("flow_path", ["flows.train:train", "flows.train:lr_find", "flows.data:prepare_data",
                                       "flows.compare:compare"])  # fmt: skip
def test_every_flow_takes_the_recipe_with_every_setting_in_its_form(flow_path):
    import importlib

    module, name = flow_path.split(":")
    flow = getattr(importlib.import_module(module), name)
    schema = flow.parameters.model_dump()
    assert "recipe" in schema["properties"]
    definitions = schema["definitions"]
    for section, model in SECTIONS.items():
        assert set(definitions[model.__name__]["properties"]) == set(model.model_fields), section
    assert schema["properties"]["recipe"]["default"] == Recipe().model_dump(mode="json")


def test_params_are_every_setting_under_its_dotted_name():
    params = Recipe().params()
    assert list(params) == [f"{section}.{name}" for section, name in fields()]
    assert params["data.bs"] == 64 and params["schedule.lr_mult"] == 100.0 and params["model.arch"] == "resnet50"
    assert len(params) == sum(len(model.model_fields) for model in SECTIONS.values())


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_saved_recipe_loads_back_equal_with_the_same_params(tmp_path, suffix):
    recipe = Recipe().updated({"bs": 16, "base_lr": 3e-3, "arch": "resnet18", "data_url": "https://x.test/p.tgz"})
    path = recipe.save(tmp_path / f"sub/recipe{suffix}")
    loaded = Recipe.load(path)
    assert loaded == recipe and loaded.params() == recipe.params()
    if suffix == ".json":
        assert json.loads(path.read_text())["data"]["bs"] == 16


def test_a_partial_recipe_file_keeps_the_defaults(tmp_path):
    (tmp_path / "short.yaml").write_text("schedule:\n  epochs: 2\nmodel:\n  arch: resnet34\n")
    recipe = Recipe.load(tmp_path / "short.yaml")
    assert recipe.schedule.epochs == 2 and recipe.model.arch == "resnet34"
    assert recipe.data == Recipe().data and recipe.schedule.freeze_epochs == Recipe().schedule.freeze_epochs


def test_updated_validates_the_whole_recipe_and_refuses_unknown_names():
    with pytest.raises(ValueError, match=r"unknown settings \['epoch'\]"):
        Recipe().updated({"epoch": 3})
    with pytest.raises(ValidationError):
        Recipe().updated({"data_url": "https://x.test/a.tgz", "data_dir": "/data"})
    with pytest.raises(ValidationError, match="frozen"):  # a recipe is a value, changed only into a new one
        Recipe().data.bs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bs": 0}, "--bs: Input should be greater than or equal to 1"),
        ({"valid_pct": 1.5}, "--valid-pct: Input should be less than 1"),
        ({"base_lr": float("inf")}, "--base-lr: must be a finite number"),
        ({"base_lr": -1.0}, "--base-lr: Input should be greater than 0"),
        ({"arch": "resnet19"}, "--arch: Input should be 'resnet18'"),
        ({"data_url": "https://x.test/a.tgz", "data_dir": "/d"}, "give --data-url or --data-dir, not both"),
        ({"experiment": ""}, "--experiment: String should have at least 1 character"),
    ],
)
def test_a_bad_value_is_described_by_its_option(options, message):
    with pytest.raises(ValidationError) as caught:
        Recipe().updated(options)
    assert message in describe_error(caught.value)


def test_a_crop_larger_than_the_presize_is_refused_for_training_only():
    recipe = Recipe().updated({"presize": 64})  # the data stage alone does not crop: fine for `pets summary`
    with pytest.raises(ValueError, match="--size 224 is larger than --presize 64"):
        recipe.data.check_trainable()


def test_option_names_are_unique_and_mostly_the_setting_names():
    assert option_name("data", "url") == "data_url" and option_name("data", "bs") == "bs"
    assert len(OPTIONS) == len(list(fields()))


def test_the_resolution_order_is_defaults_then_file_then_options(tmp_path):
    from flows.options import RecipeRequest

    Recipe().updated({"bs": 16, "epochs": 2}).save(tmp_path / "recipe.yaml")
    base = Recipe().updated({"arch": "resnet18", "bs": 32})
    resolved = RecipeRequest(file=tmp_path / "recipe.yaml", given={"epochs": 5}).resolve(base=Recipe())
    assert (resolved.data.bs, resolved.schedule.epochs) == (16, 5)
    # A file written from the defaults sets every setting: it wins over a base recipe everywhere.
    over_base = RecipeRequest(file=tmp_path / "recipe.yaml").resolve(base=base)
    assert over_base.model.arch == "resnet50" and over_base.data.bs == 16
    (tmp_path / "short.yaml").write_text("data:\n  bs: 8\n")
    partial = RecipeRequest(file=tmp_path / "short.yaml").resolve(base=base)
    assert partial.model.arch == "resnet18" and partial.data.bs == 8  # settings the file leaves out keep the base's


def test_the_option_source_decides_what_overrides_the_file():
    """A flag given with its default value still overrides the file (click's parameter source, not the value)."""
    from flows.options import recipe_options

    seen = {}

    @recipe_options()
    def command(*, recipe) -> None:
        seen["given"] = dict(recipe.given)

    cli = typer.Typer()
    cli.command()(command)
    CliRunner().invoke(cli, ["--bs", "64", "--no-pretrained"], catch_exceptions=False)
    assert seen["given"] == {"bs": 64, "pretrained": False}
