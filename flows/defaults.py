"""Where the flows put results unless told otherwise, and what the demo trains: read by the flows and the CLI.

No imports beyond the standard library, so `pets --help` stays quick.
"""

DEFAULT_EXPERIMENT = "pets"
DEFAULT_REGISTERED_MODEL = "pets-classifier"

DEMO_EXPERIMENT = "pets-demo"
DEMO_REGISTERED_MODEL = "pets-demo-classifier"
# A generated dataset and a random-init resnet18 at 64 px: a minute or two on two CPU cores.
DEMO_BREEDS = 6
DEMO_IMAGES_PER_BREED = 24
DEMO_ARCH = "resnet18"
DEMO_PRESIZE = 96
DEMO_SIZE = 64
DEMO_BATCH_SIZE = 16
DEMO_FREEZE_EPOCHS = 1
DEMO_EPOCHS = 8  # on the demo data the best epoch comes before the last, so the retraining step runs too
DEMO_BASELINE_EPOCHS = 1
