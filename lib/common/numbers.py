"""Numbers as tables and logs show them: 4 significant digits, trailing zeros kept (0.1034, 2.000, 0.0007586)."""

from __future__ import annotations

from typing import Any

SIGNIFICANT_DIGITS = 4


def significant(value: Any, digits: int = SIGNIFICANT_DIGITS) -> str:
    """Render a float to `digits` significant digits, None as empty and anything else as str (counts stay exact)."""
    if value is None:
        return ""
    return f"{value:#.{digits}g}" if isinstance(value, float) else str(value)


def rounded(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """Round a float to `digits` significant digits, keeping it a number (a table sorts on it); others as they are."""
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value
