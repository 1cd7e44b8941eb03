"""Progress bars only where they can redraw in place: a terminal, or when asked."""

import io
import sys

import pytest

from lib.common.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "show", "drawn"),
    [(Terminal, None, True), (io.StringIO, None, False), (io.StringIO, True, True), (Terminal, False, False)],
)
def test_a_bar_is_drawn_on_a_terminal_unless_told_otherwise(monkeypatch, stream, show, drawn):
    stderr = stream()
    monkeypatch.setattr(sys, "stderr", stderr)
    for _ in progress_bar(range(3), show=show, desc="counting"):
        pass
    assert ("counting" in stderr.getvalue()) is drawn
    if not drawn:
        assert stderr.getvalue() == ""  # not even a carriage return
