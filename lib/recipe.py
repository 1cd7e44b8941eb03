"""The chapter-5 recipe's defaults in one place (../shared/reference/fastai-recipe.md).

Nothing here imports anything, so the `pets` CLI can show them in its --help without loading torch or Prefect.
"""

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
DEFAULT_ARCH = "resnet50"  # fastbook ch. 5's last model (resnet50, fp16, fine_tune(6, freeze_epochs=3))
DEFAULT_ARCHS = ("resnet50", "resnet101")  # fastbook ch. 5: resnet50, then "try a deeper model"

DEFAULT_LABEL_PATTERN = r"(.+)_\d+.jpg$"  # fastbook ch. 5: RegexLabeller(pat=r'(.+)_\d+.jpg$')
DEFAULT_VALID_PCT = 0.2  # fastai RandomSplitter(valid_pct=0.2, seed=42)
DEFAULT_SEED = 42
DEFAULT_PRESIZE = 460  # fastbook ch. 5: item_tfms=Resize(460)
DEFAULT_SIZE = 224  # batch_tfms=aug_transforms(size=224, min_scale=0.75)
DEFAULT_MIN_SCALE = 0.75
DEFAULT_BATCH_SIZE = 64  # fastai DataLoaders: bs=64, val_bs=bs
MAX_DEFAULT_WORKERS = 16  # fastai: num_workers = min(16, cpus)
# Training on the CPU, the model's threads use every core and loader workers only take cores from it. The warm loader
# delivers ~15x what a CPU-trained resnet18 consumes (BENCHMARKS.md), so one worker per 8 cores keeps up.
CPU_CORES_PER_WORKER = 8

DEFAULT_FREEZE_EPOCHS = 3  # fastbook ch. 5's last model: fine_tune(6, freeze_epochs=3)
DEFAULT_EPOCHS = 6
DEFAULT_LR_MULT = 100  # fastai fine_tune default lr_mult
BASELINE_EPOCHS = 2  # the book's first model: fine_tune(2) with fastai's defaults
BASELINE_LR = 2e-3  # fastai fine_tune default base_lr
