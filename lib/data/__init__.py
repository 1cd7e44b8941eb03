"""The data stage: download, label, clean, split, presize, summarise, load and augment (fastai's DataBlock)."""
