"""The label review inside the training flow: which images look mislabelled, ranked as the recipe's review says."""

from __future__ import annotations

from pathlib import Path

from lib.recipe import Recipe
from tasks import tracking
from tasks.review import publish_review, review_top_losses


def review_labels(
    recipe: Recipe, run: tracking.TrainingRun, data: dict, baseline: dict | None, out_dir: Path
) -> dict | None:
    """Rank the data's images for review by `review.label_review`; return the review's files, or None for none.

    losses: the baseline model's loss on every image, as fastai's ImageClassifierCleaner ranks them (the book's way).
    The table and contact sheets go to `<out_dir>/review/`, the MLflow run and a Prefect artifact.
    """
    mode = recipe.review.label_review
    if mode == "off":
        return None
    if mode == "losses":
        if baseline is None:
            print("No label review: it ranks the baseline model's losses, and --no-baseline trains none.")
            return None
        review = review_top_losses(baseline["model"], data["manifest"], data["vocab"], str(out_dir), recipe)
        publish_review(run, review, ranking="the baseline's losses, largest first per class")
        return review
    print(f"No label review: --label-review {mode} is not available in this version; use losses or off.")
    return None
