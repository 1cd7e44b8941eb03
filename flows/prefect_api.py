"""The temporary Prefect API a `pets` command runs its flows against when no Prefect server is configured.

Without PREFECT_API_URL, Prefect 3.9 starts a temporary server the first time a flow asks for a client
(`get_client`, prefect/client/orchestration/__init__.py; `SubprocessASGIServer`, prefect/server/api/server.py): a
second interpreter that imports Prefect's server, only once the command has imported every flow module, and stopped
at exit with up to 5 s of waiting. `temporary_api()` starts the same server (Prefect's own app, `create_app`, on
its database in PREFECT_HOME) as soon as the command has checked its options, so it boots on the other core while
the command imports torch and the flows. Its socket is bound and listening before the server process starts: a flow
that asks sooner waits in the socket's queue until the server answers, and no other process can take the port
meanwhile.

Commands started together share the database in PREFECT_HOME: their servers start one at a time (a file lock
there), so a new database is created and migrated once. It listens on 127.0.0.1 only. It runs in a session of its
own, so Ctrl-C reaches the command but not the server: the flow still reports its final state, then the command
stops the server. A server whose command died (killed outright) exits within a second; a command whose server
died ends at once with one line. With PREFECT_API_URL set (a real server, deployments, workers) nothing is started.

    python -m flows.prefect_api FD PID    the server process itself, serving on the listening socket FD it
                                          inherited, while the command PID runs
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from lib.common.processes import signal_self_when_orphaned

HOST = "127.0.0.1"  # loopback only, as Prefect's own temporary server: the API has no authentication
STOP_SECONDS = 5  # the wait Prefect 3.9's SubprocessASGIServer.stop allows before it kills its server
SERVER_CHECK_SECONDS = 0.5
SERVER_DIED_EXIT = 1  # not the user's input: the status of a command that failed for another reason
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])  # where `python -m flows.prefect_api` finds the flows package


class TemporaryAPI:
    """A Prefect API server process on a loopback socket bound here, so its address is known (and held) at once."""

    def __init__(self):
        from prefect.settings import get_current_settings

        self.socket = socket.create_server((HOST, 0))  # port 0: the system picks a free one
        self.url = f"http://{HOST}:{self.socket.getsockname()[1]}/api"
        environment = {
            **os.environ,
            # the settings this command runs with (profile, environment) are the server's too, as Prefect passes them
            **get_current_settings().to_environment_variables(exclude_unset=True),
            "PYTHONPATH": os.pathsep.join([PROJECT_ROOT, os.environ.get("PYTHONPATH", "")]),
        }
        environment.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.prefect_api", str(self.socket.fileno()), str(os.getpid())],
            pass_fds=(self.socket.fileno(),),
            env=environment,
            start_new_session=True,
        )
        self.stopping = threading.Event()

    def watch(self) -> None:
        """End the command at once, with one line, if the server dies while the command runs (the OOM killer, a
        `kill -9`): Prefect's client would otherwise retry the dead server for minutes, silent on the console.

        The processes the command started stop by themselves when it is gone, and the next `pets train` marks the
        MLflow run it leaves RUNNING as FAILED.
        """

        def exit_with_server() -> None:
            while not self.stopping.wait(SERVER_CHECK_SECONDS):
                code = self.process.poll()
                if code is not None:
                    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                    sys.stdout.flush()
                    os.write(
                        sys.stderr.fileno(),
                        f"Error: the temporary Prefect API (process {self.process.pid}) died ({how}) while the command "
                        "ran; run it again (`pets train --resume RUN_ID` continues a training run), or set "
                        "PREFECT_API_URL to a Prefect server.\n".encode(),
                    )
                    os._exit(SERVER_DIED_EXIT)

        threading.Thread(target=exit_with_server, name="temporary-api-watch", daemon=True).start()

    def stop(self) -> int:
        """Stop the server (SIGTERM, then SIGKILL after STOP_SECONDS) and return its exit status."""
        self.stopping.set()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.socket.close()
        return self.process.wait()


@contextmanager
def temporary_api() -> Iterator[str | None]:
    """Serve Prefect's API for the block when Prefect would start a temporary one; yield its URL (None if not).

    Start it before importing the flows. The events and logs the flows sent are delivered before it stops.
    """
    from prefect.logging import get_logger
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield None  # a configured server, or none allowed: Prefect's own behaviour
        return
    api = TemporaryAPI()
    api.watch()
    ensure_logging_setup()  # `import prefect` alone leaves logging as it is: the flows set it up later
    get_logger().info(f"Starting a temporary Prefect API on {api.url} (PREFECT_API_URL names a server to use instead)")
    try:
        with temporary_settings(updates={PREFECT_API_URL: api.url}):
            try:
                yield api.url
            finally:
                _deliver_events_and_logs()
    finally:
        api.stop()


def _deliver_events_and_logs() -> None:
    """Send what Prefect's background workers still hold to the server, as prefect_test_harness does on exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with suppress(RuntimeError):  # raised when the worker never started (prefect/testing/utilities.py does the same)
        APILogWorker.instance().drain()
    EventsWorker.drain_all()


# -- the server process -----------------------------------------------------------------------------------------------
def serve(fd: int, parent: int) -> None:
    """Run Prefect's API app (without its UI) on the listening socket `fd` until SIGTERM, or until `parent` dies."""
    _stop_with_parent(parent)  # first: the command may die while this process still imports Prefect's server
    import uvicorn
    from prefect.server.api.server import create_app

    listening = socket.socket(fileno=fd)
    # ephemeral: the UI and the services only a long-running server needs (scheduler, late runs, ...) stay off
    app = create_app(ephemeral=True, final=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    _start_one_at_a_time(server)
    server.run(sockets=[listening])
    gc.freeze()  # nothing is left to free: skip the exit-time collection of Prefect's server modules


STARTUP_LOCK = "temporary-api-startup.lock"  # in PREFECT_HOME, beside the database the servers share


def _start_one_at_a_time(server) -> None:
    """Hold a file lock in PREFECT_HOME from now until the server has started (its lifespan has run).

    The app's startup migrates the database and registers block types (Prefect 3.9 server/api/server.py
    `lifespan`), under a lock of this process only (server/database/alembic_commands.py `ALEMBIC_LOCK`): several
    commands started at once on a new PREFECT_HOME would migrate the same sqlite file together and some of their
    servers die. The commands' requests wait in their sockets' queues meanwhile. A server that dies while it starts
    lets go of the lock with its process.
    """
    from filelock import FileLock
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(home / STARTUP_LOCK), thread_local=False)  # released by the thread below
    lock.acquire()

    def release_once_started() -> None:
        while not (server.started or server.should_exit):
            time.sleep(0.02)
        lock.release()

    threading.Thread(target=release_once_started, name="startup-lock", daemon=True).start()


def _stop_with_parent(parent: int) -> None:
    """Stop when the command that started this server is gone (killed outright): never serve on as an orphan.

    SIGTERM: uvicorn's own graceful stop, or the default exit while the server still boots.
    """
    signal_self_when_orphaned(parent, signal.SIGTERM, name="stop-with-parent")


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
