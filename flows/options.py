"""The `pets` commands' recipe options, made from lib/recipe.py's fields: one option per setting, never declared twice.

`@recipe_options()` gives a command `--recipe FILE` and one option per recipe setting (help, default and range from
the field), grouped by section in `--help`. The command receives `recipe: RecipeRequest`, the file and the options
given on the command line, and resolves it into a `Recipe`: the file's settings over the defaults, the options given
over the file.
"""

from __future__ import annotations

import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import annotated_types
import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from lib.recipe import (
    OPTIONS,
    SECTIONS,
    Recipe,
    RecipeError,
    Section,
    describe_error,
    field_option,
    fields,
    option_name,
)

PATH_OPTIONS = (
    "data_dir",
    "out_dir",
    "cache_dir",
    "overrides",
)  # made absolute: a flow may run in another working directory
PATH_OR_URL_OPTIONS = ("labels_csv",)  # made absolute when the path exists here; a URL is kept as it is
RECIPE_PANEL = "Recipe"
CONTEXT = "recipe_context"  # the command's click context (typer passes it): which options were given


@dataclass(frozen=True)
class RecipeRequest:
    """What the command line asked for: a recipe file and the options given explicitly."""

    file: Path | None = None
    given: Mapping[str, Any] = field(default_factory=dict)

    def resolve(self, base: Recipe | None = None) -> Recipe:
        """Return the recipe: `base` (the defaults), then the file's settings, then the options given."""
        try:
            recipe = base or Recipe()
            if self.file is not None:
                recipe = recipe.updated(_settings_given(Recipe.load(self.file)))
            return recipe.updated(self.given)
        except ValidationError as error:  # before ValueError: pydantic's error is one
            where = f" in {self.file}" if self.file else ""
            raise RecipeError(f"{describe_error(error)}{where}") from None
        except RecipeError:  # it names the file already (malformed YAML)
            raise
        except (OSError, ValueError) as error:  # an unreadable file, or JSON or YAML that is not a recipe
            raise RecipeError(f"cannot read the recipe {self.file}: {error}") from None


def _settings_given(recipe: Recipe) -> dict[str, Any]:
    """Return, by option name, the settings a loaded recipe file gave (those it left out are only defaults)."""
    given = {}
    for section, name in fields():
        part = getattr(recipe, section)
        if section in recipe.model_fields_set and name in part.model_fields_set:
            given[option_name(section, name)] = getattr(part, name)
    return given


def recipe_options(*, exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Give the decorated command one option per recipe setting but `exclude`, plus `--recipe FILE`.

    The command declares `recipe: RecipeRequest` as its last parameter and gets the file and the options given.
    """

    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            parameter.replace(annotation=hints[name])
            for name, parameter in inspect.signature(command).parameters.items()
            if name != "recipe"
        ]
        settings = {option: setting for option, setting in OPTIONS.items() if option not in exclude}
        context = inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        added = [context, _file_parameter()]
        added += [_setting_parameter(option, *setting) for option, setting in settings.items()]

        @functools.wraps(command)
        def run(**arguments: Any) -> Any:
            context = arguments.pop(CONTEXT)
            given = {}
            for option in settings:
                value = arguments.pop(option)
                source = context.get_parameter_source(option)
                if source is not None and source.name != "DEFAULT":  # given, even if equal to the default
                    given[option] = _plain(option, value)
            file = arguments.pop("recipe_file")
            return command(**arguments, recipe=RecipeRequest(file=file, given=given))

        parameters = own + added
        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return run

    return decorate


def section_options(*, exclude: tuple[str, ...] = (), **sections: type[Section]) -> Callable[[Callable], Callable]:
    """Give the decorated command one option per field of each section but `exclude` (a command outside the recipe,
    such as `pets predict-images`), grouped by section in `--help`.

    The command declares one parameter per keyword, last (`predict: PredictSettings`), and gets each section built
    from the options given over its defaults; a value the section refuses is a RecipeError naming the option.
    """

    def decorate(command: Callable) -> Callable:
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            parameter.replace(annotation=hints[name])
            for name, parameter in inspect.signature(command).parameters.items()
            if name not in sections
        ]
        settings = {
            field_option(model, name): (key, name)
            for key, model in sections.items()
            for name in model.model_fields
            if field_option(model, name) not in exclude
        }
        context = inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        added = [context]
        for option, (key, name) in settings.items():
            info = sections[key].model_fields[name]
            added.append(_option_parameter(option, info, panel=key.title()))

        @functools.wraps(command)
        def run(**arguments: Any) -> Any:
            context = arguments.pop(CONTEXT)
            given: dict[str, dict[str, Any]] = {key: {} for key in sections}
            for option, (key, name) in settings.items():
                value = arguments.pop(option)
                source = context.get_parameter_source(option)
                if source is not None and source.name != "DEFAULT":
                    given[key][name] = _plain(option, value)
            built = {key: _section(model, given[key]) for key, model in sections.items()}
            return command(**arguments, **built)

        parameters = own + added
        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return run

    return decorate


def _section(model: type[Section], given: Mapping[str, Any]) -> Section:
    """Build a section from the options given, or raise a RecipeError naming each refused option."""
    try:
        return model.model_validate(given)
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            name = str(problem["loc"][0]) if problem["loc"] else ""
            flag = f"--{field_option(model, name).replace('_', '-')}" if name in model.model_fields else "options"
            problems.append(f"{flag}: {problem['msg'].removeprefix('Value error, ')}")
        raise RecipeError("; ".join(problems)) from None


def _file_parameter() -> inspect.Parameter:
    option = typer.Option(
        "--recipe",
        help="A recipe file (YAML or JSON, as `recipe.yaml` of any run); the options below override it.",
        rich_help_panel=RECIPE_PANEL,
        show_default=False,
    )
    return inspect.Parameter(
        "recipe_file", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=typing.Annotated[Path | None, option]
    )


def _setting_parameter(option: str, section: str, name: str) -> inspect.Parameter:
    """Declare one recipe setting as a typer option: its type, default, help with the range, its section's panel."""
    return _option_parameter(
        option, SECTIONS[section].model_fields[name], panel=f"{section.title()} (recipe: {section})"
    )


def _option_parameter(option: str, info: FieldInfo, *, panel: str) -> inspect.Parameter:
    """Declare one setting as a typer option: its type, default, help with the range, in `panel` of `--help`."""
    flag = "--" + option.replace("_", "-")
    kind = _cli_type(option, info)
    declarations = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    default = info.default
    if isinstance(kind, type) and issubclass(kind, enum.Enum) and default is not None:
        default = kind(default)
    if isinstance(default, tuple):  # a list setting is typed comma-separated (`--valid-folders val,dev`)
        default = ",".join(default)
    help_text = info.description + _range(info)
    typer_option = typer.Option(
        *declarations,
        help=help_text,
        show_default=info.default is not None,
        rich_help_panel=panel,
    )
    annotation = kind if info.default is not None else kind | None
    return inspect.Parameter(
        option, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=typing.Annotated[annotation, typer_option]
    )


def setting_type(option: str) -> Any:
    """The type a recipe setting is parsed as on the command line (a choice of a Literal's values is an enum), for
    a command's own option that takes the same values (`pets announce-dataset --labels`)."""
    section, name = OPTIONS[option]
    return _cli_type(option, SECTIONS[section].model_fields[name])


def _cli_type(option: str, info: FieldInfo) -> Any:
    """The type typer parses the option as: the field's, with a Literal as a choice and folders as paths."""
    annotation = info.annotation
    arguments = [argument for argument in typing.get_args(annotation) if argument is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = arguments[0]
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        return enum.Enum(option.title().replace("_", ""), {value: value for value in values}, type=str)
    if option in PATH_OPTIONS:
        return Path
    if typing.get_origin(annotation) is tuple:
        return str  # the recipe splits it at commas
    return annotation


def _range(info: FieldInfo) -> str:
    """Say the field's bounds as ` [1<=x]`, ` [0<x<1]`."""
    low = high = ""
    for bound in info.metadata:
        if isinstance(bound, annotated_types.Ge):
            low = f"{bound.ge}<="
        elif isinstance(bound, annotated_types.Gt):
            low = f"{bound.gt}<"
        elif isinstance(bound, annotated_types.Le):
            high = f"<={bound.le}"
        elif isinstance(bound, annotated_types.Lt):
            high = f"<{bound.lt}"
    return f" [{low}x{high}]" if low or high else ""


def _plain(option: str, value: Any) -> Any:
    """The option's value as the recipe takes it: an enum's value, an absolute folder as a string."""
    if isinstance(value, enum.Enum):
        return value.value
    if option in PATH_OPTIONS and value is not None:
        return str(Path(value).expanduser().resolve())
    if option in PATH_OR_URL_OPTIONS and value is not None and "://" not in value:
        found = Path(value).expanduser()
        # One that is not here may be a file inside the dataset: the data stage looks for it under the data root.
        return str(found.resolve()) if found.exists() else value
    return value
