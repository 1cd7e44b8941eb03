"""The local production stack: PostgreSQL, a Prefect server and an MLflow tracking server on it, and a worker.

`up` starts, in this order, everything on 127.0.0.1:
1. PostgreSQL: a cluster of its own in <state>/pgdata (initdb, pg_ctl), or the server at a URL the user gives; the
   databases `prefect` and `mlflow` are created on it when missing.
2. `prefect server start`, its database on PostgreSQL through asyncpg.
3. `mlflow server`, its backend store on PostgreSQL through psycopg, artifacts proxied by the server
   (--serve-artifacts) into <state>/artifacts.
4. The work pools prefect.yaml names, every deployment in it (`prefect --no-prompt deploy --all`), and a worker on
   the `cpu` pool whose flow runs track to that MLflow server.
Each process goes into <state>/pids.json with its start time (lib/common/processes.py) as soon as it runs, so `down`
stops exactly those, after a failed `up` too, and never signals a process that took over a recycled PID.
Subprocesses only: nothing here imports Prefect or MLflow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from lib.common.download import redact_url
from lib.common.errors import UserError
from lib.common.files import write_text_atomically
from lib.common.paths import default_output_dir
from lib.common.processes import ProcessIdentity, descendants, start_ticks

ROOT = Path(__file__).resolve().parents[2]  # the checkout: prefect.yaml, and the path deployments record
STATE_DIR_VARIABLE = "PETS_STACK_DIR"
PG_URL_VARIABLE = "PETS_STACK_PG_URL"
HOST = "127.0.0.1"  # every service of the stack listens on loopback only: none of them is authenticated here
PG_PORT = 55432  # not 5432: a system PostgreSQL listening there keeps running beside the stack's own cluster
PREFECT_PORT = 4200  # Prefect's default (`prefect server start --port`, Prefect 3.9)
MLFLOW_PORT = 5050  # not 5000: `pets ui` serves the local store there (tasks/mlflow_ui.py)
PG_ROLE = "pets"  # `initdb -U`: the local cluster's superuser, trusted on 127.0.0.1
# PostgreSQL refuses to run as root (initdb and postgres both check the effective user): as root the local cluster
# runs as this account, the one Debian's and PGDG's postgresql packages create.
PG_ACCOUNT = "postgres"
DATABASES = ("prefect", "mlflow")
WORKER_POOL = "cpu"  # prefect.yaml's smoke, data-smoke and predict-images-cpu deployments run there
WORKER_NAME = "stack-cpu"
MLFLOW_WORKERS = 1  # one uvicorn worker: it creates the store's tables alone, and starts ~3x faster (flows/cli.py)
LOCAL_PG_WAIT_SECONDS = 60
EXTERNAL_PG_WAIT_SECONDS = 5  # a server that is up answers at once; this only rides out a brief hiccup
PREFECT_WAIT_SECONDS = 240  # the first start on an empty database runs every migration (~1 min on two busy CPUs)
MLFLOW_WAIT_SECONDS = 180
WORKER_WAIT_SECONDS = 120
STOP_GRACE_SECONDS = 20


class StackError(UserError, RuntimeError):
    """The stack cannot start or stop as asked; the message names what (a URL, a port, a log) and the fix."""


@dataclass(frozen=True)
class StackSettings:
    """What `up` starts: where its state lives, an existing PostgreSQL server (else a local cluster), the ports."""

    state_dir: Path
    pg_url: str | None = None
    pg_port: int = PG_PORT
    prefect_port: int = PREFECT_PORT
    mlflow_port: int = MLFLOW_PORT


def default_state_dir() -> Path:
    """Return $PETS_STACK_DIR, or ./outputs/stack."""
    return Path(os.environ.get(STATE_DIR_VARIABLE) or default_output_dir() / "stack")


@dataclass(frozen=True)
class Stack:
    """A stack that runs: its URLs, what each process is, and where its files are."""

    state_dir: Path
    postgres_url: str  # without a password
    local_postgres: bool
    prefect_url: str
    mlflow_url: str

    @property
    def prefect_api_url(self) -> str:
        return self.prefect_url + "/api"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def artifacts(self) -> Path:
        return self.state_dir / "artifacts"

    def exports(self) -> dict[str, str]:
        """The variables that point a shell's `pets`, `prefect` and `mlflow` at this stack."""
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_url}


# -- PostgreSQL -------------------------------------------------------------------------------------------------------
def database_url(server_url: str, database: str, driver: str | None = None) -> str:
    """The server URL with its path set to `database` and, for SQLAlchemy, `postgresql+DRIVER` as its scheme."""
    parts = urlsplit(server_url)
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return urlunsplit((scheme, parts.netloc, f"/{database}", parts.query, ""))


def check_server_url(url: str) -> str:
    """Return a postgresql:// URL as given (postgres:// is accepted too); refuse anything else in one line."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise StackError(
            f"--pg-url {redact_url(url)!r} is not a PostgreSQL URL: give postgresql://USER[:PASSWORD]@HOST[:PORT][/DB]"
        )
    return urlunsplit(("postgresql", parts.netloc, parts.path or "/postgres", parts.query, ""))


def wait_for_postgres(url: str, timeout: float) -> None:
    """Return once PostgreSQL at url accepts a connection; raise StackError naming the URL when it does not."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, connect_timeout=max(1, min(5, int(timeout)))):
                return
        except psycopg.Error as error:
            if time.monotonic() >= deadline:
                raise StackError(postgres_down(url, _one_line(str(error)))) from None
        time.sleep(0.5)


def postgres_down(url: str, reason: str) -> str:
    return (
        f"PostgreSQL at {redact_url(url)} does not answer ({reason}): start it, or point the stack at one that runs "
        f"(--pg-url or {PG_URL_VARIABLE}; unset both for a local cluster in the state folder)"
    )


def create_databases(url: str) -> None:
    """Create the stack's databases on the server at url (any database there to connect to) when missing."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as connection:  # CREATE DATABASE cannot run in a transaction
        present = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in present:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def postgres_program(name: str) -> str:
    """The path of a PostgreSQL server program: on PATH, else the newest /usr/lib/postgresql/*/bin (Debian's)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda path: int(Path(path).parts[-3]))
    if candidates:
        return candidates[-1]
    raise StackError(
        f"{name} is not on PATH nor in /usr/lib/postgresql/*/bin: install the PostgreSQL server (e.g. apt-get "
        f"install postgresql), or give an existing server with --pg-url or {PG_URL_VARIABLE}"
    )


def _cluster_account() -> pwd.struct_passwd | None:
    """The account the local cluster runs as: None (this one) unless this is root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_ACCOUNT)
    except KeyError:
        raise StackError(
            f"PostgreSQL refuses to run as root and there is no {PG_ACCOUNT!r} account to run it as: create one "
            f"(useradd --system {PG_ACCOUNT}), run the stack as another user, or give an existing server with "
            f"--pg-url"
        ) from None


def _as_account(account: pwd.struct_passwd | None) -> dict:
    """subprocess keyword arguments that run a program as account (no extra groups), or as this user for None."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def start_local_postgres(state_dir: Path, port: int, record: Callable[[dict], None]) -> str:
    """Start (creating it first if needed) the cluster in state_dir/pgdata on 127.0.0.1:port; return its URL."""
    initdb, pg_ctl = postgres_program("initdb"), postgres_program("pg_ctl")
    account = _cluster_account()
    pgdata, logs = state_dir / "pgdata", state_dir / "logs"
    url = f"postgresql://{PG_ROLE}@{HOST}:{port}/postgres"
    pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = logs / "postgres.log"
    log.touch()
    if account is not None:
        for path in (pgdata, log):
            os.chown(path, account.pw_uid, account.pw_gid)
        reach = subprocess.run(
            ["sh", "-c", 'test -w "$1" && test -w "$2"', "sh", str(pgdata), str(log)], **_as_account(account)
        )
        if reach.returncode != 0:
            raise StackError(
                f"PostgreSQL runs as {PG_ACCOUNT!r} here (root may not run it), and that account cannot reach "
                f"{pgdata}: choose a --state-dir inside folders others may enter (e.g. under /tmp or /srv)"
            )
    if not (pgdata / "PG_VERSION").exists():
        command = [initdb, "-D", str(pgdata), "-A", "trust", "-U", PG_ROLE, "-E", "UTF8", "--no-locale"]
        _run_logged(command + ["--no-instructions"], logs / "initdb.log", cwd=pgdata, account=account)
        with (pgdata / "postgresql.conf").open("a") as conf:  # TCP on loopback only, and no Unix socket to place
            conf.write("\n# pets stack\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n")
    check_port_free(port, "--pg-port")
    start = [pg_ctl, "-D", str(pgdata), "-l", str(log), "-o", f"-p {port}", "-w", "-t", str(LOCAL_PG_WAIT_SECONDS)]
    started = subprocess.run([*start, "start"], cwd=pgdata, capture_output=True, text=True, **_as_account(account))
    if started.returncode != 0:
        reason = _last_line(log) or _one_line(started.stderr or started.stdout)
        raise StackError(postgres_down(url, f"pg_ctl start failed: {reason} (log: {log})"))
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])  # its first line (PostgreSQL 15 miscadmin.h)
    record({"name": "postgres", "pid": pid, "started": start_ticks(pid) or "", "log": str(log)})
    wait_for_postgres(url, LOCAL_PG_WAIT_SECONDS)
    return url


def stop_local_postgres(state_dir: Path, entry: Mapping) -> str:
    """Stop the local cluster with `pg_ctl stop` (fast shutdown), if its recorded postmaster still runs."""
    if not _identity(entry).is_alive():
        return f"postgres (PID {entry['pid']}) had stopped already"
    pgdata = state_dir / "pgdata"
    account = _cluster_account()
    command = [postgres_program("pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "-t", str(STOP_GRACE_SECONDS)]
    stopped = subprocess.run([*command, "stop"], cwd=pgdata, capture_output=True, text=True, **_as_account(account))
    if stopped.returncode != 0 and _identity(entry).is_alive():  # pg_ctl could not do it: signal it by its PID
        return stop_process(entry)
    return f"postgres (PID {entry['pid']}) stopped"


# -- processes ---------------------------------------------------------------------------------------------------------
def check_port_free(port: int, option: str) -> None:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError as error:
            raise StackError(
                f"port {port} on {HOST} is taken ({error.strerror}): choose another with {option}"
            ) from None


def _identity(entry: Mapping) -> ProcessIdentity:
    return ProcessIdentity(host=socket.gethostname(), pid=int(entry["pid"]), started=entry.get("started", ""))


def _signal(pid: int, started: str, signum: int) -> None:
    if start_ticks(pid) == started:  # still that process, not another one that got its PID
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait_gone(processes: list[tuple[int, str]], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(start_ticks(pid) == started for pid, started in processes):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def stop_process(entry: Mapping, grace: float = STOP_GRACE_SECONDS) -> str:
    """Stop a recorded process and what it started: SIGTERM, again halfway through grace, then SIGKILL.

    The second SIGTERM is for a Prefect worker that ignores SIGINT and only stops on its second SIGTERM (Prefect 3.9
    utilities/processutils.py). Descendants are found before it stops: a process worker starts each flow run in a
    session of its own, where the worker's end does not reach it.
    """
    name, pid, started = entry["name"], int(entry["pid"]), entry.get("started", "")
    if not _identity(entry).is_alive():
        return f"{name} (PID {pid}) had stopped already"
    family = [(pid, started), *descendants(pid)]
    for signum in (signal.SIGTERM, signal.SIGTERM):
        _signal(pid, started, signum)
        if _wait_gone(family[:1], grace / 2):
            break
    for signum, seconds in ((signal.SIGTERM, grace / 2), (signal.SIGKILL, 5)):
        if _wait_gone(family, 0):
            break
        for member_pid, member_started in family:
            _signal(member_pid, member_started, signum)
        _wait_gone(family, seconds)
    left = [member for member in family if start_ticks(member[0]) == member[1]]
    return f"{name} (PID {pid}) stopped" if not left else f"{name}: PIDs {[p for p, _ in left]} would not stop"


def _spawn(name: str, command: list[str], env: Mapping[str, str], log: Path) -> tuple[subprocess.Popen, dict]:
    """Start command in a session of its own, output to log; return it and its pids.json entry."""
    with log.open("ab") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env=dict(env), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    entry = {"name": name, "pid": process.pid, "started": start_ticks(process.pid) or "", "log": str(log)}
    return process, entry


def _run_logged(
    command: list[str], log: Path, *, env: Mapping[str, str] | None = None, cwd: Path = ROOT, account=None
) -> None:
    """Run command to its end with its output in log; raise StackError naming the log if it fails."""
    with log.open("ab") as output:
        done = subprocess.run(
            command, cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, **_as_account(account),
        )  # fmt: skip
    if done.returncode != 0:
        shown = " ".join([Path(command[0]).name, *command[1:3]])
        raise StackError(f"`{shown} ...` exited {done.returncode}: {_last_line(log)} (log: {log})")


def _wait_until(what: str, ready: Callable[[], bool], process: subprocess.Popen, log: Path, seconds: float) -> None:
    """Poll ready() until it is true; raise StackError with the log's last line if process exits or time runs out."""
    deadline = time.monotonic() + seconds
    while not ready():
        if process.poll() is not None:
            raise StackError(f"{what} exited ({process.returncode}) while starting: {_last_line(log)} (log: {log})")
        if time.monotonic() >= deadline:
            raise StackError(f"{what} did not answer in {seconds:.0f} s: {_last_line(log)} (log: {log})")
        time.sleep(0.5)


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_registered(api_url: str) -> bool:
    import httpx

    try:
        listed = httpx.post(f"{api_url}/work_pools/{WORKER_POOL}/workers/filter", json={}, timeout=10)
    except httpx.HTTPError:
        return False
    return listed.status_code == 200 and any(worker["name"] == WORKER_NAME for worker in listed.json())


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or "(no message)"


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else "(empty log)"


# -- the stack ---------------------------------------------------------------------------------------------------------
def _pids_file(state_dir: Path) -> Path:
    return state_dir / "pids.json"


def read_record(state_dir: Path) -> dict | None:
    """The pids.json of the stack last started from state_dir, or None when there is none."""
    try:
        return json.loads(_pids_file(state_dir).read_text())
    except FileNotFoundError:
        return None


def _write_record(state_dir: Path, record: Mapping) -> None:
    write_text_atomically(_pids_file(state_dir), json.dumps(record, indent=2) + "\n")  # never half a file


def running(state_dir: Path) -> list[dict]:
    """The recorded processes of state_dir's stack that still run."""
    record = read_record(state_dir) or {"processes": []}
    return [entry for entry in record["processes"] if _identity(entry).is_alive()]


def work_pools() -> list[str]:
    """The work pools prefect.yaml's deployments name (each must exist before `prefect deploy --all`)."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return sorted({deployment["work_pool"]["name"] for deployment in config["deployments"]})


def _environment(api_url: str, state_dir: Path) -> dict[str, str]:
    """This process's environment for the stack's Prefect processes, pointed at its server and profile home, with
    this environment's scripts first on PATH.

    A Prefect Cloud key or profile in the caller's environment is dropped: it would send them elsewhere.
    """
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_KEY", "PREFECT_PROFILE")}
    env.update(
        {
            "PREFECT_API_URL": api_url,
            "PREFECT_HOME": str(state_dir / "prefect-home"),
            "PREFECT_CLI_PROMPT": "false",
            # This environment's `python` first, as in an activated venv: prefect.yaml's install pull step runs
            # `python -m pip`, which must be the worker's own interpreter, not the system's.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        }
    )
    return env


def check_drivers() -> None:
    """Refuse to start when a PostgreSQL driver is missing: the servers would only fail at their first query."""
    missing = [name for name in ("asyncpg", "psycopg") if importlib.util.find_spec(name) is None]
    if missing:
        raise StackError(
            f"the PostgreSQL driver(s) {', '.join(missing)} are not installed in {sys.prefix}: run `make install` "
            "(they are dependencies in pyproject.toml)"
        )


def up(settings: StackSettings, say: Callable[[str], None] = lambda _: None) -> Stack:
    """Start the stack; on any failure stop what had started and raise. say(message) reports each step."""
    check_drivers()
    state_dir = settings.state_dir.resolve()
    if running(state_dir):
        raise StackError(
            f"a stack runs from {state_dir} already: `pets stack status` shows it, `pets stack down` ends it"
        )
    external = check_server_url(settings.pg_url) if settings.pg_url else None
    if external is not None:  # before anything starts: a server that is down leaves nothing behind
        wait_for_postgres(external, EXTERNAL_PG_WAIT_SECONDS)
    for port, option in ((settings.prefect_port, "--prefect-port"), (settings.mlflow_port, "--mlflow-port")):
        check_port_free(port, option)
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (state_dir / "artifacts").mkdir(exist_ok=True)
    prefect_url, mlflow_url = f"http://{HOST}:{settings.prefect_port}", f"http://{HOST}:{settings.mlflow_port}"
    record = {
        "state_dir": str(state_dir),
        "postgres": {"url": redact_url(external) if external else None, "local": external is None},
        "prefect_url": prefect_url,
        "mlflow_url": mlflow_url,
        "processes": [],
    }

    def started(entry: dict) -> None:
        record["processes"].append(entry)
        _write_record(state_dir, record)

    _write_record(state_dir, record)
    try:
        if external is None:
            say(f"Starting PostgreSQL on {HOST}:{settings.pg_port} (cluster in {state_dir / 'pgdata'})")
            server_url = start_local_postgres(state_dir, settings.pg_port, started)
            record["postgres"]["url"] = server_url
            _write_record(state_dir, record)
        else:
            server_url = external
        create_databases(server_url)
        api_url = prefect_url + "/api"
        env = _environment(api_url, state_dir)

        say(f"Starting the Prefect server on {prefect_url}")
        bin_dir = Path(sys.executable).parent  # this environment's `prefect` and `mlflow` scripts
        prefect_env = {**env, "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url(server_url, "prefect", "asyncpg")}
        command = [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(settings.prefect_port)]
        server, entry = _spawn("prefect-server", command, prefect_env, logs / "prefect-server.log")
        started(entry)
        _wait_until(
            "the Prefect server",
            lambda: _answers(api_url + "/health"),
            server,
            Path(entry["log"]),
            PREFECT_WAIT_SECONDS,
        )

        say(f"Starting the MLflow tracking server on {mlflow_url}")
        command = [
            str(bin_dir / "mlflow"), "server", "--host", HOST, "--port", str(settings.mlflow_port),
            "--workers", str(MLFLOW_WORKERS), "--backend-store-uri", database_url(server_url, "mlflow", "psycopg"),
            "--serve-artifacts", "--artifacts-destination", str(state_dir / "artifacts"),
        ]  # fmt: skip
        # No huey job runner: MLflow 3.17 starts ~8 more processes for it on a database store, for jobs unused here.
        mlflow_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        tracking, entry = _spawn("mlflow-server", command, mlflow_env, logs / "mlflow-server.log")
        started(entry)
        # /health answers before the store is touched: reading the experiment every store has proves the database.
        store_probe = f"{mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        _wait_until(
            "the MLflow tracking server", lambda: _answers(store_probe), tracking, Path(entry["log"]),
            MLFLOW_WAIT_SECONDS,
        )  # fmt: skip

        say("Creating the work pools and deploying prefect.yaml")
        prefect = str(bin_dir / "prefect")
        for pool in work_pools():  # `prefect deploy --all` stops at the first pool that does not exist
            _run_logged(
                [prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], logs / "deploy.log", env=env
            )
        _run_logged([prefect, "--no-prompt", "deploy", "--all"], logs / "deploy.log", env=env)

        say(f"Starting a worker on the {WORKER_POOL} pool")
        command = [prefect, "worker", "start", "--pool", WORKER_POOL, "--name", WORKER_NAME]
        worker, entry = _spawn("worker", command, {**env, "MLFLOW_TRACKING_URI": mlflow_url}, logs / "worker.log")
        started(entry)
        _wait_until(
            f"the {WORKER_POOL} worker", lambda: _worker_registered(api_url), worker, Path(entry["log"]),
            WORKER_WAIT_SECONDS,
        )  # fmt: skip
    except BaseException:  # a failure or Ctrl-C: nothing it started may be left running
        down(state_dir)
        raise
    return Stack(
        state_dir=state_dir,
        postgres_url=redact_url(server_url),
        local_postgres=external is None,
        prefect_url=prefect_url,
        mlflow_url=mlflow_url,
    )


def down(state_dir: Path) -> list[str]:
    """Stop the recorded processes, newest first (worker, MLflow, Prefect, then the local PostgreSQL); one line each.

    Idempotent: a process that has stopped is skipped, and without a record there is nothing to do.
    """
    state_dir = state_dir.resolve()
    record = read_record(state_dir)
    if record is None:
        return [f"No stack recorded in {state_dir}: nothing to stop."]
    messages = []
    for entry in reversed(record["processes"]):
        if entry["name"] == "postgres":
            messages.append(stop_local_postgres(state_dir, entry))
        else:
            messages.append(stop_process(entry))
    _pids_file(state_dir).unlink(missing_ok=True)
    return messages


def status(state_dir: Path) -> list[str]:
    """One line per recorded process of state_dir's stack: its name, PID, whether it runs, and its log."""
    record = read_record(state_dir.resolve())
    if record is None:
        return [f"No stack recorded in {state_dir.resolve()}: `pets stack up` starts one."]
    lines = [f"PostgreSQL {record['postgres']['url']}, Prefect {record['prefect_url']}, MLflow {record['mlflow_url']}"]
    for entry in record["processes"]:
        state = "running" if _identity(entry).is_alive() else "stopped"
        lines.append(f"{entry['name']:<15} PID {entry['pid']:<8} {state:<8} log: {entry['log']}")
    return lines
