"""tasks/progress.py: a Prefect progress artifact per long step, created when there is work, moved sparingly."""

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

from tasks import progress as progress_module
from tasks.progress import ProgressArtifact

pytestmark = pytest.mark.usefixtures("prefect_harness")


def shown(artifact_id) -> float:
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))
    assert artifact.type == "progress"
    return float(artifact.data)


def test_the_artifact_appears_with_the_first_work_is_updated_sparingly_and_ends_at_100(monkeypatch):
    updates = []
    real_update = progress_module.update_progress_artifact

    def counted(artifact_id, progress):  # the real update, counted
        updates.append(progress)
        return real_update(artifact_id, progress)

    monkeypatch.setattr(progress_module, "update_progress_artifact", counted)

    @flow
    def long_step() -> tuple:
        nothing = ProgressArtifact("nothing to do")
        nothing(0, 0)  # a warm cache: no work, no artifact
        items = ProgressArtifact("items")
        for done in range(1, 2001):
            items(done, 2000)
        stopped = ProgressArtifact("a sweep that stops early")
        stopped(40, 100)
        stopped.finish()
        return nothing.artifact_id, items.artifact_id, stopped.artifact_id

    nothing, items, stopped = long_step()

    assert nothing is None
    assert shown(items) == 100.0 and shown(stopped) == 100.0
    # 2000 reports in well under half a second: the first creates it, only the last one updates it (and finish())
    assert updates == [100.0, 100.0]
