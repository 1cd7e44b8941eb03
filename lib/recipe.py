"""The training recipe: every setting, its default, its bounds, its help text and where the default comes from.

One frozen pydantic model per concern (data, model, schedule, runtime, tracking) composed into `Recipe`. The Prefect
flows take a `Recipe` (Prefect shows it as a form and validates it before a run starts), the `pets` CLI builds its
options from its fields, and MLflow gets its fields as params under dotted names (`data.bs`, `schedule.base_lr`).
Adding a setting is adding a field here.

Only pydantic is imported (yaml when a recipe file is read or written, torch when a device is checked), so `pets
--help` stays quick. `Recipe.check_runnable()` checks what only this machine can tell (folders, the device): the CLI
calls it before anything starts, and the flows again where they run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lib.common.errors import UserError

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
DEFAULT_ARCH = "resnet50"  # fastbook 05_pet_breeds.ipynb's last model: resnet50, fp16, fine_tune(6, freeze_epochs=3)
Architecture = Literal[ARCHITECTURES]  # an enum in Prefect's form; a bad name is refused, listing the good ones
DEFAULT_ARCHS = ("resnet50", "resnet101")  # fastbook ch. 5: resnet50, then "try a deeper model"

DEFAULT_LABEL_PATTERN = r"(.+)_\d+.jpg$"  # fastbook ch. 5: RegexLabeller(pat=r'(.+)_\d+.jpg$')
# Where labels come from (lib/data/labelling.py); `auto` picks one of the others from the data's layout.
LABEL_SOURCES = ("regex", "folder", "csv", "split-folders")
LabelSource = Literal["auto", *LABEL_SOURCES]
# fastai 2.8.12 data/transforms.py: ColReader's columns as Kaggle's train.csv names them; ColSplitter's 'is_valid'
DEFAULT_FNAME_COL, DEFAULT_LABEL_COL, DEFAULT_VALID_COL = "fname", "label", "is_valid"
# fastai's GrandparentSplitter(train_name='train', valid_name='valid'); `val` is ImageNet's and PyTorch's
# transfer-learning tutorial's, `validation` Hugging Face imagefolder's.
DEFAULT_TRAIN_FOLDER, DEFAULT_VALID_FOLDERS, DEFAULT_TEST_FOLDER = "train", ("valid", "val", "validation"), "test"
DEFAULT_MAX_UNLABELLED = 0.05  # more than 5% of the images without a label means the labelling is wrong, not the data
DEFAULT_VALID_PCT = 0.2  # fastai 2.8.12 fastai/data/transforms.py: RandomSplitter(valid_pct=0.2, seed=None)
DEFAULT_SEED = 42  # fastbook ch. 5 passes seed=42 to RandomSplitter
# imagededup 0.3 imagededup/methods/hashing.py: find_duplicates(max_distance_threshold=10) for its 64-bit hashes
DEFAULT_DUPLICATE_DISTANCE = 10
# cleanlab 2.9 cleanlab/count.py estimate_cv_predicted_probabilities(cv_n_folds=5): K-fold out-of-sample probabilities
DEFAULT_FOLDS = 5
LABEL_REVIEWS = ("losses", "oof", "off")  # in-sample top losses after the baseline (the book's way), out-of-fold, none
DEFAULT_REVIEW_PER_CLASS = 8  # pictures per class on the top-losses contact sheet
DEFAULT_PRESIZE = 460  # fastbook ch. 5: item_tfms=Resize(460)
DEFAULT_SIZE = 224  # fastbook ch. 5: batch_tfms=aug_transforms(size=224, min_scale=0.75)
DEFAULT_MIN_SCALE = 0.75
DEFAULT_BATCH_SIZE = 64  # fastai 2.8.12 fastai/data/core.py: DataLoaders bs=64, val_bs=bs
# An archive is refused, before its data is read, past either limit (lib/data/source.py: a zip or tar bomb). The
# Oxford-IIIT Pet archive is ~0.8 GB holding ~15k members: 25x and 13x margins.
DEFAULT_MAX_ARCHIVE_BYTES = 20 * 10**9
DEFAULT_MAX_ARCHIVE_MEMBERS = 200_000
MAX_DEFAULT_WORKERS = 16  # fastai 2.8.12 fastai/data/load.py: num_workers = min(16, defaults.cpus)
# Training on the CPU, the model's threads use every core and loader workers only take cores from it. The warm loader
# delivers ~15x what a CPU-trained resnet18 consumes (BENCHMARKS.md), so one worker per 8 cores keeps up.
CPU_CORES_PER_WORKER = 8

# torchrun's rendezvous waits 600 s for the nodes by default (torch 2.x torch/distributed/elastic/rendezvous/
# static_tcp_rendezvous.py, _default_timeout_seconds)
DEFAULT_RDZV_TIMEOUT = 600
# The runtime settings of data-parallel training: a command that trains nothing (`pets predict-images`) has none.
DATA_PARALLEL_SETTINGS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_timeout")
DEFAULT_FREEZE_EPOCHS = 3  # fastbook ch. 5's last model: fine_tune(6, freeze_epochs=3)
DEFAULT_EPOCHS = 6
DEFAULT_LR_MULT = 100  # fastai 2.8.12 fastai/callback/schedule.py: fine_tune(..., lr_mult=100)
BASELINE_EPOCHS = 2  # fastbook ch. 5's first model: learn.fine_tune(2) with fastai's defaults
BASELINE_LR = 2e-3  # fastai 2.8.12 fastai/callback/schedule.py: fine_tune(..., base_lr=2e-3)

DEFAULT_EXPERIMENT = "pets"
DEFAULT_REGISTERED_MODEL = "pets-classifier"
CHAMPION_ALIAS = "champion"  # the registry alias the compare flow and `pets promote` move
DEFAULT_PREDICT_EXPERIMENT = "pets-predictions"  # batch predictions have their own runs, apart from the trainings
# TorchServe's image classifier answers the top 5 classes (pytorch/serve ts/torch_handler/image_classifier.py,
# topk=5), as the served contract does (lib/serve/contract.py DEFAULT_TOP_K; it cannot import this module).
PREDICT_TOP_K = 5


class RecipeError(UserError, ValueError):
    """A recipe file or setting the recipe refuses; the message names the option (`--bs`) or file and what is wrong."""


class Section(BaseModel):
    """A group of settings: immutable, and unknown names are refused (a typo must not train for hours)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)  # defaults get their types too


def _option(name: str) -> dict[str, str]:
    """Give a field a command-line option name other than its own (`data.url` is `--data-url`)."""
    return {"option": name}


class DataSettings(Section):
    """Where the images come from, how they are labelled, split, presized, cropped and batched."""

    url: str | None = Field(
        None,
        description="http(s):// or file:// URL of a .tgz/.tar/.zip archive of images; without it and --data-dir, "
        "the Oxford-IIIT Pet archive.",
        json_schema_extra=_option("data_url"),
    )
    dir: str | None = Field(
        None, description="Local folder of images, used instead of downloading.", json_schema_extra=_option("data_dir")
    )
    sha256: str | None = Field(None, description="Expected sha256 of the downloaded archive.")
    max_archive_bytes: int = Field(
        DEFAULT_MAX_ARCHIVE_BYTES,
        ge=1,
        description="Largest total size in bytes of an archive's files once extracted (against zip bombs); a larger "
        "archive is refused.",
    )
    max_archive_members: int = Field(
        DEFAULT_MAX_ARCHIVE_MEMBERS,
        ge=1,
        description="Most members (files, folders, links) an archive may hold; one with more is refused.",
    )
    labels: LabelSource = Field(
        "auto",
        description="Where labels come from: regex (over each image's path under the data root), folder (its class "
        "folder), csv (--labels-csv), split-folders (train/ and valid/ holding class folders), or auto: split "
        "folders, else class folders, else the regex; a --labels-csv given always wins.",
    )
    label_pattern: str = Field(
        DEFAULT_LABEL_PATTERN,
        description="With --labels regex: searched in each image's path relative to the data root (a file name for "
        "images at the root); its first group is the label.",
    )
    labels_csv: str | None = Field(
        None,
        description="A CSV of file names and labels (a path, a path under the data root, or an http(s):// URL); "
        "naming one makes --labels auto use it.",
    )
    fname_col: str = Field(
        DEFAULT_FNAME_COL, min_length=1, description="The CSV's column of file names, relative to the data root."
    )
    label_col: str = Field(DEFAULT_LABEL_COL, min_length=1, description="The CSV's column of labels.")
    valid_col: str = Field(
        DEFAULT_VALID_COL,
        min_length=1,
        description="The CSV's optional boolean column that puts a row in validation; without it the split is random.",
    )
    train_folder: str = Field(
        DEFAULT_TRAIN_FOLDER, min_length=1, description="With split folders: the folder of training images."
    )
    valid_folders: tuple[str, ...] = Field(
        DEFAULT_VALID_FOLDERS,
        min_length=1,
        description="With split folders: the names recognised for the validation folder (comma-separated).",
    )
    test_folder: str = Field(
        DEFAULT_TEST_FOLDER,
        min_length=1,
        description="With split folders: a folder of test images, counted and left out of training.",
    )
    max_unlabelled: float = Field(
        DEFAULT_MAX_UNLABELLED,
        ge=0,
        le=1,
        description="Largest fraction of the images (or CSV rows) that may go without a label: they are listed and "
        "left out; more refuses the data.",
    )
    valid_pct: float = Field(
        DEFAULT_VALID_PCT, gt=0, lt=1, description="Fraction of the images held out for validation."
    )
    seed: int | None = Field(
        DEFAULT_SEED, description="Seed of the random split, the crops and the model's random init (none: random)."
    )
    find_duplicates: bool = Field(
        True,
        description="Find near-duplicate images (perceptual hashes within --duplicate-distance bits) and keep each "
        "group on one side of the split; exact copies are used once.",
    )
    duplicate_distance: int = Field(
        DEFAULT_DUPLICATE_DISTANCE,
        ge=0,
        le=64,
        description="Most bits two 64-bit perceptual hashes may differ in for their images to be near-duplicates.",
    )
    exclude_conflicting_duplicates: bool = Field(
        False,
        description="Leave out every image of a near-duplicate group whose images carry different labels (they are "
        "always listed in duplicates.csv).",
    )
    overrides: str | None = Field(
        None,
        description="Review decisions to apply: an overrides file `pets review apply` wrote, or a reviewed "
        "review.csv; images deleted or relabelled without touching the originals.",
    )
    presize: int = Field(
        DEFAULT_PRESIZE, ge=8, description="Short side in pixels of the images cached before training."
    )
    size: int = Field(
        DEFAULT_SIZE, ge=8, description="Training crop size in pixels (random resized crop, at most presize)."
    )
    min_scale: float = Field(
        DEFAULT_MIN_SCALE, gt=0, le=1, description="Smallest fraction of the picture a training crop keeps."
    )
    bs: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="Batch size (training and validation).")
    workers: int | None = Field(
        None,
        ge=0,
        description=f"DataLoader worker processes; default min({MAX_DEFAULT_WORKERS}, CPUs) with a GPU, "
        f"CPUs // {CPU_CORES_PER_WORKER} on the CPU.",
    )

    @field_validator("label_pattern")
    @classmethod
    def _a_regex_with_a_group(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"'{pattern}' is not a valid regular expression ({error})") from None
        if compiled.groups < 1:
            raise ValueError(f"'{pattern}' needs a group, e.g. '(.+)_\\d+.jpg$': its first group is the label")
        return pattern

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, settings: Any) -> Any:
        """Accept recipe files written before a setting was retired: `skip_unmatched` became max_unlabelled."""
        if isinstance(settings, dict) and "skip_unmatched" in settings:
            settings = {key: value for key, value in settings.items() if key != "skip_unmatched"}
        return settings

    @field_validator("labels", "labels_csv", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any, info) -> Any:
        """An empty value is the default: what an event trigger's template renders for a payload key it lacks."""
        return cls.model_fields[info.field_name].default if value == "" else value

    @field_validator("valid_folders", mode="before")
    @classmethod
    def _comma_separated(cls, names: Any) -> Any:
        if isinstance(names, str):
            names = [name.strip() for name in names.split(",") if name.strip()]
        return names

    @field_validator("sha256")
    @classmethod
    def _a_sha256(cls, digest: str | None) -> str | None:
        if digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", digest.strip()):
            raise ValueError(f"{digest!r} is not a sha256: give its 64 hexadecimal digits")
        return digest

    @model_validator(mode="after")
    def _one_source(self) -> DataSettings:
        if self.url and self.dir:
            raise ValueError("give --data-url or --data-dir, not both")
        if self.labels == "csv" and not self.labels_csv:
            raise ValueError("--labels csv needs --labels-csv FILE: the CSV of file names and labels (or its URL)")
        return self

    def check_trainable(self) -> None:
        """Refuse a training crop larger than the presized images (the data stage alone does not crop)."""
        if self.size > self.presize:
            raise RecipeError(
                f"--size {self.size} is larger than --presize {self.presize}: presize to at least the training size"
            )


class ModelSettings(Section):
    """The network: a torchvision resnet body with fastai's head."""

    arch: Architecture = Field(DEFAULT_ARCH, description="Model architecture.")
    pretrained: bool = Field(
        True, description="Start from ImageNet weights; --no-pretrained starts from random weights (no download)."
    )


class ScheduleSettings(Section):
    """fastai's fine_tune: frozen epochs, then unfrozen epochs with discriminative LRs; a baseline and a retrain."""

    freeze_epochs: int = Field(DEFAULT_FREEZE_EPOCHS, ge=0, description="Epochs training only the new head first.")
    epochs: int = Field(DEFAULT_EPOCHS, ge=1, description="Epochs of the whole model after unfreezing.")
    base_lr: float | None = Field(
        None, gt=0, description="Base learning rate; default: the LR finder's valley suggestion."
    )
    lr_mult: float = Field(DEFAULT_LR_MULT, gt=0, description="Ratio of the head's to the first layers' learning rate.")
    baseline: bool = Field(True, description="First train the book's baseline: fastai's fine_tune defaults.")
    baseline_epochs: int = Field(BASELINE_EPOCHS, ge=1, description="Epochs of the baseline.")
    retrain: bool = Field(True, description="Retrain from scratch for the best epoch count when it is not the last.")
    tta: bool = Field(
        True,
        description="Also evaluate the final model with test-time augmentation (fastai's tta: 4 augmented validation "
        "passes blended with the plain one) and log tta_error_rate.",
    )

    @field_validator("base_lr")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class RuntimeSettings(Section):
    """Where and how it runs: device, precision, compilation, and where files go."""

    fp16: bool = Field(True, description="Mixed precision on a CUDA GPU; fp32 on other devices.")
    device: str | None = Field(None, description="Torch device, e.g. cuda:1 or cpu; default CUDA, else MPS, else CPU.")
    compile: bool = Field(False, description="torch.compile the model (about a minute of compiling first).")
    # How a CPU reduction is split depends on the thread count, so fp32 results differ in the last bits between thread
    # counts and training drifts apart from there (tests/lib/test_stages.py shows it). A fixed count repeats a CPU run
    # on another machine; torch's default is one thread per core.
    threads: int | None = Field(
        None, ge=1, description="CPU threads of training and evaluation (repeatable CPU runs); default one per core."
    )
    out_dir: str | None = Field(
        None, description="Where results go; default ./outputs/<command> (a training run: <out-dir>/<run id>/)."
    )
    cache_dir: str | None = Field(None, description="Downloads and presize cache; default $PETS_HOME or ~/.cache/pets.")
    # Data-parallel training (lib/train/distributed.py): torchrun's settings, under its own names (PyTorch 2.x docs,
    # "torchrun (Elastic Launch)"). --bs stays the global batch: each of the world's processes takes an equal share.
    nproc_per_node: str = Field(
        "1",
        pattern=r"^([1-9][0-9]*|auto)$",
        description="Training processes on this node (torchrun --nproc-per-node), one per GPU, each taking an equal "
        "share of --bs; auto: one per visible GPU (one without a GPU).",
    )
    nnodes: int = Field(
        1, ge=1, description="Nodes each training spans (torchrun --nnodes); the others run `pets join-training`."
    )
    node_rank: int = Field(0, ge=0, description="This node's rank among --nnodes; node 0 runs the flow and logs.")
    rdzv_endpoint: str | None = Field(
        None,
        pattern=r"^[^\s:]+:[0-9]+$",
        description="host:port on node 0 where the nodes meet (torchrun --rdzv-endpoint); needed with --nnodes > 1.",
    )
    rdzv_timeout: int = Field(
        DEFAULT_RDZV_TIMEOUT, ge=1, description="Seconds every node has to join a training before it fails."
    )

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _count_as_text(cls, value: Any) -> Any:
        """A recipe file may give the count as a number (`nproc_per_node: 8`)."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _nodes(self) -> RuntimeSettings:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes} (ranks count from 0)")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, an address of node 0 every node can reach"
            )
        return self

    def check_runnable(self) -> None:
        """Refuse, naming the option, folders that cannot be and a device this machine lacks."""
        for option, folder in (("--out-dir", self.out_dir), ("--cache-dir", self.cache_dir)):
            _check_folder(option, folder)
        if self.device is not None:
            _check_device(self.device)

    def check_processes(self) -> int:
        """Refuse more training processes than this node has GPUs; return how many it starts."""
        processes = self.processes_per_node()
        if processes > 1:
            _check_gpu_count(self.device, processes, asked=self.nproc_per_node)
        return processes

    def processes_per_node(self) -> int:
        """The training processes this node starts: `nproc_per_node`, with auto as the visible GPUs (1 with none)."""
        if self.nproc_per_node != "auto":
            return int(self.nproc_per_node)
        if self.device is not None and not self.device.startswith("cuda"):
            return 1
        import torch  # only here: `pets --help` stays quick

        return max(1, torch.cuda.device_count())

    @property
    def precision(self) -> str:
        """The precision asked for: fp16 where the device allows it, else fp32 (`Recipe.precision`)."""
        return "fp16" if self.fp16 else "fp32"


class PredictSettings(Section):
    """Batch prediction (`pets predict-images`): which registered model version labels the images, and how.

    Not part of `Recipe`: a prediction trains nothing. Its runtime (device, fp16, folders) is a `RuntimeSettings`.
    """

    registered_model: str = Field(
        DEFAULT_REGISTERED_MODEL,
        min_length=1,
        description="MLflow registered model whose version labels the images.",
        json_schema_extra=_option("model"),
    )
    alias: str = Field(
        CHAMPION_ALIAS, min_length=1, description="Registry alias naming the version; resolved once, as the run starts."
    )
    version: str | None = Field(None, description="A model version (3 or v3) to use instead of the alias.")
    top_k: int = Field(PREDICT_TOP_K, ge=1, description="Classes in each row's top_k, best first.")
    probabilities: bool = Field(
        False, description="Also write every class's probability per image (a JSON `probabilities` column)."
    )
    tta: bool = Field(
        False,
        description="Test-time augmentation (fastai's tta): blend 4 seeded augmented views of each picture with the "
        "plain one (5 predictions per picture).",
    )
    bs: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="Pictures per batch on the device.")
    workers: int | None = Field(
        None,
        ge=0,
        description=f"DataLoader worker processes decoding pictures; default min({MAX_DEFAULT_WORKERS}, CPUs) with a "
        f"GPU, CPUs // {CPU_CORES_PER_WORKER} on the CPU.",
    )
    experiment: str = Field(
        DEFAULT_PREDICT_EXPERIMENT, min_length=1, description="MLflow experiment the prediction runs go to."
    )


class ReviewSettings(Section):
    """Model-guided data review: which images look mislabelled, ranked for a person to keep, delete or relabel."""

    label_review: Literal[LABEL_REVIEWS] = Field(
        "losses",
        description="How candidates are ranked: losses (the baseline's top losses), oof (out-of-fold confident "
        "learning over --folds baseline models) or off.",
    )
    folds: int = Field(DEFAULT_FOLDS, ge=2, description="Folds (baseline models) of --label-review oof.")
    review_per_class: int = Field(
        DEFAULT_REVIEW_PER_CLASS, ge=1, description="Top candidates per class on the review contact sheets."
    )


class TrackingSettings(Section):
    """Where MLflow records the run and registers its model."""

    experiment: str = Field(DEFAULT_EXPERIMENT, min_length=1, description="MLflow experiment the runs go to.")
    registered_model: str = Field(
        DEFAULT_REGISTERED_MODEL,
        min_length=1,
        description="MLflow registered model the trained model becomes a version of.",
    )


class Recipe(Section):
    """The whole recipe. `Recipe()` is fastbook chapter 5's last model on the Oxford-IIIT Pet archive."""

    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    review: ReviewSettings = ReviewSettings()
    tracking: TrackingSettings = TrackingSettings()

    def check_runnable(self, *, training: bool = True) -> None:
        """Refuse, naming the option, what cannot run on this machine: folders that are not, a device it lacks.

        With `training`, also a crop larger than the presize (`DataSettings.check_trainable`) and the device (the data
        stage alone uses none). Only file-system checks, plus importing torch to check a device other than cpu.
        """
        if training:
            self.data.check_trainable()
        if self.data.dir is not None and not Path(self.data.dir).expanduser().is_dir():
            what = "is not a folder" if Path(self.data.dir).expanduser().exists() else "does not exist"
            raise RecipeError(f"--data-dir {self.data.dir} {what}: pass the folder that holds the images")
        if self.data.overrides is not None and not Path(self.data.overrides).expanduser().is_file():
            raise RecipeError(
                f"--overrides {self.data.overrides} is not a file: pass the overrides file `pets review apply` wrote "
                "(or a reviewed review.csv)"
            )
        for option, folder in (("--out-dir", self.runtime.out_dir), ("--cache-dir", self.runtime.cache_dir)):
            _check_folder(option, folder)
        if training and self.runtime.device is not None:
            _check_device(self.runtime.device)
        if training:
            self.check_processes()

    def check_processes(self) -> None:
        """Refuse more training processes than this node has GPUs, and a batch they cannot share equally."""
        runtime = self.runtime
        processes = runtime.check_processes()
        world = processes * runtime.nnodes
        if self.data.bs % world:
            raise RecipeError(
                f"--bs {self.data.bs} does not split equally over {world} training processes (--nproc-per-node "
                f"{processes} x --nnodes {runtime.nnodes}): --bs is the global batch, so give a multiple of {world}"
            )

    @property
    def precision(self) -> str:
        """The precision the training stages ask for: fp16 where the device allows it, else fp32."""
        return "fp16" if self.runtime.fp16 else "fp32"

    def params(self) -> dict[str, Any]:
        """Every setting under its dotted name (`data.bs`): what MLflow records for a run."""
        return {f"{section}.{name}": getattr(getattr(self, section), name) for section, name in fields()}

    def updated(self, options: Mapping[str, Any]) -> Recipe:
        """Return a copy with settings replaced by option name (`bs`, `data_url`), validated as a whole."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; the recipe's settings are {', '.join(OPTIONS)}")
        tree = self.model_dump()
        for option, value in options.items():
            section, name = OPTIONS[option]
            tree[section][name] = value
        return Recipe.model_validate(tree)

    def save(self, path: str | Path) -> Path:
        """Write the recipe as YAML (a .json name gets JSON); `Recipe.load` reads it back equal."""
        path = Path(path)
        tree = self.model_dump(mode="json")
        if path.suffix == ".json":
            text = json.dumps(tree, indent=1) + "\n"
        else:
            import yaml

            text = yaml.safe_dump(tree, sort_keys=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe file (YAML or JSON, any sections and settings left out keep their defaults)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".json":
            tree = json.loads(text)  # its error is a ValueError that names the line and column
        else:
            import yaml

            try:
                tree = yaml.safe_load(text)
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(error, "problem", None) or type(error).__name__
                raise RecipeError(f"{path} is not valid YAML{where}: {problem}") from None
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path} holds no recipe: expected a mapping of sections (data, model, ...)")
        return cls.model_validate(tree)


def _check_folder(option: str, folder: str | None) -> None:
    """Refuse a folder option that names a file, or lies under one (it could never be created)."""
    if folder is None:
        return
    path = Path(folder).expanduser().absolute()
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise RecipeError(f"{option} {folder} {where}: give a folder (it is created if missing)")


def _check_device(device: str) -> None:
    """Refuse a torch device this machine does not have (`--device cuda` without a GPU), naming the ones it has."""
    if device == "cpu":
        return
    import torch  # only here: `pets --help` and a CPU run's check stay quick

    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise RecipeError(f"--device {device} is not a torch device ({error}); e.g. cpu, cuda or cuda:1") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(parsed.type, False):
        have = ", ".join(name for name, present in available.items() if present)
        raise RecipeError(f"--device {device}: this machine has no {parsed.type} device; it has {have}")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise RecipeError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )


def _check_gpu_count(device: str | None, processes: int, *, asked: str) -> None:
    """Refuse several processes on one device that is not the CPU's: each process of a GPU training takes a GPU."""
    import torch

    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return  # gloo on the CPU: the processes share the cores
    if kind != "cuda":
        raise RecipeError(f"--nproc-per-node {asked}: data-parallel training runs on CUDA GPUs or the CPU, not {kind}")
    if device and torch.device(device).index is not None:
        raise RecipeError(
            f"--device {device} names one GPU, but --nproc-per-node {asked} starts {processes} processes, one per "
            "GPU: pass --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    visible = torch.cuda.device_count()
    if processes > visible:
        raise RecipeError(
            f"--nproc-per-node {asked} asks for {processes} processes, one per GPU, but this node has {visible} "
            f"visible GPU(s): pass at most {visible}, or auto (CUDA_VISIBLE_DEVICES decides which are visible)"
        )


SECTIONS: dict[str, type[Section]] = {name: field.annotation for name, field in Recipe.model_fields.items()}


def fields() -> Iterator[tuple[str, str]]:
    """Yield (section, setting) for every setting of the recipe, in declaration order."""
    for section, model in SECTIONS.items():
        yield from ((section, name) for name in model.model_fields)


def option_name(section: str, name: str) -> str:
    """The setting's name on the command line (`--data-url` for data.url) and in flat mappings."""
    return field_option(SECTIONS[section], name)


def field_option(model: type[Section], name: str) -> str:
    """The command-line name of a section's field: its own, or the one `_option` gave it."""
    extra = model.model_fields[name].json_schema_extra or {}
    return extra.get("option", name)


OPTIONS: dict[str, tuple[str, str]] = {option_name(section, name): (section, name) for section, name in fields()}
assert len(OPTIONS) == sum(len(model.model_fields) for model in SECTIONS.values()), "option names must be unique"


def describe_error(error: ValidationError) -> str:
    """Turn pydantic's report into one line per bad setting, named as its command-line option."""
    lines = []
    for problem in error.errors():
        location = [str(part) for part in problem["loc"]]
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "is not a setting of the recipe"
        if len(location) >= 2 and location[0] in SECTIONS and location[1] in SECTIONS[location[0]].model_fields:
            lines.append(f"--{option_name(location[0], location[1]).replace('_', '-')}: {message}")
        elif problem["type"] == "value_error":  # a check of several settings: its message names them
            lines.append(message)
        else:
            lines.append(f"{'.'.join(location) or 'recipe'}: {message}")
    return "; ".join(lines)
