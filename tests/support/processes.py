"""What /proc says about processes (Linux), for tests that signal real ones: state, start, parent, stage processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lib.common.processes import start_ticks as start_time
from lib.common.processes import stat_fields


def parent_pid(pid: int) -> int | None:
    """The PID of the process's parent, or None when it is gone."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])


def has_exited(pid: int) -> bool:
    """True when the process has exited (a zombie nobody reaps counts as exited)."""
    return start_time(pid) is None


def is_reapable(pid: int) -> bool:
    """True when the process is a zombie with none of its threads left: its parent's next wait() reports it.

    A killed process's main thread shows as a zombie while its other threads are still exiting; until they have,
    its parent cannot tell it is gone.
    """
    try:
        threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    except OSError:
        return True
    return has_exited(pid) and threads <= 1


def stage_process_ids(out_dir: Path) -> list[int]:
    """PIDs of the `python -m lib.train.stages` processes training under out_dir, read from /proc as `ps` does."""
    return [int(entry.name) for entry, _ in _stage_processes(out_dir)]


def rank_process_ids(out_dir: Path) -> dict[int, int]:
    """{rank: PID} of the torchrun ranks (`lib.train.stages --rank`) training under out_dir, read from /proc."""
    found = {}
    for entry, arguments in _stage_processes(out_dir):
        try:
            environment = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # it ended while we looked
            continue
        ranks = [item.removeprefix("RANK=") for item in environment if item.startswith("RANK=")]
        if "--rank" in arguments and ranks:
            found[int(ranks[0])] = int(entry.name)
    return found


def _stage_processes(out_dir: Path) -> Iterator[tuple[Path, list[str]]]:
    """(/proc entry, command line) of each `python -m lib.train.stages` process with an argument under out_dir."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended while we looked
            continue
        if "lib.train.stages" in arguments and any(argument.startswith(str(out_dir)) for argument in arguments):
            yield entry, arguments
