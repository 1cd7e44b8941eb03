"""The `pets` command line. Flags mirror the flow parameters in kebab-case; defaults are the flows' own.

pets train | compare | lr-find     run the recipe (flows/train.py, flows/compare.py)
pets predict MODEL_URI IMAGES...   label pictures with a logged or registered model
pets predict-images INPUT          label a folder, archive or CSV of images with the champion: predictions.csv
pets summary | demo                the data stage alone; the whole recipe offline on generated data
pets ui | announce-dataset         the MLflow UI on the project's store; tell Prefect about a new dataset
pets promote VERSION | champion    move the registry's champion alias (recorded); show its history
pets stack up | down | status      the local production stack: PostgreSQL, Prefect and MLflow servers, a worker
pets review show RUN_ID | apply CSV  a run's label review per class; record a reviewed table's decisions

An error the user can fix is one line, `Error: ...`, with exit status 2 (`pets --debug` adds the traceback); see
flows/console.py.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import numpy as np
import typer

from flows import console
from flows.defaults import DEMO_BREEDS, DEMO_EPOCHS, DEMO_EXPERIMENT, DEMO_IMAGES_PER_BREED
from flows.options import RecipeRequest, recipe_options, section_options, setting_type
from flows.prefect_api import temporary_api
from lib.common.errors import DEBUG_VARIABLE, UserError
from lib.common.numbers import significant
from lib.common.paths import default_output_dir
from lib.ops.stack import MLFLOW_PORT, PG_PORT, PG_URL_VARIABLE, PREFECT_PORT, STATE_DIR_VARIABLE
from lib.recipe import (
    ARCHITECTURES,
    CHAMPION_ALIAS,
    DATA_PARALLEL_SETTINGS,
    DEFAULT_ARCHS,
    DEFAULT_REGISTERED_MODEL,
    DEFAULT_REVIEW_PER_CLASS,
    PredictSettings,
    Recipe,
    RuntimeSettings,
)
from tasks.mlflow_ui import SERVE_PORT, UI_HOST, UI_PORT, UI_URL_VARIABLE, local_ui_url

console.quiet_telemetry()  # before anything imports Prefect or MLflow: both read it at import time

app = typer.Typer(
    cls=console.Commands,
    help="Train and compare pet-breed classifiers the fastai way (fastbook ch. 5) on Prefect, PyTorch and MLflow.",
    no_args_is_help=True,
    add_completion=False,
)

UI_WORKERS = 1  # one uvicorn worker starts in ~6-15 s instead of ~35-46 s on two CPUs (measured here)


def _split_archs(archs: str) -> list[str]:
    names = [name.strip() for name in archs.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARCHITECTURES]
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown architecture(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARCHITECTURES)}"
        )
    return names


# -- options of several commands (the recipe's own options come from flows/options.py) --------------------------------
LabelSources = setting_type("labels")
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on the last line.")]


# -- commands ---------------------------------------------------------------------------------------------------------
@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Show the traceback of every error (or set {DEBUG_VARIABLE}=1).")
    ] = False,
) -> None:
    if debug:  # in the environment, so the training stages' processes see it too
        os.environ[DEBUG_VARIABLE] = "1"


@app.command()
@recipe_options()
def train(
    resume: Annotated[
        str | None,
        typer.Option(
            metavar="RUN_ID",
            help="Continue an interrupted run (FAILED, KILLED or still RUNNING) from its last complete epoch, into "
            "the same MLflow run, with the recipe it logged.",
            rich_help_panel="Recipe",
        ),
    ] = None,
    as_json: Json = False,
    *,
    recipe: RecipeRequest,
) -> None:
    """Train one classifier with the fastbook ch. 5 recipe, track it in MLflow and register the model."""
    resolved = _resumed_recipe(resume, recipe) if resume else _resolved(recipe, training=True)
    _check_tracking_store()
    with temporary_api():  # after the checks: a bad option starts no server
        from flows.train import train as train_flow

        console.quiet_run_logs()
        result = _result_or_exit(train_flow(recipe=resolved, resume=resume, return_state=True))
        if as_json:
            _print_json(result)
        else:
            _print_training(result, experiment=resolved.tracking.experiment)


@app.command()
@recipe_options(exclude=("arch",))
def compare(
    archs: Annotated[
        str, typer.Option(help="Comma-separated architectures to train and compare.", callback=_split_archs)
    ] = ",".join(DEFAULT_ARCHS),
    train_deployment: Annotated[
        str | None,
        typer.Option(
            help="Run each architecture as a flow run of this deployment, e.g. train-pets/train-{arch} ({arch} is "
            "filled in).",
            show_default="train them here, as subflows",
        ),
    ] = None,
    as_json: Json = False,
    *,
    recipe: RecipeRequest,
) -> None:
    """Train several architectures with one recipe, tabulate them, and make the best the registry's `champion`."""
    # Deployments train elsewhere: their folders and device are checked where they run, by the train flow.
    resolved = _resolved(recipe, training=True, here=train_deployment is None)
    _check_tracking_store()  # the comparison itself reads and tags the runs from here
    with temporary_api():  # after the checks: a bad option starts no server
        from flows.compare import compare as compare_flow
        from flows.compare import markdown_table

        console.quiet_run_logs()
        state = compare_flow(archs=archs, recipe=resolved, train_deployment=train_deployment, return_state=True)
        result = _result_or_exit(state)
        if as_json:
            _print_json({**result, "runs": {row["arch"]: row for row in result["runs"]}})
            return
        typer.echo(f"Comparison {result['comparison']} (MLflow experiment {result['experiment']}), best first:")
        typer.echo(markdown_table(result["runs"]))
        registered_model = resolved.tracking.registered_model
        typer.echo(
            f"Champion: {result['champion']}, models:/{registered_model}@champion -> version "
            f"{result['champion_version']}"
        )
        typer.echo(f"Table: {result['table']}; chart: {result['chart']}")
        typer.echo(f"MLflow compare page: {result['compare_url']} (open the UI with `pets ui`)")


@app.command("lr-find")
@recipe_options()
def lr_find(as_json: Json = False, *, recipe: RecipeRequest) -> None:
    """Run fastai's LR finder on a fresh model: print its suggestions (valley, steep, minimum, slide) and the plot.

    The schedule and tracking settings are accepted, so any recipe file works, but not used.
    """
    resolved = _resolved(recipe, training=True)
    with temporary_api():  # after the checks: a bad option starts no server
        from flows.train import lr_find as lr_find_flow

        console.quiet_run_logs()
        result = _result_or_exit(lr_find_flow(recipe=resolved, return_state=True))
        if as_json:
            _print_json(result)
            return
        for name, value in result["suggestions"].items():
            typer.echo(f"{name:>8}: {significant(value)}")
        typer.echo(
            f"Suggested base LR (valley): {significant(result['suggestion'])}; pass it to `pets train --base-lr`."
        )
        typer.echo(f"Plot: {result['plot']}")


@app.command()
def predict(
    model_uri: Annotated[
        str,
        typer.Argument(
            metavar="MODEL_URI",
            help="A logged or registered model: models:/pets-classifier@champion, models:/pets-classifier/3 or "
            "models:/m-<id>.",
            show_default=False,
        ),
    ],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGES", help="Picture files to label.", show_default=False)],
    top_k: Annotated[int, typer.Option(min=1, help="Show the K most likely breeds of each picture.")] = 1,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta",
            help="Test-time augmentation (fastai's tta): blend 4 seeded augmented views of each picture with the plain "
            "one (5 predictions per picture).",
        ),
    ] = False,
    as_json: Json = False,
) -> None:
    """Label pictures with a model from MLflow (tracking store: $MLFLOW_TRACKING_URI or ./mlflow/mlflow.db).

    Each file goes to the model as it is, as it would to `pets serve`; a picture that cannot be read is reported
    on its line and the others are still labelled (the exit code is then 1).
    """
    missing = [str(image) for image in images if not image.is_file()]
    if missing:
        _fail(f"no such image file: {', '.join(missing)}")
    from tasks.tracking import load_served_model, tracking_uri

    try:
        model, metadata = load_served_model(model_uri)
    except UserError as error:  # the registry has no such model, alias or version: it says what it has
        _fail(f"could not load the model {model_uri}: {error} Another store: set MLFLOW_TRACKING_URI.")
    except Exception as error:  # MlflowException or an OSError, depending on where the URI stops resolving
        _fail(
            f"could not load the model {model_uri} from the tracking store {tracking_uri()}: {error}\n"
            "Train and register one with `pets train`, or point MLFLOW_TRACKING_URI at the store that holds it."
        )
    predictions = _tta_predictions(model, images, metadata, top_k) if tta else _served_predictions(model, images, top_k)
    if as_json:
        _print_json(predictions)
    for prediction in [] if as_json else predictions:
        if prediction["error"]:
            typer.echo(f"{prediction['image']}: could not read it: {prediction['error']}", err=True)
            continue
        typer.echo(f"{prediction['image']}: {prediction['label']} ({prediction['probability']:.3f})")
        for other in prediction["top"][1:]:
            typer.echo(f"    {other['label']} ({other['probability']:.3f})")
    if any(prediction["error"] for prediction in predictions):
        raise typer.Exit(1)


def _served_predictions(model, images: Sequence[Path], top_k: int) -> list[dict[str, Any]]:
    """Send the files' bytes through the served contract (lib/serve/contract.py) and return one dict per picture."""
    import pandas as pd

    from lib.serve.contract import IMAGE_COLUMN

    answer = model.predict(
        pd.DataFrame({IMAGE_COLUMN: [image.read_bytes() for image in images]}), params={"top_k": top_k}
    )
    predictions = []
    for image, row in zip(images, answer.to_dict("records"), strict=True):
        top = [{"label": label, "probability": p} for label, p in (row["top_k"] or {}).items()]
        predictions.append(
            {"image": str(image), "label": row["label"], "probability": row["probability"], "top": top,
             "error": row["error"]}
        )  # fmt: skip
    return predictions


def _tta_predictions(model, images: Sequence[Path], metadata: Mapping, top_k: int) -> list[dict[str, Any]]:
    """Blend augmented views of each picture through the served model's own network (lib/serve/serving.py)."""
    import torch

    from lib.serve.contract import unreadable_reason
    from lib.serve.serving import tta_probabilities

    network = model.unwrap_python_model().classifier.network  # the pt2 program the served model runs

    def logits(pictures: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return network(torch.from_numpy(pictures)).numpy()

    predictions = []
    for image in images:
        try:
            (probabilities,) = tta_probabilities(logits, [image], int(metadata["presize"]))
        except (OSError, ValueError) as error:  # what decoding a picture raises (lib/serve/contract.py)
            predictions.append({"image": str(image), "label": None, "probability": None, "top": [],
                                "error": unreadable_reason(error)})  # fmt: skip
            continue
        predictions.append(_top_k(str(image), probabilities.astype(np.float64), metadata["vocab"], top_k))
    return predictions


@app.command("predict-images")
@section_options(predict=PredictSettings, runtime=RuntimeSettings, exclude=("compile", *DATA_PARALLEL_SETTINGS))
def predict_images(
    source: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="A folder of images (searched recursively), an archive (.tgz, .tar or .zip: http(s)://, file:// or a "
            "path) or a CSV whose `path` or `url` column lists images (paths relative to the CSV, or URLs).",
            show_default=False,
        ),
    ],
    as_json: Json = False,
    *,
    predict: PredictSettings,
    runtime: RuntimeSettings,
) -> None:
    """Label every image of INPUT with a registered model (default: its champion) into predictions.csv.

    Batched on the device (fp16 on CUDA); an image that cannot be read is reported in its row. One MLflow run in the
    experiment pets-predictions records the model version, the input's digest, the throughput and the CSV; the same
    input and model version again come from the Prefect cache.
    """
    from lib.serve.inputs import input_kind, is_url
    from tasks.tracking import resolve_model_version

    if not is_url(source):
        source = str(Path(source).expanduser().resolve())
    input_kind(source)  # a path that is none of the three: one line, before anything starts
    runtime.check_runnable()
    _check_tracking_store()
    # The flow resolves the alias again as it starts; this names an unknown model, alias or version at once.
    resolve_model_version(predict.registered_model, alias=predict.alias, version=predict.version)
    with temporary_api():  # after the checks: a bad option starts no server
        from flows.predict import predict_images as predict_images_flow

        console.quiet_run_logs()
        state = predict_images_flow(source=source, settings=predict, runtime=runtime, return_state=True)
        result = _result_or_exit(state)
    if as_json:
        _print_json(result)
        return
    alias = f" ({result['alias']})" if result["alias"] else ""
    cached = ", from the Prefect cache" if result["cached"] else ""
    typer.echo(
        f"Labelled {result['images']} images with {result['registered_model']} v{result['model_version']}{alias}"
        f"{cached}: {result['predictions']}"
    )
    if result["unreadable"]:
        typer.echo(f"{result['unreadable']} could not be read: their rows say why.")
    typer.echo(f"Predicted classes: {result['histogram']}")
    typer.echo(f"MLflow run: {result['run_url']} (open the UI with `pets ui`)")


@app.command("join-training")
@section_options(runtime=RuntimeSettings, exclude=("fp16", "compile", "threads", "cache_dir"))
def join_training(*, runtime: RuntimeSettings) -> None:
    """Lend this node to the trainings node 0 runs: its ranks join every stage, one after another, until Ctrl-C.

    Give the same --nnodes and --rdzv-endpoint as node 0's recipe, this node's --node-rank (1 or more) and its
    --nproc-per-node. Every node needs node 0's --out-dir and --cache-dir on a shared file system, at the same path.
    --out-dir here is where this node keeps torchrun's log (default ./outputs/join-training).
    """
    from lib.train.stages import follow_trainings

    if runtime.node_rank == 0:
        _fail("--node-rank 0 is the node that runs the flow (`pets train`); give this node its rank, 1 or more")
    runtime.check_runnable()
    runtime.check_processes()
    log_dir = Path(runtime.out_dir or default_output_dir() / "join-training")
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        follow_trainings(runtime, log_dir / "torchrun.log", typer.echo)
    except KeyboardInterrupt:
        typer.echo("Stopped: this node takes part in no more trainings.")


@app.command()
@recipe_options()
def summary(*, recipe: RecipeRequest) -> None:
    """Run the data stage and print the DataBlock.summary analogue; write a show_batch grid.

    Only the data and runtime settings are read (files go to --out-dir, default ./outputs/data); the others are
    accepted, so any recipe file works.
    """
    resolved = _resolved(recipe)
    with temporary_api():  # after the checks: a bad option starts no server
        from flows.data import prepare_data

        console.quiet_run_logs()
        _print_summary(_result_or_exit(prepare_data(recipe=resolved, return_state=True)))


@app.command()
def demo(
    breeds: Annotated[int, typer.Option(help="Breeds in the generated dataset.")] = DEMO_BREEDS,
    images_per_breed: Annotated[int, typer.Option(help="Images per breed.")] = DEMO_IMAGES_PER_BREED,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs after unfreezing.")] = DEMO_EPOCHS,
    out_dir: Annotated[
        Path | None, typer.Option(help="Archive, data and run files.", show_default="./outputs/demo")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Download and presize cache.", show_default="<out-dir>/cache")
    ] = None,
) -> None:
    """Run the whole recipe offline on the CPU: a generated pets-like dataset, a small resnet, MLflow, registry."""
    folders = {
        name: str(Path(path).expanduser().resolve())
        for name, path in (("out_dir", out_dir), ("cache_dir", cache_dir))
        if path
    }
    with temporary_api():  # after the checks: a bad option starts no server
        from flows.demo import demo as demo_flow

        console.quiet_run_logs()
        state = demo_flow(breeds=breeds, images_per_breed=images_per_breed, epochs=epochs, **folders, return_state=True)
        result = _result_or_exit(state)
        registered = f"models:/{result['registered_model']}/{result['model_version']}"
        _print_training(result, experiment=DEMO_EXPERIMENT, ui_hint="`make ui` (or `pets ui`)")
        image = result["data"]["example_images"][0]
        typer.echo(f"Try the model: pets predict {registered} {image} --top-k 3")


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = UI_PORT,
    host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = UI_HOST,
) -> None:
    """Serve the MLflow UI on the project's tracking store ($MLFLOW_TRACKING_URI or ./mlflow/mlflow.db)."""
    from tasks.tracking import fail_abandoned_runs, tracking_uri, ui_url

    _check_tracking_store()
    for message in fail_abandoned_runs():  # the UI would show them RUNNING forever
        typer.echo(message)
    command, env = ui_command(host=host, port=port)
    served = local_ui_url(host, port)
    typer.echo(f"MLflow UI on {served} for {tracking_uri()} (Ctrl-C stops it)")
    if ui_url() != served:  # links printed by other commands would open another address
        typer.echo(f"Run links point at {ui_url()}; set {UI_URL_VARIABLE}={served} to make them open this UI.")
    sys.stdout.flush()
    os.execvpe(command[0], command, env)  # the server replaces this process: Ctrl-C and SIGTERM reach it directly


@app.command()
def serve(
    model_uri: Annotated[
        str,
        typer.Argument(
            metavar="MODEL_URI",
            help="A registered or logged model: an alias, a version (models:/NAME/3) or models:/m-<id>.",
        ),
    ] = f"models:/{DEFAULT_REGISTERED_MODEL}@{CHAMPION_ALIAS}",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = SERVE_PORT,
    host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = UI_HOST,
    workers: Annotated[int, typer.Option(min=1, help="Server processes, each holding the model.")] = 1,
) -> None:
    """Serve a model over HTTP with `mlflow models serve`: POST encoded images to /invocations, get class names back.

    An alias is resolved once, at the start: promoting another version later takes a restart.
    """
    from tasks.tracking import resolve_model

    _check_tracking_store()
    resolved = resolve_model(model_uri)
    command, env = serve_command(resolved.uri, host=host, port=port, workers=workers)
    version = f" (v{resolved.version})" if resolved.version else ""
    typer.echo(f"Serving {model_uri}{version} on {local_ui_url(host, port)}/invocations (Ctrl-C stops it)")
    sys.stdout.flush()
    os.execvpe(command[0], command, env)  # the server replaces this process: Ctrl-C and SIGTERM reach it directly


RegisteredModel = Annotated[
    str, typer.Option("--model", help="The registered model (the recipe's tracking.registered_model).")
]
Alias = Annotated[str, typer.Option(help="The registry alias.")]


@app.command()
def promote(
    version: Annotated[
        str, typer.Argument(metavar="VERSION", help="The model version to promote: 3 or v3.", show_default=False)
    ],
    model: RegisteredModel = DEFAULT_REGISTERED_MODEL,
    reason: Annotated[str, typer.Option(help="Why, recorded with the promotion.")] = "promoted by hand",
    alias: Alias = CHAMPION_ALIAS,
) -> None:
    """Move the registry alias to VERSION, recording the previous version, time, reason and who (rollback: the same)."""
    from tasks.tracking import promote as promote_version

    _check_tracking_store()
    promotion = promote_version(model, version, reason=reason, alias=alias)
    if not promotion.moved:
        typer.echo(f"{model}@{alias} is v{promotion.version} already: nothing changed.")
        return
    was = f"was v{promotion.previous}" if promotion.previous else "was unset"
    typer.echo(f"{model}@{alias} -> v{promotion.version} ({was}): {promotion.reason}")


@app.command()
def champion(
    model: RegisteredModel = DEFAULT_REGISTERED_MODEL, alias: Alias = CHAMPION_ALIAS, as_json: Json = False
) -> None:
    """Show the version the registry alias points at and its promotions, newest first."""
    from tasks.tracking import alias_version, champion_history

    _check_tracking_store()
    current = alias_version(model, alias)
    history = champion_history(model, alias)
    if as_json:
        entries = [promotion.entry() for promotion in history]
        _print_json({"model": model, "alias": alias, "version": current, "history": entries})
        return
    if current is None:
        typer.echo(f"{model}@{alias} is not set: `pets compare` sets it, or `pets promote VERSION`.")
    else:
        typer.echo(f"{model}@{alias} -> v{current}")
    if history and history[0].version != current:  # moved or removed in the MLflow UI, or by another client
        typer.echo(f"The alias was moved outside `pets promote` after v{history[0].version}: that move is not below.")
    if not history:
        typer.echo("No promotions recorded.")
        return
    table = [("time (UTC)", "version", "from", "by", "reason")]
    table += [(p.time, f"v{p.version}", f"v{p.previous}" if p.previous else "-", p.by, p.reason) for p in history]
    widths = [*(max(len(row[column]) for row in table) for column in range(4)), 0]  # the reason column is last
    for row in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


@app.command("announce-dataset")
def announce_dataset(
    data_url: Annotated[
        str,
        typer.Argument(
            metavar="DATA_URL", help="http(s):// or file:// URL of the new dataset archive.", show_default=False
        ),
    ],
    name: Annotated[str, typer.Option(help="Dataset name: the event's resource is pets.dataset.<name>.")] = "pets",
    labels: Annotated[
        LabelSources, typer.Option(help="Where the archive's labels come from (the recipe's --labels).")
    ] = LabelSources.auto,
    labels_csv: Annotated[
        str | None,
        typer.Option(help="The labels CSV: a URL, or a path inside the archive (the recipe's --labels-csv)."),
    ] = None,
) -> None:
    """Emit `pets.dataset.published` to the Prefect server at PREFECT_API_URL: the compare deployment trains on it."""
    from flows.events import DATASET_PUBLISHED, announce_dataset

    try:
        event_id = announce_dataset(data_url, name, labels=labels.value, labels_csv=labels_csv)
    except RuntimeError as error:
        _fail(str(error))
    typer.echo(f"Sent {DATASET_PUBLISHED} for pets.dataset.{name} ({data_url}); event id {event_id}.")


# -- the production stack (lib/ops/stack.py) --------------------------------------------------------------------------
stack_app = typer.Typer(
    cls=console.Commands,
    help="The local production stack: PostgreSQL, a Prefect server and an MLflow tracking server on it, and a worker.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")

StateDir = Annotated[
    Path | None,
    typer.Option(
        envvar=STATE_DIR_VARIABLE,
        help="The stack's folder: the PostgreSQL cluster, logs, proxied artifacts and pids.json.",
        show_default="./outputs/stack",
    ),
]


def _state_dir(state_dir: Path | None) -> Path:
    from lib.ops.stack import default_state_dir

    return (state_dir or default_state_dir()).expanduser()


@stack_app.command("up")
def stack_up(
    state_dir: StateDir = None,
    pg_url: Annotated[
        str | None,
        typer.Option(
            envvar=PG_URL_VARIABLE,
            help="An existing PostgreSQL server, postgresql://USER[:PASSWORD]@HOST[:PORT][/DB]: the databases prefect "
            "and mlflow are created there when missing.",
            show_default="a local cluster in the state folder",
        ),
    ] = None,
    pg_port: Annotated[int, typer.Option(min=1, max=65535, help="The local cluster's port.")] = PG_PORT,
    prefect_port: Annotated[int, typer.Option(min=1, max=65535, help="The Prefect server's port.")] = PREFECT_PORT,
    mlflow_port: Annotated[int, typer.Option(min=1, max=65535, help="The MLflow server's port.")] = MLFLOW_PORT,
) -> None:
    """Start the stack on 127.0.0.1, deploy prefect.yaml to it, and print the variables that point at it."""
    from lib.ops.stack import StackSettings, up

    settings = StackSettings(
        state_dir=_state_dir(state_dir), pg_url=pg_url, pg_port=pg_port, prefect_port=prefect_port,
        mlflow_port=mlflow_port,
    )  # fmt: skip
    stack = up(settings, say=typer.echo)
    where = f"cluster in {stack.state_dir / 'pgdata'}" if stack.local_postgres else "an existing server"
    typer.echo(f"PostgreSQL  {stack.postgres_url} ({where}), databases prefect and mlflow")
    typer.echo(f"Prefect     {stack.prefect_url} (API {stack.prefect_api_url}), every deployment of prefect.yaml")
    typer.echo(f"MLflow      {stack.mlflow_url}, artifacts proxied into {stack.artifacts}")
    typer.echo(f"Worker      on the cpu pool; logs in {stack.logs}; `pets stack down` (make stack-down) stops it all")
    typer.echo("Point this shell at it:")
    for name, value in stack.exports().items():
        typer.echo(f"export {name}={value}")


@stack_app.command("down")
def stack_down(state_dir: StateDir = None) -> None:
    """Stop the stack's processes by their recorded PIDs: worker, MLflow, Prefect, then the local PostgreSQL."""
    from lib.ops.stack import down

    for line in down(_state_dir(state_dir)):
        typer.echo(line)


@stack_app.command("status")
def stack_status(state_dir: StateDir = None) -> None:
    """Show the stack's URLs and whether each of its processes runs."""
    from lib.ops.stack import status

    for line in status(_state_dir(state_dir)):
        typer.echo(line)


# -- the label review (flows/review.py, lib/data/overrides.py) -------------------------------------------------------
review_app = typer.Typer(
    cls=console.Commands,
    help="Review a run's labels: its candidates per class, then record which images to keep, delete or relabel.",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")

DEFAULT_OVERRIDES = default_output_dir() / "overrides.json"  # one file that every review round merges into
RunId = Annotated[
    str, typer.Argument(metavar="RUN_ID", help="The MLflow run that logged the review.", show_default=False)
]


@review_app.command("show")
def review_show(
    run_id: RunId,
    per_class: Annotated[int, typer.Option(min=1, help="Candidates shown per class.")] = DEFAULT_REVIEW_PER_CLASS,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            envvar="MLFLOW_TRACKING_URI", help="The MLflow tracking store.", show_default="./mlflow/mlflow.db"
        ),
    ] = None,
    save: Annotated[
        Path | None, typer.Option(help="Also write the whole review.csv here, to mark its action column.")
    ] = None,
) -> None:
    """Print the run's label review: per class, the images whose labels look most wrong first, with their paths."""
    from tasks.tracking import logged_review

    table = logged_review(run_id, tracking_uri)
    ranked_by = "label quality" if "label_quality" in table.columns else "loss"
    for label, rows in table.groupby("label", sort=False):
        typer.echo(f"{label}: {len(rows)} images, the {min(per_class, len(rows))} with the worst {ranked_by}")
        for row in rows.head(per_class).itertuples(index=False):
            issue = "  label issue" if getattr(row, "issue", "") in (True, "True") else ""
            typer.echo(
                f"  loss {float(row.loss):7.3f}  predicted {row.predicted} ({float(row.probability):.2f})  "
                f"{row.split:<5}  {row.file}{issue}"
            )
    table_file = "review.csv"
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(save, index=False)
        table_file = str(save)
        typer.echo(f"Review table saved to {save}")
    typer.echo(
        f"Mark the action column of {table_file} (keep, delete, relabel:<class>), then `pets review apply "
        f"{table_file} --run {run_id}`."
    )


@review_app.command("apply")
def review_apply(
    reviewed: Annotated[
        Path,
        typer.Argument(metavar="REVIEWED_CSV", help="A review.csv with its action column marked.", show_default=False),
    ],
    to: Annotated[
        Path,
        typer.Option(
            "--to",
            metavar="OVERRIDES_JSON",
            help="The overrides file to write; one already there gets these decisions merged in, as its next version.",
        ),
    ] = DEFAULT_OVERRIDES,
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            metavar="RUN_ID",
            help="The MLflow run whose review this is: the next training run links to it.",
            show_default="read from the table's place, <out-dir>/RUN_ID/review/review.csv",
        ),
    ] = None,
) -> None:
    """Record a reviewed table's decisions (by image content) in a versioned overrides file the data stage applies."""
    from lib.data.overrides import record_review

    to = to.expanduser().resolve()
    overrides, review = record_review(reviewed.expanduser(), to, review_run=run)
    source = f" of run {overrides.review_run}" if overrides.review_run else ""
    typer.echo(
        f"Overrides v{overrides.version}{source} in {to}: {review.deleted} deleted, {review.relabelled} relabelled, "
        f"{review.kept} kept. Next: pets train --overrides {to}"
    )


def main() -> None:
    """The `pets` command line (the console script, and `python -m flows`)."""
    try:
        app(prog_name="pets")
    finally:
        # torch, Prefect and MLflow hold millions of objects: the interpreter's exit-time collection of them took
        # 2-3 s after every command on two CPUs (BENCHMARKS.md, issue 16), and the process frees them all at once
        gc.freeze()


# -- helpers ----------------------------------------------------------------------------------------------------------
def _resolved(request: RecipeRequest, *, training: bool = False, here: bool = True) -> Recipe:
    """Return the recipe the command line asks for, checked before any work starts (a RecipeError stops it).

    `here`: the runs use this machine's folders and device, so they are checked too (`Recipe.check_runnable`).
    """
    recipe = request.resolve()
    if here:
        recipe.check_runnable(training=training)
    elif training:
        recipe.data.check_trainable()
    return recipe


def _check_tracking_store() -> None:
    """Stop at once, before a Prefect server starts, when the MLflow store is down (TrackingStoreUnavailableError)."""
    from tasks.tracking import check_tracking_store

    check_tracking_store()


def _resumed_recipe(run_id: str, request: RecipeRequest) -> Recipe:
    """Return the recipe run_id logged, checking the command line asks for no other (a resumed run keeps its own)."""
    from tasks.tracking import logged_recipe, refuse_changed_recipe, resumable_run

    _check_tracking_store()  # MLflow's client would retry an unreachable server for minutes
    run = resumable_run(run_id)  # a ResumeRefusedError names what is wrong
    asked = request.resolve(base=logged_recipe(run_id))
    refuse_changed_recipe(run, asked)
    asked.check_runnable()
    return asked


def ui_command(*, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """Return the `mlflow ui` command line and environment that serve the project's tracking store."""
    from tasks.tracking import artifact_location, tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)  # sqlite makes no folders
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    root = artifact_location(uri)
    if root is not None:
        command += ["--default-artifact-root", root]
    command += ["--host", host, "--port", str(port), "--workers", str(UI_WORKERS)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey job runner: ~8 fewer processes
    return command, env  # telemetry: off in os.environ already (console.quiet_telemetry), unless the user opted in


def serve_command(model_uri: str, *, host: str, port: int, workers: int) -> tuple[list[str], dict[str, str]]:
    """Return the `mlflow models serve` command line and environment for a model of the project's tracking store.

    MLflow 3.17 starts its scoring server by running `uvicorn` by name (mlflow/pyfunc/scoring_server/__init__.py,
    `get_cmd`), so this interpreter's bin folder goes first on PATH: the server starts from an unactivated venv too.
    The local environment manager serves from this environment instead of building a new one.
    """
    from tasks.tracking import tracking_uri

    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", host, "--port", str(port), "--workers", str(workers)]
    bin_folder = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri(),
        "PATH": f"{bin_folder}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return command, env


def _fail(message: str, *, code: int = console.USER_ERROR_EXIT) -> NoReturn:
    """End the command with one `Error:` line: a user error (exit 2) unless `code` says otherwise."""
    console.say_error(message)
    raise typer.Exit(code)


def _result_or_exit(state) -> Any:
    """Return a finished flow's result; a failed one's user error is raised (one line, exit 2), another exits 1.

    The traceback of another error (a bug) was logged once by Prefect, so only its type and message are repeated.
    """
    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    if isinstance(error, UserError):
        raise error
    _fail(f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error), code=1)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, default=str))


def _print_training(result: Mapping[str, Any], *, experiment: str | None = None, ui_hint: str = "`pets ui`") -> None:
    from tasks.tracking import run_url

    trained = result["epochs_trained"]
    final = f"retrained from scratch for {trained} epochs" if result["retrained"] else "the probe is the final model"
    typer.echo(
        f"{result['arch']}: error_rate {significant(result['error_rate'])}, valid_loss "
        f"{significant(result['valid_loss'])}; best epoch {result['best_epoch']} of {result['probe_epochs']}, so "
        f"{final} (base LR {significant(result['base_lr'])})"
    )
    typer.echo(
        f"Model: {result['model_uri']}, registered as models:/{result['registered_model']}/{result['model_version']}"
    )
    if "tta_error_rate" in result:
        typer.echo(
            f"With test-time augmentation: error_rate {significant(result['tta_error_rate'])}, valid_loss "
            f"{significant(result['tta_valid_loss'])}"
        )
    where = f" (experiment {experiment})" if experiment else ""
    typer.echo(f"MLflow run {result['run_name']!r}{where}: {run_url(result)}")
    typer.echo(f"Open the UI with {ui_hint}.")
    if result.get("review"):
        typer.echo(f"Label review ({result['review']['ranking']}): pets review show {result['run_id']}")


def _top_k(image: str, probabilities: np.ndarray, vocab: Sequence[str], k: int) -> dict[str, Any]:
    """Return a picture's k most likely labels, best first, with the best one also at the top level."""
    order = probabilities.argsort()[::-1][:k]
    top = [{"label": vocab[i], "probability": float(probabilities[i])} for i in order]
    return {"image": image, "label": top[0]["label"], "probability": top[0]["probability"], "top": top, "error": None}


def _print_summary(result: dict) -> None:
    typer.echo(Path(result["summary"]).read_text())
    typer.echo(f"Summary written to {result['summary']}")
    typer.echo(f"show_batch grid written to {result['show_batch']}")
    typer.echo(f"Cleaning report: {result['cleaning_report']}")
