"""The `pets` command line: `pets summary`, `pets demo`. Flags mirror the flow parameters in kebab-case."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from lib.labelling import DEFAULT_LABEL_PATTERN
from lib.presize import DEFAULT_PRESIZE
from lib.splitting import DEFAULT_SEED, DEFAULT_VALID_PCT

app = typer.Typer(
    help="Train and compare pet-breed classifiers the fastai way (fastbook ch. 5) on Prefect, PyTorch and MLflow.",
    no_args_is_help=True,
    add_completion=False,
)

DataUrl = Annotated[
    str | None,
    typer.Option(
        help="http(s):// or file:// URL of a .tgz/.tar/.zip archive of images [default: the Oxford-IIIT Pet "
        "archive, when --data-dir is not given either]"
    ),
]
DataDir = Annotated[Path | None, typer.Option(help="Local folder of images, used instead of downloading.")]
LabelPattern = Annotated[str, typer.Option(help="Regex searched in each file name; its first group is the label.")]
SkipUnmatched = Annotated[bool, typer.Option(help="Report and leave out files the label pattern does not match.")]
ValidPct = Annotated[float, typer.Option(help="Fraction of the images held out for validation.")]
Seed = Annotated[int, typer.Option(help="Seed of the random split and of the crops.")]
Presize = Annotated[int, typer.Option(help="Short side in pixels of the images cached once before training.")]
OutDir = Annotated[Path | None, typer.Option(help="Where manifests, reports and plots go [default: ./outputs/data].")]
CacheDir = Annotated[
    Path | None, typer.Option(help="Downloads and presize cache [default: $PETS_HOME or ~/.cache/pets].")
]
Sha256 = Annotated[str | None, typer.Option(help="Expected sha256 of the downloaded archive.")]


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
    if data_url and data_dir:
        raise typer.BadParameter("give --data-url or --data-dir, not both")
    from flows.data import prepare_data

    state = prepare_data(
        data_url=data_url,
        data_dir=str(data_dir) if data_dir else None,
        label_pattern=label_pattern,
        skip_unmatched=skip_unmatched,
        valid_pct=valid_pct,
        seed=seed,
        presize=presize,
        sha256=sha256,
        out_dir=str(out_dir) if out_dir else None,
        cache_dir=str(cache_dir) if cache_dir else None,
        return_state=True,
    )
    _print_summary(_result_or_exit(state))


@app.command()
def demo(
    breeds: Annotated[int, typer.Option(help="Breeds in the generated dataset.")] = 6,
    images_per_breed: Annotated[int, typer.Option(help="Images per breed.")] = 24,
    presize: Presize = 160,
    out_dir: OutDir = None,
    cache_dir: CacheDir = None,
) -> None:
    """Run the pipeline offline on a generated pets-like dataset, served as a .tgz from a file:// URL."""
    from flows.data import prepare_data
    from lib.synthetic import make_pets_dataset, pack_tgz

    out_dir = out_dir or Path("outputs") / "demo"
    archive = out_dir / f"synthetic-pets-{breeds}x{images_per_breed}.tgz"
    if not archive.is_file():  # generated once: the download stage then serves it from its cache
        with tempfile.TemporaryDirectory() as source:
            images = make_pets_dataset(
                Path(source), breeds=breeds, images_per_breed=images_per_breed, broken=True, odd_modes=True
            )
            pack_tgz(images, archive)
    state = prepare_data(
        data_url=archive.resolve().as_uri(),
        presize=presize,
        out_dir=str(out_dir),
        cache_dir=str(cache_dir or out_dir / "cache"),
        return_state=True,
    )
    _print_summary(_result_or_exit(state))


def _result_or_exit(state) -> dict:
    """Return a finished flow's result; for a failed one print its error (the fix is in the message) and exit 1."""
    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    typer.secho(f"Error: {error}", err=True, fg=typer.colors.RED)
    raise typer.Exit(1)


def _print_summary(result: dict) -> None:
    typer.echo(Path(result["summary"]).read_text())
    typer.echo(f"Summary written to {result['summary']}")
    typer.echo(f"show_batch grid written to {result['show_batch']}")
    typer.echo(f"Cleaning report: {result['cleaning_report']}")
