"""JSON as a file may carry it, parsed so that nothing in it can raise anything but ``SPMFormatError``.

Python's ``json`` accepts what strict JSON does not (``NaN``, ``Infinity``, ``1e400`` -> inf),
recurses once per nesting level (``RecursionError`` at ~1000), converts digits of any length
(``ValueError`` past 4,300) and lets ``"\\ud800"`` through as a lone surrogate that no UTF-8
writer can print. A header or metadata value is a few shallow objects, so all of that is refused.
"""

from __future__ import annotations

import json
import math

from ..errors import SPMFormatError

MAX_DEPTH = 32  # a safetensors header is 3 deep, our metadata values at most 4
MAX_DIGITS = 24  # 2**64 has 20 digits: every honest offset, shape or rank fits


def loads(text: str | bytes, what: str) -> object:
    """Parse ``text``; raise :class:`SPMFormatError` naming ``what`` for anything not plain JSON."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_int=_int, parse_float=_float,
                           object_pairs_hook=_object)
    except _Refused as e:
        raise SPMFormatError(f"{what} {e}") from None
    except RecursionError:
        raise SPMFormatError(f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SPMFormatError(f"{what} is not valid JSON ({e.__class__.__name__})") from None
    _check_tree(value, what)
    return value


class _Refused(ValueError):
    pass


def _no_constant(name: str):
    raise _Refused(f"holds {name}, which is not a JSON number")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise _Refused(f"holds a {len(text)}-digit number")
    return int(text)


def _float(text: str) -> float:
    if len(text) > 64:
        raise _Refused(f"holds a {len(text)}-character number")
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"holds {text[:24]}, which overflows a float")
    return value


def _object(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"has the key {show(key)} twice")
        out[key] = value
    return out


def _check_tree(value: object, what: str) -> None:
    """Depth and text checks without recursion (the parser already bounded the depth by ~1000)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SPMFormatError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, str):
            check_text(item, what)
        elif isinstance(item, dict):
            for k, v in item.items():
                check_text(k, what)
                stack.append((v, depth + 1))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def check_text(s: str, what: str) -> None:
    """Refuse strings holding lone surrogates: not text, and no UTF-8 output can carry them."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SPMFormatError(f"{what} holds a lone surrogate (\\u{ord(s[e.start]):04x}), which is not text") from None


def show(s: str) -> str:
    """A value for a one-line message: quoted, newlines and lone surrogates escaped, cut short."""
    return repr(s if len(s) <= 120 else s[:120] + "...")


def type_name(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
