"""Checked conversions of user-typed values: numbers, flags and ``name:weight`` lists.

Every host reads these from strings, JSON or widgets; each conversion either returns a value in
range or raises an :class:`~lib_spm.errors.SPMValueError` naming what was wrong.
"""

from __future__ import annotations

import math
import re

from .errors import SPMValueError

_DIGITS = re.compile(r"[+-]?[0-9]+")


def number(value, what: str, lo: float, hi: float) -> float:
    """A finite number in ``[lo, hi]`` from an int, float or numeric string (never a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SPMValueError(f"{what} must be a number, not {type(value).__name__}")
    try:
        x = float(value)
    except (ValueError, OverflowError):
        raise SPMValueError(f"{what} must be a number, not {value!r}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise SPMValueError(f"{what} must be {_range(lo, hi)}, not {value!r}")
    return x


def whole(value, what: str, lo: float = -math.inf, hi: float = math.inf) -> int:
    """A whole number in ``[lo, hi]``: what :func:`number` takes, with no fraction (``3.0`` is 3).
    Ints and digit strings stay exact (a seed above 2**53 is not rounded through a float)."""
    exact = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        exact = int(value.strip())
    if exact is None:
        x = number(value, what, lo, hi)
        if x != int(x):
            raise SPMValueError(f"{what} must be a whole number, not {value!r}")
        return int(x)
    if not lo <= exact <= hi:
        raise SPMValueError(f"{what} must be {_range(lo, hi)}, not {value!r}")
    return exact


def _range(lo: float, hi: float) -> str:
    if math.isinf(lo) and math.isinf(hi):
        return "a finite number"
    if math.isinf(hi):
        return f"at least {lo:g}"
    if math.isinf(lo):
        return f"at most {hi:g}"
    return f"between {lo:g} and {hi:g}"


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


def name_weight(part: str, *, what: str = "weight", lo: float = -math.inf,
                hi: float = math.inf) -> tuple[str, float | None]:
    """``"name:0.5"`` -> ``("name", 0.5)``: the weight is what follows the last colon (so a name
    may hold colons, a weight not), checked by :func:`number`. Without a colon: ``(part, None)``,
    which each caller reads its own way (a name at the default weight, a weight, a path)."""
    name, sep, value = part.strip().rpartition(":")
    if not sep:
        return part.strip(), None
    name = name.strip()
    if not name:
        raise SPMValueError(f"{part!r} has no name before its {what}")
    return name, number(value.strip(), f"{what} of {name!r}", lo, hi)


def parse_name_weights(text: str, *, what: str = "weight", lo: float = -math.inf, hi: float = math.inf,
                       default: float = 1.0) -> list[tuple[str, float]]:
    """``"a:1, b:0.5, c"`` -> ``[("a", 1.0), ("b", 0.5), ("c", default)]`` (see :func:`name_weight`)."""
    out = []
    for part in split_list(text):
        name, weight = name_weight(part, what=what, lo=lo, hi=hi)
        out.append((name, number(default, f"{what} of {name!r}", lo, hi) if weight is None else weight))
    return out
