"""Number formatting shared by the terminal table and the Markdown report, so the two agree."""
from __future__ import annotations

MISSING = "-"


def num(value, digits: int = 1) -> str:
    """Fixed decimals; integers stay integers; None is '-'."""
    if value is None:
        return MISSING
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def percent(fraction) -> str:
    return MISSING if fraction is None else f"{fraction * 100:.1f}%"


def ratio(value) -> str:
    return MISSING if value is None else f"{value:.2f}x"


def count(value) -> str:
    """Counters arrive as floats from Prometheus; they are whole numbers."""
    return MISSING if value is None else str(int(round(value)))
