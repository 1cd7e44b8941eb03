"""Real Prefect processes for tests: an API server on 127.0.0.1, the `prefect` CLI against it, and process workers.

with prefect_server(tmp_path) as server:
    server.create_work_pools()
    server.cli("--no-prompt", "deploy", "--all")
    server.start_worker("cpu", extra_env={"MLFLOW_TRACKING_URI": ...})
    run = server.post("/deployments/name/demo-pets/smoke/create_flow_run", {}) ...
    final = server.wait_for_final_state(run["id"], timeout=480)

Every process runs in a session of its own and is stopped by its PID when the block ends, even when the body
raises: workers first, then the server; SIGTERM, a grace period, then SIGKILL for the process group, and last any
descendant that moved to a session of its own (a process worker starts each flow run that way). The environment
of these processes inherits no PREFECT_* variable from the test process; PREFECT_API_URL points at this server.
Logs go to files in the temporary folder; `diagnostics()` returns their tails for assertion messages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lib.common.processes import descendants
from lib.ops.stack import work_pools
from tests.support.processes import start_time

ROOT = Path(__file__).resolve().parents[2]
PREFECT = Path(sys.executable).parent / "prefect"
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"<{path}: {error}>"
    return "\n".join(text.splitlines()[-lines:])


def _signal_if_same(pid: int, started: str, signum: int) -> bool:
    """Send signum to pid unless it has exited or its PID now belongs to another process; True if sent."""
    if start_time(pid) != started:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
        return True
    return False


@dataclass
class ManagedProcess:
    """A process started in its own session, with its output in a log file."""

    name: str
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, wait up to grace seconds, then SIGKILL the process group; then end descendants that left it.

        A second SIGTERM goes out halfway through the grace period: a Prefect worker whose SIGINT is ignored
        (inherited from a shell without job control) only stops on the second one (Prefect 3.9 utilities/processutils).
        """
        family = descendants(self.pid)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            for signum in (signal.SIGTERM, None):
                try:
                    self.process.wait(timeout=grace / 2)
                    break
                except subprocess.TimeoutExpired:
                    if signum is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.pid, signum)
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        # Whatever is left of the group we created (pgid == our child's pid, start_new_session=True).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        survivors = [(pid, started) for pid, started in family if start_time(pid) == started]
        for pid, started in survivors:
            _signal_if_same(pid, started, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(start_time(pid) == started for pid, started in survivors):
            time.sleep(0.1)
        for pid, started in survivors:
            _signal_if_same(pid, started, signal.SIGKILL)


@dataclass
class PrefectServer:
    """A running `prefect server start` and what the tests started against it."""

    home: Path
    port: int
    env: dict[str, str]
    server: ManagedProcess
    workers: list[ManagedProcess] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    # --- processes -------------------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `prefect ARGS...` from the venv, in the repository root, against this server."""
        return self.run([str(PREFECT), *args], timeout=timeout, check=check)

    def python(self, code: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `python -c CODE` with this server's environment (e.g. to emit an event), in the repository root."""
        return self.run([sys.executable, "-c", code], timeout=timeout, check=check)

    def run(self, command: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command to completion with this server's environment; raise with its output when it fails."""
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        managed = ManagedProcess(Path(command[0]).name, process, self.home / "none.log")
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:  # a timeout or an interrupt: end it, then close its pipes
            managed.stop(grace=5)
            with contextlib.suppress(Exception):
                process.communicate(timeout=5)
            raise
        managed.stop(grace=5)  # it has exited: this ends only what it left in its process group
        result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
                f"\n{self.diagnostics()}"
            )
        return result

    def create_work_pools(self) -> list[str]:
        """Create, as process pools, every work pool prefect.yaml's deployments name; return their names."""
        pools = work_pools()
        for pool in pools:
            self.cli("work-pool", "create", pool, "--type", "process", "--overwrite")
        return pools

    def start_worker(
        self,
        pool: str,
        work_queue: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        name: str | None = None,
        limit: int | None = None,
        wait: float = 90,
        cwd: Path | None = None,
        python: Path | None = None,
    ) -> ManagedProcess:
        """Start `prefect worker start --pool POOL` in the background; return once the server lists it.

        extra_env is added to this server's environment; flow runs the worker starts inherit it. limit is the
        worker's `--limit`: how many flow runs it runs at once (no limit by default). cwd is the worker's working
        directory (the repository root by default); python, an interpreter to run it with (`python -m prefect`)
        instead of the venv's `prefect`: its flow runs use that interpreter too.
        """
        name = name or f"test-{pool}-{len(self.workers)}"
        prefect = [str(PREFECT)] if python is None else [str(python), "-m", "prefect"]
        command = [*prefect, "worker", "start", "--pool", pool, "--name", name]
        if work_queue:
            command += ["--work-queue", work_queue]
        if limit is not None:
            command += ["--limit", str(limit)]
        env = {**self.env, **(extra_env or {})}
        worker = _spawn(name, command, env, self.home / f"worker-{name}.log", cwd=cwd or ROOT)
        self.workers.append(worker)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not worker.alive():
                raise AssertionError(f"worker {name} exited {worker.process.returncode}\n{self.diagnostics()}")
            listed = self.post(f"/work_pools/{pool}/workers/filter", {})
            if any(entry["name"] == name for entry in listed):
                return worker
            time.sleep(0.5)
        raise AssertionError(f"worker {name} did not register with pool {pool} in {wait} s\n{self.diagnostics()}")

    def stop(self) -> None:
        """Stop every worker (last started first), then the server."""
        errors = []
        for process in [*reversed(self.workers), self.server]:
            try:
                process.stop()
            except Exception as error:  # keep stopping the others
                errors.append(f"{process.name}: {error!r}")
        if errors:
            raise RuntimeError("could not stop: " + "; ".join(errors))

    # --- API -------------------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, json: object = None) -> object:
        """Call the REST API (path relative to /api) and return the decoded JSON body; raise on an error status."""
        for delay in (0.2, 0.5, 1, 2, 4, 8, None):
            response = httpx.request(method, self.api_url + path, json=json, timeout=30)
            # 503 means "retry": SQLite was busy (database is locked); Prefect's own client retries it too.
            if response.status_code not in (429, 503) or delay is None:
                break
            time.sleep(delay)
        if response.is_error:
            raise AssertionError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else None

    def get(self, path: str) -> object:
        return self.request("GET", path)

    def post(self, path: str, json: object = None) -> object:
        return self.request("POST", path, {} if json is None else json)

    def delete(self, path: str) -> object:
        return self.request("DELETE", path)

    def flow_run(self, flow_run_id: str) -> dict:
        """The flow run as the API returns it (state under "state", its type under "state_type")."""
        return self.get(f"/flow_runs/{flow_run_id}")

    def wait_for_final_state(self, flow_run_id: str, timeout: float) -> dict:
        """Poll the flow run until it is COMPLETED, FAILED, CRASHED or CANCELLED; return it.

        Fails early, with the logs, if the server or every worker has exited.
        """
        deadline = time.monotonic() + timeout
        run = self.flow_run(flow_run_id)
        while run["state_type"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"flow run {flow_run_id} still {run['state_type']} ({run['state_name']}) after {timeout} s\n"
                    f"{self.diagnostics()}"
                )
            if not self.server.alive() or (self.workers and not any(w.alive() for w in self.workers)):
                raise AssertionError(f"a Prefect process exited while waiting\n{self.diagnostics()}")
            time.sleep(1)
            run = self.flow_run(flow_run_id)
        return run

    def diagnostics(self, lines: int = 60) -> str:
        """The tails of the server and worker logs, for assertion messages."""
        parts = []
        for process in [self.server, *self.workers]:
            status = "running" if process.alive() else f"exited {process.process.returncode}"
            parts.append(f"--- {process.name} ({status}), {process.log} ---\n{_tail(process.log, lines)}")
        return "\n".join(parts)


def _spawn(name: str, command: list[str], env: Mapping[str, str], log: Path, cwd: Path = ROOT) -> ManagedProcess:
    with log.open("ab") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ManagedProcess(name, process, log)


def server_environment(home: Path, port: int) -> dict[str, str]:
    """The test process's environment without any PREFECT_* variable, plus the settings of a private server.

    PATH starts with the venv's bin folder, as for workers started with their environment activated.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        {
            # The venv's interpreter first on PATH, as in an activated venv: prefect.yaml's install step runs `python`.
            "PATH": f"{PREFECT.parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
            "PREFECT_HOME": str(home / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_CLI_PROMPT": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_API_LOG_RETRYABLE_ERRORS": "true",  # put "database is locked" and the like in the server log
            "DO_NOT_TRACK": "1",
        }
    )
    return env


@contextlib.contextmanager
def prefect_server(
    home: Path, extra_env: Mapping[str, str] | None = None, startup_timeout: float = 120
) -> Iterator[PrefectServer]:
    """Start `prefect server start` on a free 127.0.0.1 port with its state under home; stop everything after.

    extra_env is added to the environment of every process started through the returned object.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        for attempt in range(3):  # another process may take the free port before the server binds it
            port = _free_port()
            env = {**server_environment(home, port), **(extra_env or {})}
            command = [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
            process = _spawn("server", command, env, home / f"server-{attempt}.log")
            server = PrefectServer(home=home, port=port, env=env, server=process)
            if _wait_healthy(server, startup_timeout):
                break
            process.stop()
            if "already in use" not in _tail(process.log):
                raise AssertionError(f"the Prefect server exited during startup\n{server.diagnostics()}")
        else:
            raise AssertionError(f"the Prefect server found no free port in 3 tries\n{server.diagnostics()}")
        yield server
    finally:
        if server is not None:
            server.stop()


def _wait_healthy(server: PrefectServer, timeout: float) -> bool:
    """True once /api/health answers; False if the server exits first; raise with the log tail on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.server.alive():
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.api_url + "/health", timeout=2).status_code == 200:
                return True
        time.sleep(0.25)
    raise AssertionError(f"the Prefect server did not answer /api/health in {timeout} s\n{server.diagnostics()}")
