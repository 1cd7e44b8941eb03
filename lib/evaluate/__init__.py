"""The evaluation stage: validation predictions and their interpretation (fastai's ClassificationInterpretation)."""
