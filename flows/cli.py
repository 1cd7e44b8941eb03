"""The `pets` command line. Flags mirror the flow parameters in kebab-case; defaults are the flows' own.

pets train | compare | lr-find     run the recipe (flows/train.py, flows/compare.py)
pets predict MODEL_URI IMAGES...   label pictures with a logged or registered model
pets summary | demo                the data stage alone; the whole recipe offline on generated data
pets ui | announce-dataset         the MLflow UI on the project's store; tell Prefect about a new dataset
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import numpy as np
import typer

from flows.defaults import (
    DEFAULT_EXPERIMENT,
    DEFAULT_REGISTERED_MODEL,
    DEMO_BREEDS,
    DEMO_EPOCHS,
    DEMO_EXPERIMENT,
    DEMO_IMAGES_PER_BREED,
)
from lib.recipe import (
    ARCHITECTURES,
    BASELINE_EPOCHS,
    CPU_CORES_PER_WORKER,
    DEFAULT_ARCH,
    DEFAULT_ARCHS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_FREEZE_EPOCHS,
    DEFAULT_LABEL_PATTERN,
    DEFAULT_LR_MULT,
    DEFAULT_MIN_SCALE,
    DEFAULT_PRESIZE,
    DEFAULT_SEED,
    DEFAULT_SIZE,
    DEFAULT_VALID_PCT,
    MAX_DEFAULT_WORKERS,
)

app = typer.Typer(
    help="Train and compare pet-breed classifiers the fastai way (fastbook ch. 5) on Prefect, PyTorch and MLflow.",
    no_args_is_help=True,
    add_completion=False,
)

UI_PORT = 5000  # MLflow's default port, the one tasks.tracking.run_url links to
UI_HOST = "127.0.0.1"  # loopback only: the UI has no authentication (MLflow 3.17: only with --app-name basic-auth)
UI_WORKERS = 1  # one uvicorn worker starts in ~6-15 s instead of ~35-46 s on two CPUs (measured here)


def _check_arch(arch: str | None) -> str | None:
    if arch is not None and arch not in ARCHITECTURES:
        raise typer.BadParameter(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return arch


def _split_archs(archs: str) -> list[str]:
    names = [name.strip() for name in archs.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARCHITECTURES]
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown architecture(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARCHITECTURES)}"
        )
    return names


# -- options shared by the commands (one declaration each) ------------------------------------------------------------
DataUrl = Annotated[
    str | None,
    typer.Option(
        help="http(s):// or file:// URL of a .tgz/.tar/.zip archive of images.",
        show_default="the Oxford-IIIT Pet archive, when --data-dir is not given either",
    ),
]
DataDir = Annotated[Path | None, typer.Option(help="Local folder of images, used instead of downloading.")]
LabelPattern = Annotated[str, typer.Option(help="Regex searched in each file name; its first group is the label.")]
SkipUnmatched = Annotated[bool, typer.Option(help="Report and leave out files the label pattern does not match.")]
ValidPct = Annotated[float, typer.Option(help="Fraction of the images held out for validation.")]
Seed = Annotated[int, typer.Option(help="Seed of the random split, the crops and the model's random init.")]
Presize = Annotated[int, typer.Option(help="Short side in pixels of the images cached once before training.")]
OutDir = Annotated[
    Path | None, typer.Option(help="Where manifests, reports and plots go.", show_default="./outputs/data")
]
CacheDir = Annotated[
    Path | None, typer.Option(help="Downloads and presize cache.", show_default="$PETS_HOME or ~/.cache/pets")
]
Sha256 = Annotated[str | None, typer.Option(help="Expected sha256 of the downloaded archive.")]

Arch = Annotated[str, typer.Option(help=f"Model: one of {', '.join(ARCHITECTURES)}.", callback=_check_arch)]
Pretrained = Annotated[
    bool, typer.Option(help="Start from ImageNet weights; --no-pretrained starts from random weights (no download).")
]
Size = Annotated[int, typer.Option(help="Training image size in pixels (random resized crop, at most --presize).")]
MinScale = Annotated[float, typer.Option(help="Smallest fraction of the picture a training crop keeps.")]
BatchSize = Annotated[int, typer.Option("--bs", help="Batch size.")]
FreezeEpochs = Annotated[int, typer.Option(help="Epochs training only the new head before unfreezing.")]
Epochs = Annotated[int, typer.Option(help="Epochs of the whole model after unfreezing (the probe run).")]
BaseLr = Annotated[
    float | None, typer.Option(help="Base learning rate.", show_default="the LR finder's valley suggestion")
]
LrMult = Annotated[float, typer.Option(help="Ratio of the head's to the first layers' learning rate.")]
Fp16 = Annotated[bool, typer.Option(help="Mixed precision on a CUDA GPU; ignored (fp32) on other devices.")]
Device = Annotated[
    str | None, typer.Option(help="Torch device, e.g. cuda:1 or cpu.", show_default="CUDA, else MPS, else CPU")
]
Workers = Annotated[
    int | None,
    typer.Option(
        help="DataLoader worker processes.",
        show_default=f"min({MAX_DEFAULT_WORKERS}, CPUs) with a GPU; CPUs // {CPU_CORES_PER_WORKER} on the CPU",
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        help="torch.compile the model. It costs about a minute of compiling first; see BENCHMARKS.md for when it pays."
    ),
]
Experiment = Annotated[str, typer.Option(help="MLflow experiment the runs go to.")]
Baseline = Annotated[bool, typer.Option(help="First train the book's baseline (fastai fine_tune defaults).")]
BaselineEpochs = Annotated[int, typer.Option(help="Epochs of the baseline.")]
Retrain = Annotated[
    bool, typer.Option(help="Retrain from scratch for the best epoch count when it is not the last epoch.")
]
RegisteredModel = Annotated[str, typer.Option(help="MLflow registered model the trained model becomes a version of.")]
TrainOutDir = Annotated[
    Path | None, typer.Option(help="Each run writes to <out-dir>/<MLflow run id>/.", show_default="./outputs/train")
]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on the last line.")]


# -- commands ---------------------------------------------------------------------------------------------------------
@app.command()
def train(
    data_url: DataUrl = None,
    data_dir: DataDir = None,
    label_pattern: LabelPattern = DEFAULT_LABEL_PATTERN,
    arch: Arch = DEFAULT_ARCH,
    pretrained: Pretrained = True,
    presize: Presize = DEFAULT_PRESIZE,
    size: Size = DEFAULT_SIZE,
    min_scale: MinScale = DEFAULT_MIN_SCALE,
    bs: BatchSize = DEFAULT_BATCH_SIZE,
    valid_pct: ValidPct = DEFAULT_VALID_PCT,
    seed: Seed = DEFAULT_SEED,
    freeze_epochs: FreezeEpochs = DEFAULT_FREEZE_EPOCHS,
    epochs: Epochs = DEFAULT_EPOCHS,
    base_lr: BaseLr = None,
    lr_mult: LrMult = DEFAULT_LR_MULT,
    fp16: Fp16 = True,
    device: Device = None,
    workers: Workers = None,
    compile: Compile = False,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    baseline: Baseline = True,
    baseline_epochs: BaselineEpochs = BASELINE_EPOCHS,
    retrain: Retrain = True,
    registered_model: RegisteredModel = DEFAULT_REGISTERED_MODEL,
    out_dir: TrainOutDir = None,
    cache_dir: CacheDir = None,
    as_json: Json = False,
) -> None:
    """Train one classifier with the fastbook ch. 5 recipe, track it in MLflow and register the model."""
    arguments = _flow_arguments(locals())
    from flows.train import train as train_flow

    result = _result_or_exit(train_flow(**arguments, return_state=True))
    if as_json:
        _print_json(result)
    else:
        _print_training(result, experiment=experiment)


@app.command()
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
    data_url: DataUrl = None,
    data_dir: DataDir = None,
    label_pattern: LabelPattern = DEFAULT_LABEL_PATTERN,
    pretrained: Pretrained = True,
    presize: Presize = DEFAULT_PRESIZE,
    size: Size = DEFAULT_SIZE,
    min_scale: MinScale = DEFAULT_MIN_SCALE,
    bs: BatchSize = DEFAULT_BATCH_SIZE,
    valid_pct: ValidPct = DEFAULT_VALID_PCT,
    seed: Seed = DEFAULT_SEED,
    freeze_epochs: FreezeEpochs = DEFAULT_FREEZE_EPOCHS,
    epochs: Epochs = DEFAULT_EPOCHS,
    base_lr: BaseLr = None,
    lr_mult: LrMult = DEFAULT_LR_MULT,
    fp16: Fp16 = True,
    device: Device = None,
    workers: Workers = None,
    compile: Compile = False,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    baseline: Baseline = True,
    baseline_epochs: BaselineEpochs = BASELINE_EPOCHS,
    retrain: Retrain = True,
    registered_model: RegisteredModel = DEFAULT_REGISTERED_MODEL,
    out_dir: TrainOutDir = None,
    cache_dir: CacheDir = None,
    as_json: Json = False,
) -> None:
    """Train several architectures with one recipe, tabulate them, and make the best the registry's `champion`."""
    arguments = _flow_arguments(locals())
    from flows.compare import compare as compare_flow
    from flows.compare import markdown_table

    options = {key: arguments.pop(key) for key in ("archs", "train_deployment", "experiment", "registered_model")}
    # The rest is the training recipe; None means the train flow's default. --out-dir holds the runs and the tables.
    settings = {key: value for key, value in arguments.items() if value is not None}
    state = compare_flow(**options, settings=settings, out_dir=arguments["out_dir"], return_state=True)
    result = _result_or_exit(state)
    if as_json:
        _print_json({**result, "runs": {row["arch"]: row for row in result["runs"]}})
        return
    typer.echo(f"Comparison {result['comparison']} (MLflow experiment {result['experiment']}), best first:")
    typer.echo(markdown_table(result["runs"]))
    typer.echo(
        f"Champion: {result['champion']}, models:/{registered_model}@champion -> version {result['champion_version']}"
    )
    typer.echo(f"Table: {result['table']}. Open the UI with `pets ui`.")


@app.command("lr-find")
def lr_find(
    data_url: DataUrl = None,
    data_dir: DataDir = None,
    label_pattern: LabelPattern = DEFAULT_LABEL_PATTERN,
    arch: Arch = DEFAULT_ARCH,
    pretrained: Pretrained = True,
    presize: Presize = DEFAULT_PRESIZE,
    size: Size = DEFAULT_SIZE,
    min_scale: MinScale = DEFAULT_MIN_SCALE,
    bs: BatchSize = DEFAULT_BATCH_SIZE,
    valid_pct: ValidPct = DEFAULT_VALID_PCT,
    seed: Seed = DEFAULT_SEED,
    fp16: Fp16 = True,
    device: Device = None,
    compile: Compile = False,
    out_dir: Annotated[
        Path | None, typer.Option(help="Where the plot and data files go.", show_default="./outputs/lr_find")
    ] = None,
    cache_dir: CacheDir = None,
    as_json: Json = False,
) -> None:
    """Run fastai's LR finder on a fresh model: print its suggestions (valley, steep, minimum, slide) and the plot."""
    arguments = _flow_arguments(locals())
    from flows.train import lr_find as lr_find_flow

    result = _result_or_exit(lr_find_flow(**arguments, return_state=True))
    if as_json:
        _print_json(result)
        return
    for name, value in result["suggestions"].items():
        typer.echo(f"{name:>8}: {value:.2e}")
    typer.echo(f"Suggested base LR (valley): {result['suggestion']:.2e}; pass it to `pets train --base-lr`.")
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
    as_json: Json = False,
) -> None:
    """Label pictures with a model from MLflow (tracking store: $MLFLOW_TRACKING_URI or ./mlflow/mlflow.db)."""
    missing = [str(image) for image in images if not image.is_file()]
    if missing:
        _fail(f"no such image file: {', '.join(missing)}")
    from lib.serve.serving import serving_batch
    from tasks.tracking import load_served_model, tracking_uri

    try:
        model, metadata = load_served_model(model_uri)
    except Exception as error:  # MlflowException or an OSError, depending on where the URI stops resolving
        _fail(
            f"could not load the model {model_uri} from the tracking store {tracking_uri()}: {error}\n"
            "Train and register one with `pets train`, or point MLFLOW_TRACKING_URI at the store that holds it."
        )
    try:
        pictures = serving_batch(images, int(metadata["presize"]))
    except (OSError, ValueError) as error:
        _fail(f"could not read the pictures: {error}")
    probabilities = _softmax(np.asarray(model.predict(pictures), dtype=np.float64))
    predictions = [
        _top_k(str(image), row, metadata["vocab"], top_k) for image, row in zip(images, probabilities, strict=True)
    ]
    if as_json:
        _print_json(predictions)
        return
    for prediction in predictions:
        typer.echo(f"{prediction['image']}: {prediction['label']} ({prediction['probability']:.3f})")
        for other in prediction["top"][1:]:
            typer.echo(f"    {other['label']} ({other['probability']:.3f})")


@app.command()
def summary(
    data_url: DataUrl = None,
    data_dir: DataDir = None,
    label_pattern: LabelPattern = DEFAULT_LABEL_PATTERN,
    skip_unmatched: SkipUnmatched = False,
    valid_pct: ValidPct = DEFAULT_VALID_PCT,
    seed: Seed = DEFAULT_SEED,
    presize: Presize = DEFAULT_PRESIZE,
    sha256: Sha256 = None,
    out_dir: OutDir = None,
    cache_dir: CacheDir = None,
) -> None:
    """Run the data stage and print the DataBlock.summary analogue; write a show_batch grid."""
    arguments = _flow_arguments(locals())
    from flows.data import prepare_data

    state = prepare_data(**arguments, return_state=True)
    _print_summary(_result_or_exit(state))


@app.command()
def demo(
    breeds: Annotated[int, typer.Option(help="Breeds in the generated dataset.")] = DEMO_BREEDS,
    images_per_breed: Annotated[int, typer.Option(help="Images per breed.")] = DEMO_IMAGES_PER_BREED,
    epochs: Epochs = DEMO_EPOCHS,
    out_dir: Annotated[
        Path | None, typer.Option(help="Archive, data and run files.", show_default="./outputs/demo")
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Download and presize cache.", show_default="<out-dir>/cache")
    ] = None,
) -> None:
    """Run the whole recipe offline on the CPU: a generated pets-like dataset, a small resnet, MLflow, registry."""
    arguments = _flow_arguments(locals())
    from flows.demo import demo as demo_flow

    result = _result_or_exit(demo_flow(**arguments, return_state=True))
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
    from tasks.tracking import tracking_uri

    command, env = ui_command(host=host, port=port)
    typer.echo(f"MLflow UI on http://{host}:{port} for {tracking_uri()} (Ctrl-C stops it)")
    sys.stdout.flush()
    os.execvpe(command[0], command, env)  # the server replaces this process: Ctrl-C and SIGTERM reach it directly


@app.command("announce-dataset")
def announce_dataset(
    data_url: Annotated[
        str,
        typer.Argument(
            metavar="DATA_URL", help="http(s):// or file:// URL of the new dataset archive.", show_default=False
        ),
    ],
    name: Annotated[str, typer.Option(help="Dataset name: the event's resource is pets.dataset.<name>.")] = "pets",
) -> None:
    """Emit `pets.dataset.published` to the Prefect server at PREFECT_API_URL: the compare deployment trains on it."""
    from flows.events import DATASET_PUBLISHED, announce_dataset

    try:
        event_id = announce_dataset(data_url, name)
    except RuntimeError as error:
        _fail(str(error))
    typer.echo(f"Sent {DATASET_PUBLISHED} for pets.dataset.{name} ({data_url}); event id {event_id}.")


# -- helpers ----------------------------------------------------------------------------------------------------------
CLI_ONLY = ("as_json",)
PATH_PARAMETERS = ("data_dir", "out_dir", "cache_dir")


def _flow_arguments(options: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a command's options into flow parameters: one data source at most, absolute paths as strings."""
    arguments = {key: value for key, value in options.items() if key not in CLI_ONLY}
    if arguments.get("data_url") and arguments.get("data_dir"):
        raise typer.BadParameter("give --data-url or --data-dir, not both", param_hint="'--data-url' / '--data-dir'")
    for key in PATH_PARAMETERS:
        if arguments.get(key) is not None:
            arguments[key] = str(Path(arguments[key]).expanduser().resolve())
    return arguments


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
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return command, env


def _fail(message: str) -> NoReturn:
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(1)


def _result_or_exit(state) -> Any:
    """Return a finished flow's result; for a failed one print its error (the fix is in the message) and exit 1."""
    if state.is_completed():
        return state.result()
    _fail(str(state.result(raise_on_failure=False)))


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, default=str))


def _print_training(result: Mapping[str, Any], *, experiment: str | None = None, ui_hint: str = "`pets ui`") -> None:
    from tasks.tracking import run_url

    typer.echo(
        f"{result['arch']}: error_rate {result['error_rate']:.4f}, valid_loss {result['valid_loss']:.4f}; best epoch "
        f"{result['best_epoch']}, {result['epochs_trained']} epochs trained at base LR {result['base_lr']:.2e}"
    )
    typer.echo(
        f"Model: {result['model_uri']}, registered as models:/{result['registered_model']}/{result['model_version']}"
    )
    where = f" (experiment {experiment})" if experiment else ""
    typer.echo(f"MLflow run: {run_url(result)}{where}")
    typer.echo(f"Open the UI with {ui_hint}.")


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Return each row's class probabilities (shifted by the row's maximum, so exp cannot overflow)."""
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def _top_k(image: str, probabilities: np.ndarray, vocab: Sequence[str], k: int) -> dict[str, Any]:
    """Return a picture's k most likely labels, best first, with the best one also at the top level."""
    order = probabilities.argsort()[::-1][:k]
    top = [{"label": vocab[i], "probability": float(probabilities[i])} for i in order]
    return {"image": image, "label": top[0]["label"], "probability": top[0]["probability"], "top": top}


def _print_summary(result: dict) -> None:
    typer.echo(Path(result["summary"]).read_text())
    typer.echo(f"Summary written to {result['summary']}")
    typer.echo(f"show_batch grid written to {result['show_batch']}")
    typer.echo(f"Cleaning report: {result['cleaning_report']}")
