"""Progress of a long step as a Prefect progress artifact: the bar a flow run's page shows while the step runs.

lib/ reports progress through a plain `on_progress(done, total)` callable (lib/common/progress.py); a task passes it
a `ProgressArtifact`. Every update is a call to the Prefect API, so updates are thinned out: at most one per
percentage point and per half second, plus the last one.
"""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact

MIN_STEP_PERCENT = 1.0
MIN_INTERVAL_SECONDS = 0.5


class ProgressArtifact:
    """A progress artifact (0-100%) of the running flow or task, created at the first report of work to do."""

    def __init__(self, description: str):
        self.description = description
        self.artifact_id = None
        self.shown = 0.0
        self.shown_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        """Move the bar to done / total (an empty total creates nothing: there was no work to show)."""
        if total <= 0:
            return
        percent = min(100.0, 100.0 * done / total)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, description=self.description)
        elif (percent >= 100.0 > self.shown) or (
            percent - self.shown >= MIN_STEP_PERCENT and time.monotonic() - self.shown_at >= MIN_INTERVAL_SECONDS
        ):
            update_progress_artifact(self.artifact_id, percent)
        else:
            return
        self.shown, self.shown_at = percent, time.monotonic()  # after the call: a slow API does not count as waiting

    def finish(self) -> None:
        """Show 100% (a step that stopped early, such as a diverging LR sweep, is done too)."""
        if self.artifact_id is not None and self.shown < 100.0:
            update_progress_artifact(self.artifact_id, 100.0)
            self.shown = 100.0
