"""Which process a run belongs to, told so that another process can later say whether it is still there; and
helper processes that end with the process that started them.

A PID alone is not enough: once a process is gone the system reuses its number. On Linux the process's start time
(field 22 of /proc/PID/stat, in clock ticks since boot; proc(5)) tells a live process from a later one with the same
PID. Elsewhere only the PID is compared.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None when it is gone or has no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()  # the command name, in parentheses, may hold spaces


def start_ticks(pid: int) -> str | None:
    """The process's start time from /proc (Linux), or None when it is gone, a zombie, or /proc is not there."""
    fields = stat_fields(pid)
    return None if fields is None or fields[0] in ("Z", "X") else fields[19]  # a zombie has finished already


def descendants(root: int) -> list[tuple[int, str]]:
    """(PID, start time) of every live descendant of root, from /proc's parent links (none without /proc).

    Found before a process is stopped, they can be stopped after it too: a process that started them in a session of
    their own (a Prefect process worker's flow runs) does not take them with it.
    """
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            fields = stat_fields(int(entry.name)) if entry.name.isdigit() else None
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, pending = [], list(children.get(root, []))
    while pending:
        pid = pending.pop()
        started = start_ticks(pid)
        if started is not None:
            found.append((pid, started))
        pending += children.get(pid, [])
    return found


@dataclass(frozen=True)
class ProcessIdentity:
    """A process named by its host, its PID and (on Linux) its start time."""

    host: str
    pid: int
    started: str = ""

    @classmethod
    def current(cls) -> ProcessIdentity:
        return cls(host=socket.gethostname(), pid=os.getpid(), started=start_ticks(os.getpid()) or "")

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def is_alive(self) -> bool:
        """Whether this process still runs; only answerable on its own host (call `on_this_host` first)."""
        if self.started and Path("/proc").is_dir():
            return start_ticks(self.pid) == self.started
        try:
            os.kill(self.pid, 0)  # signal 0: only checks that the PID exists
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process with that PID: it exists
            return True
        return True


PARENT_CHECK_SECONDS = 1.0


def signal_self_when_orphaned(parent: int, signum: signal.Signals, *, name: str) -> None:
    """Send this process `signum` once `parent`, the process that started it, is gone (killed outright).

    A process whose parent dies is re-parented, so a changed parent PID is the signal (PR_SET_PDEATHSIG would
    follow the parent's thread instead). The parent's PID is passed in: a parent that died before this process
    looked would already show as another one. The watch runs in a daemon thread named `name`.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name=name, daemon=True).start()
