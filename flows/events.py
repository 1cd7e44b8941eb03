"""Events the pipeline reacts to: announcing a new dataset version starts a comparison (prefect.yaml, `compare`)."""

from __future__ import annotations

DATASET_PUBLISHED = "pets.dataset.published"  # the event the compare deployment's trigger expects
DATASET_RESOURCE = "pets.dataset.{name}"  # matched by the trigger's `pets.dataset.*`
DRAIN_SECONDS = 30


def announce_dataset(data_url: str, name: str = "pets", *, labels: str = "auto", labels_csv: str | None = None) -> str:
    """Emit `pets.dataset.published` for a dataset archive to the Prefect server; return the event's id.

    The compare deployment's trigger trains on the payload's `data_url`, labelled as `labels` says (the recipe's
    data.labels) from `labels_csv` if given (data.labels_csv). Events only reach automations on a running
    server, so PREFECT_API_URL must point at one (without it Prefect would start a throwaway local server).
    """
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise RuntimeError(
            "PREFECT_API_URL is not set, so no Prefect server would see the event. Point it at the server that "
            "runs the compare deployment's trigger, e.g. `export PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )
    event = emit_event(
        event=DATASET_PUBLISHED,
        resource={"prefect.resource.id": DATASET_RESOURCE.format(name=name)},
        # Every key always present: the trigger's templates render a missing one as an empty string.
        payload={"data_url": data_url, "labels": labels, "labels_csv": labels_csv or ""},
    )
    if event is None:
        raise RuntimeError(f"Prefect did not send the event to {api_url}; its log above says why.")
    EventsWorker.drain_all(timeout=DRAIN_SECONDS)  # deliver it now: a command line exits right after
    return str(event.id)
