"""The errors a user can fix, told apart from bugs.

A `UserError` is printed by the `pets` CLI as one line, `Error: <message>`, with exit status 2 and no traceback
(`pets --debug` or PETS_DEBUG=1 shows it); any other exception is a bug and keeps its traceback. Every error the
pipeline raises about its inputs derives from `UserError`, next to the built-in type callers already catch
(`class UnsafeArchiveError(UserError, ValueError)`).
"""

from __future__ import annotations

import os

DEBUG_VARIABLE = "PETS_DEBUG"  # set by `pets --debug`, inherited by the training stages' processes


class UserError(Exception):
    """An error the user can fix: the message names the input that caused it (an option, a file, a URL) and the fix."""


class InputError(UserError, ValueError):
    """A value, file or dataset the pipeline cannot work with; the message names it and what to give instead."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class NotAFolderError(UserError, NotADirectoryError):
    """A path the user gave as a folder is a file, or does not exist."""


def debug_requested() -> bool:
    """Whether tracebacks of user errors are wanted too (PETS_DEBUG set to anything but empty, 0 or false)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def user_error_names() -> frozenset[str]:
    """The class names of every UserError subclass imported so far: how a state message that names one is recognised."""
    names, pending = set(), [UserError]
    while pending:
        kind = pending.pop()
        names.add(kind.__name__)
        pending += kind.__subclasses__()
    return frozenset(names)
