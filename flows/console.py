"""What the `pets` command prints around a run: each user error once, as one line, and no telemetry.

- A `UserError` (lib/common/errors.py), wherever it is raised, ends the command with `Error: <message>` on one line
  and exit status 2; a usage error typer or click finds (an unknown option, `--arch nope`) ends the same way.
  `pets --debug` (or PETS_DEBUG=1) adds the traceback. Any other exception is a bug and keeps its one traceback.
- While a flow runs in the CLI's process, Prefect's run loggers would tell a failure up to five times (the task's
  "Task run failed with exception" with its traceback, its "Finished in state Failed(...)", the flow's "Encountered
  exception during execution" with the traceback again and its own final state) before the CLI's line.
  `quiet_run_logs` filters the console: records about a user error go, and a bug's traceback is shown once. The
  records still reach the Prefect API, and flow runs under a worker or a deployment are not filtered at all: there
  Prefect's log is the record.
- Ctrl-C stops a command in order (`Interruptions`): the flow marks its MLflow run KILLED and the CLI ends with one
  line saying how to resume it, exit status 130; a second Ctrl-C quits at once.
- Telemetry is off unless the user opts in, for the CLI and every process it starts (Prefect's temporary server, the
  training stages, `mlflow ui`): `quiet_telemetry` runs when flows/cli.py is imported, before Prefect or MLflow is.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperGroup

from lib.common.errors import UserError, debug_requested, user_error_names

# Prefect 3.9 server/services/telemetry.py sends its heartbeat when the server starts (a Perpetual service with
# automatic=True, then every 600 s) unless PREFECT_SERVER_ANALYTICS_ENABLED is false; its SDK
# (_internal/analytics/enabled.py) honours DO_NOT_TRACK in ("1", "true", "yes") and MLflow 3.17
# (telemetry/utils.py is_telemetry_disabled) DO_NOT_TRACK == "true" or MLFLOW_DISABLE_TELEMETRY.
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
USER_ERROR_EXIT = 2  # click's exit status for a usage error: both mean "fix the command line or its inputs"
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what shells report for a job Ctrl-C stopped
# Prefect 3.9 logging/loggers.py: the loggers of flow_run_logger and task_run_logger.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# Prefect 3.9 states.py: a failed state's message is "<what> encountered an exception[:] <Type>: <message>"
# (exception_to_failed_state, format_exception), and the engines log "Finished in state Failed('<that message>')".
_FAILED_STATE = re.compile(r"encountered an exception:? (\w+): ")


def quiet_telemetry() -> None:
    """Turn Prefect's and MLflow's telemetry off in this process and its children, unless the user set them."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)


class RepeatedErrorFilter(logging.Filter):
    """Keep Prefect's run logs on the console from repeating an error the CLI reports.

    Dropped: every record about a `UserError` (its exception, an argument, or a failed state naming its type), a
    record carrying the traceback of an exception whose traceback was already shown, and every record after Ctrl-C.
    Nothing is dropped with PETS_DEBUG set.
    """

    def __init__(self) -> None:
        super().__init__()
        self._shown: list[BaseException] = []  # the exceptions themselves: an id could be reused once one is freed

    def filter(self, record: logging.LogRecord) -> bool:
        if debug_requested() or not record.name.startswith(RUN_LOGGERS):
            return True
        if INTERRUPTIONS.count:  # what each run says as Ctrl-C stops it ("Crash detected! ..."): the CLI says it once
            return False
        error = record.exc_info[1] if record.exc_info else None
        arguments = record.args if isinstance(record.args, tuple) else ()
        if isinstance(error, UserError) or any(isinstance(argument, UserError) for argument in arguments):
            return False
        if error is None:
            named = _FAILED_STATE.search(record.getMessage())
            return named is None or named.group(1) not in user_error_names()
        if any(error is shown for shown in self._shown):
            return False  # the flow logging the exception its task raised, traceback and all
        self._shown.append(error)
        return True


_FILTER = RepeatedErrorFilter()


def quiet_run_logs() -> None:
    """Filter the console handlers of Prefect's logging (not the one that sends records to the API)."""
    from prefect.logging.handlers import PrefectConsoleHandler  # Prefect 3.9 logging/logging.yml: root's "console"

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in RUN_LOGGERS)]
    for handler in {handler for logger in loggers for handler in logger.handlers}:
        if isinstance(handler, PrefectConsoleHandler) and _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def one_line(message: str) -> str:
    """The message on one line: its lines joined by spaces."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def say_error(message: str) -> None:
    typer.secho(f"Error: {one_line(message)}", err=True, fg=typer.colors.RED)


def report_user_error(error: UserError) -> None:
    """Print a user error as one line (after its traceback, with PETS_DEBUG)."""
    if debug_requested():
        traceback.print_exception(error)
    say_error(str(error))


class Interruptions:
    """Ctrl-C while a command runs: the first stops it in order, a second one quits at once.

    The first SIGINT raises KeyboardInterrupt, as Python's default handler does: the flow marks its MLflow run
    KILLED, the stage process stops between batches, the temporary Prefect API is stopped. A second SIGINT during
    that exits the process straight away; the processes it started stop by themselves within a second (they watch
    their parent), and the next `pets train` marks the run it leaves RUNNING as FAILED.
    """

    def __init__(self) -> None:
        self.count = 0

    def handle(self, signum: int, frame: object) -> None:
        self.count += 1
        # os.write: print() could be interrupted inside a write of its own and refuse a reentrant call
        if self.count > 1:
            os.write(sys.stderr.fileno(), b"\nInterrupted again: quitting at once.\n")
            os._exit(INTERRUPTED_EXIT)
        os.write(sys.stderr.fileno(), b"\nStopping (Ctrl-C again quits at once) ...\n")
        raise KeyboardInterrupt

    @contextmanager
    def handled(self) -> Iterator[None]:
        """Handle SIGINT this way while the block runs (a command); the handler before it is put back after."""
        if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
            yield
            return
        self.count = 0
        previous = signal.signal(signal.SIGINT, self.handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


INTERRUPTIONS = Interruptions()


def report_interrupt(error: BaseException) -> None:
    """Print what Ctrl-C left behind: the resume line of the run it stopped, when one was stopped."""
    message = one_line(str(error))
    typer.secho(f"Interrupted. {message}".strip(), err=True, fg=typer.colors.YELLOW)


class Commands(TyperGroup):
    """The `pets` command group: a user error or a usage error ends a command with one `Error:` line and exit 2."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # a caller that handles the exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            with INTERRUPTIONS.handled():
                code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as error:  # typer 0.29's own click exceptions derive from it
            if type(error).__name__ == "NoArgsIsHelpError":  # `pets` alone: the help is printed already
                sys.exit(error.exit_code)
            command = getattr(getattr(error, "ctx", None), "command_path", None)
            hint = f" (see `{command} --help`)" if command else ""
            say_error(error.format_message().replace("Value error, ", "") + hint)  # pydantic's prefix, via typer
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except UserError as error:
            report_user_error(error)
            sys.exit(USER_ERROR_EXIT)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as error:  # typer 0.29 would turn it into a silent exit 130 (typer/core.py _main)
            report_interrupt(error)
            raise typer.Exit(INTERRUPTED_EXIT) from None
