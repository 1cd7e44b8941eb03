"""The temporary Prefect API of a `pets` command (flows/prefect_api.py): real server processes, real signals.

Each test runs a small script in a process of its own, as `pets` runs: without PREFECT_API_URL and with a fresh
PREFECT_HOME, whose database outlives the server and says what the server recorded.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.processes import has_exited, parent_pid

ROOT = Path(__file__).resolve().parents[2]
WAIT_SECONDS = 120

# A flow against the temporary API; its task says when it runs, then sleeps unless told to return at once.
SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from flows.prefect_api import temporary_api
    from prefect import flow, task

    @task
    def wait(seconds):
        print("running", flush=True)
        time.sleep(seconds)
        return seconds

    @flow(name="probe-api")
    def probe(seconds):
        return wait(seconds)

    with temporary_api() as url:
        print(url, flush=True)
        probe(float(sys.argv[1]))
    print("stopped", flush=True)
    """
)


def start_script(tmp_path: Path, seconds: float) -> subprocess.Popen:
    environment = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT)}
    environment.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(seconds)],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )


def server_ids(parent: int) -> list[int]:
    """PIDs of the `python -m flows.prefect_api` processes whose parent is `parent`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not a process, or it ended while we looked
            continue
        if "flows.prefect_api" in arguments and parent_pid(int(entry.name)) == parent:
            found.append(int(entry.name))
    return found


def flow_run_states(tmp_path: Path) -> list[str]:
    """The state of every flow run the server recorded in PREFECT_HOME's database."""
    database = tmp_path / "prefect-home" / "prefect.db"
    connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)
    try:
        return [state for (state,) in connection.execute("SELECT state_type FROM flow_run").fetchall()]
    finally:
        connection.close()


def read_line(script: subprocess.Popen) -> str:
    line = script.stdout.readline().strip()
    assert line, f"the script ended early:\n{script.stderr.read()[-3000:]}"
    return line


def listening_addresses(port: int) -> set[str]:
    """The local addresses listening on `port`, from /proc/net/tcp and tcp6 (in hex, as the kernel writes them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, local_port = fields[1].split(":")
            if int(local_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


@pytest.fixture
def started(tmp_path):
    """Start the script, wait for its URL and return (script, URL, server PID); end both whatever the outcome."""
    scripts = []

    def start(seconds: float) -> tuple[subprocess.Popen, str, int]:
        script = start_script(tmp_path, seconds)
        scripts.append([script, None])
        url = read_line(script)
        deadline = time.monotonic() + 10  # a process just started may not show its command line yet
        while not (servers := server_ids(script.pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        (server,) = servers
        scripts[-1][1] = server
        return script, url, server

    yield start
    for script, server in scripts:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
        script.wait()
        if server is not None and not has_exited(server):
            os.kill(server, signal.SIGKILL)


def test_a_flow_runs_against_a_loopback_server_that_is_stopped_when_the_command_ends(tmp_path, started):
    script, url, server = started(0)
    host, port = url.removeprefix("http://").removesuffix("/api").split(":")
    assert host == "127.0.0.1" and listening_addresses(int(port)) == {"0100007F"}  # 127.0.0.1 only
    assert read_line(script) == "running"
    assert read_line(script) == "stopped"
    assert script.wait(WAIT_SECONDS) == 0
    assert has_exited(server)
    assert flow_run_states(tmp_path) == ["COMPLETED"]  # the server recorded the run's end before it stopped


def test_ctrl_c_stops_the_flow_which_reports_its_state_before_the_server_stops(tmp_path, started):
    script, _, server = started(600)
    assert read_line(script) == "running"
    os.killpg(script.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the foreground job
    assert script.wait(WAIT_SECONDS) != 0
    assert has_exited(server)
    assert flow_run_states(tmp_path) == ["CRASHED"]  # the server was still up to record how the run ended


def test_the_server_exits_when_its_command_is_killed_outright_even_while_it_starts(started):
    script, _, server = started(600)
    os.kill(script.pid, signal.SIGKILL)  # no finally, no atexit: only the server's own watch can end it
    script.wait()
    deadline = time.monotonic() + 30
    while not has_exited(server):
        assert time.monotonic() < deadline, "the server outlived its command by 30 s"
        time.sleep(0.1)


def test_nothing_is_started_when_a_prefect_server_is_configured():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.prefect_api import temporary_api

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}), temporary_api() as url:
        assert url is None and server_ids(os.getpid()) == []
