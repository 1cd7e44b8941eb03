"""The training stage: model and weights, schedules, precision, the fit loop, the LR finder, checkpoints, stages."""
