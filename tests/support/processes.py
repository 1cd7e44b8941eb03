"""What /proc says about a process (Linux): its state, start time and parent, for tests that signal real processes."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()  # the name, in parentheses, may itself hold spaces


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), or None when it is gone or a zombie."""
    fields = stat_fields(pid)
    return None if fields is None or fields[0] in ("Z", "X") else fields[19]


def parent_pid(pid: int) -> int | None:
    """The PID of the process's parent, or None when it is gone."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])


def has_exited(pid: int) -> bool:
    """True when the process has exited (a zombie nobody reaps counts as exited)."""
    return start_time(pid) is None
