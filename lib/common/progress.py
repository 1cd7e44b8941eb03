"""Progress of long steps: a bar on a terminal, and a callback for whoever runs the step (a Prefect task).

A tqdm bar redraws itself in place with carriage returns. Redirected into a file, a CI log or a log collector, every
redraw stays: a line of `\\r` garbage per update. So a bar is drawn only when its stream is a terminal, unless the
caller says otherwise (tqdm 4.70 std.py: `disable=None` disables it on a non-TTY; tqdm.notebook shows it in Jupyter).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from tqdm.auto import tqdm

# `on_progress(done, total)`: called as a long step advances, e.g. to move a progress bar in an orchestrator's UI.
ProgressCallback = Callable[[int, int], None]


def progress_bar(iterable: Iterable[Any] | None = None, *, show: bool | None = None, **settings: Any) -> tqdm:
    """Return a tqdm bar on stderr: drawn on a terminal when `show` is None, always when True, never when False."""
    return tqdm(iterable, disable=None if show is None else not show, file=sys.stderr, **settings)
