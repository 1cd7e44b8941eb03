"""Warm re-run: the data stages of the flow, a second time on the same data, against their first (cold) run.

Runs the `prepare-data` Prefect flow (download over HTTP from 127.0.0.1, label, clean, split, presize, summary) on a
generated archive the size of Oxford-IIIT Pet into an empty cache, then again with the same cache. The data stages
of the second run must take under 5% of the first's: the archive is not fetched again, and no image is read,
decoded or presized again. A temporary Prefect API server (prefect_test_harness) records both runs, and the stages'
time is read back from it: from the first data task's start to the last one's end. The flow's whole wall time is
reported too; it adds Prefect's fixed cost per flow run (creating it, and up to 1 s joining its heartbeat thread).

    python -m bench.warm_rerun                             # 37 breeds x 200 generated pictures (Pets has 7,390)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import BENCH_DIR, emit, generated_pets, rounded
from lib.data.synthetic import pack_tgz
from lib.recipe import DEFAULT_PRESIZE, Recipe

TARGET_SHARE = 0.05  # issue 5: the warm data stages take < 5% of their cold time


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--breeds", type=int, default=37, help="generated breeds (the real dataset has 37)")
    parser.add_argument("--per-breed", type=int, default=200, help="generated pictures per breed")
    parser.add_argument("--presize", type=int, default=DEFAULT_PRESIZE, help="presize cache side in pixels")
    parser.add_argument("--data-dir", type=Path, default=BENCH_DIR, help="where generated images live")
    args = parser.parse_args(argv)
    os.environ.setdefault("DO_NOT_TRACK", "1")  # no telemetry from Prefect (Prefect 3.9 prefect/analytics)

    from prefect.testing.utilities import prefect_test_harness

    from flows.data import prepare_data
    from tests.support.http_server import serve_directory

    images = generated_pets(args.data_dir, breeds=args.breeds, per_breed=args.per_breed)
    archive = args.data_dir / f"{images.parent.name}.tgz"
    if not archive.exists():
        pack_tgz(images, archive)
    with (
        tempfile.TemporaryDirectory(dir=args.data_dir) as scratch,
        serve_directory(args.data_dir) as server,
        prefect_test_harness(server_startup_timeout=60),
    ):
        settings = {
            "data_url": server.url(archive.name),
            "presize": args.presize,
            "cache_dir": str(Path(scratch) / "cache"),
        }
        recipes = [Recipe().updated({**settings, "out_dir": str(Path(scratch) / f"run{n}")}) for n in (1, 2)]
        runs = [_timed(prepare_data, recipe=recipe) for recipe in recipes]
        requests = server.requests
    (cold_seconds, cold_stages, cold), (warm_seconds, warm_stages, warm) = runs
    share = warm_stages / cold_stages
    figures = {
        "images": cold["sizes"]["train"] + cold["sizes"]["valid"],
        "presize": args.presize,
        "cold_data_stages_seconds": cold_stages,
        "warm_data_stages_seconds": warm_stages,
        "warm_share_of_cold": share,
        "cold_flow_seconds": cold_seconds,
        "warm_flow_seconds": warm_seconds,
        "warm_flow_share_of_cold": warm_seconds / cold_seconds,
        "http_requests": requests,
        "cold_decoded": cold["decoded"],
        "warm_decoded": warm["decoded"],
        "warm_presized": warm["written"],
    }
    targets = {f"warm_under_{TARGET_SHARE:.0%}_of_cold": share < TARGET_SHARE}
    return emit("warm_rerun", torch.device("cpu"), rounded(figures), targets)


def _timed(flow, **parameters) -> tuple[float, float, dict]:
    """Run a flow; return its wall seconds, the span of its task runs as Prefect recorded them, and its result."""
    started = time.perf_counter()
    state = flow(**parameters, return_state=True)
    seconds = time.perf_counter() - started
    return seconds, _task_span(state.state_details.flow_run_id), state.result()


def _task_span(flow_run_id) -> float:
    """Seconds from the first task run's start to the last one's end, read from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    if not task_runs or any(run.start_time is None or run.end_time is None for run in task_runs):
        raise RuntimeError(f"flow run {flow_run_id} has no finished task runs to time")
    return (max(run.end_time for run in task_runs) - min(run.start_time for run in task_runs)).total_seconds()


if __name__ == "__main__":
    main()
