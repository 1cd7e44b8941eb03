"""What the demo trains: a generated dataset and a random-init resnet18 at 64 px, a minute or two on two CPU cores.

No imports beyond the standard library, so `pets --help` stays quick. The recipe's own defaults are in lib/recipe.py.
"""

DEMO_BREEDS = 6
DEMO_IMAGES_PER_BREED = 24
DEMO_EPOCHS = 8  # on the demo data the best epoch comes before the last, so the retraining step runs too
DEMO_EXPERIMENT = "pets-demo"
# The demo's recipe, by option name (`Recipe.updated`): CPU, fp32 and no download (pretrained weights need the network).
DEMO_SETTINGS = {
    "arch": "resnet18",
    "pretrained": False,
    "presize": 96,
    "size": 64,
    "bs": 16,
    "freeze_epochs": 1,
    "epochs": DEMO_EPOCHS,
    "baseline_epochs": 1,
    "fp16": False,
    "device": "cpu",
    "workers": 0,  # two cores: worker processes cost more than they save on a dataset this small
    "experiment": DEMO_EXPERIMENT,
    "registered_model": "pets-demo-classifier",
}
