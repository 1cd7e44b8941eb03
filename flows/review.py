"""The label review inside the training flow: which images look mislabelled, ranked as the recipe's review says."""

from __future__ import annotations

from pathlib import Path

from lib.recipe import Recipe
from tasks import tracking
from tasks.label_issues import out_of_fold_review
from tasks.review import publish_review, review_top_losses


def review_labels(
    recipe: Recipe, run: tracking.TrainingRun, data: dict, baseline: dict | None, out_dir: Path
) -> dict | None:
    """Rank the data's images for review by `review.label_review`; return the review's files, or None for none.

    losses: the baseline model's loss on every image, as fastai's ImageClassifierCleaner ranks them (the book's way).
    oof: `review.folds` more baselines, each trained on the other folds, rank every image by the held-out
    probability of its label (confident learning, tasks/label_issues.py); it needs no baseline of the run's own.
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
        ranking = "the baseline's losses, largest first per class"
        publish_review(run, review, ranking=ranking)
        return {**review, "ranking": ranking}
    # oof: K baselines, each on K-1 folds, and confident learning over their held-out probabilities
    review = out_of_fold_review(data["manifest"], data["vocab"], str(out_dir), recipe, run.run_id)
    ranking = f"out of fold over {recipe.review.folds} baselines: cleanlab self-confidence, lowest first per class"
    publish_review(run, review, ranking=ranking)
    return {**review, "ranking": ranking}
