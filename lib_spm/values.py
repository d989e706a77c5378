"""Checked conversions of user-typed values: numbers, flags and ``name:weight`` lists.

Every host reads these from strings, JSON or widgets; each conversion either returns a value in
range or raises an :class:`~lib_spm.errors.SPMValueError` naming what was wrong.
"""

from __future__ import annotations

import math

from .errors import SPMValueError


def number(value, what: str, lo: float, hi: float) -> float:
    """A finite number in ``[lo, hi]`` from an int, float or numeric string (never a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SPMValueError(f"{what} must be a number, not {type(value).__name__}")
    try:
        x = float(value)
    except (ValueError, OverflowError):
        raise SPMValueError(f"{what} must be a number, not {value!r}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise SPMValueError(f"{what} must be between {lo:g} and {hi:g}, not {value!r}")
    return x


def flag(value, what: str) -> bool:
    """A bool from a bool, 0/1 or one of true/false/on/off/1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "on", "off", "1", "0"):
        return value.strip().lower() in ("true", "on", "1")
    raise SPMValueError(f"{what} must be true or false, not {value!r}")


def split_list(text: str) -> list[str]:
    """Comma- or newline-separated entries, stripped, empty ones dropped."""
    return [p.strip() for line in text.splitlines() for p in line.split(",") if p.strip()]


def parse_name_weights(text: str, *, what: str = "weight", lo: float = -math.inf, hi: float = math.inf,
                       default: float = 1.0) -> list[tuple[str, float]]:
    """``"a:1, b:0.5, c"`` -> ``[("a", 1.0), ("b", 0.5), ("c", default)]``; the weight is what
    follows the last colon, so names may not hold one."""
    out = []
    for part in split_list(text):
        name, sep, value = part.rpartition(":")
        if not sep:
            name, value = part, default
        name = name.strip()
        if not name:
            raise SPMValueError(f"{part!r} has no name before its {what}")
        out.append((name, number(value.strip() if isinstance(value, str) else value, f"{what} of {name!r}", lo, hi)))
    return out
