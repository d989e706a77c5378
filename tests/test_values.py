"""The one checked reader of user-typed numbers and ``name:weight`` entries (lib_spm/values.py)."""

from __future__ import annotations

import math

import pytest

from lib_spm.errors import SPMValueError
from lib_spm.values import name_weight, number, parse_name_weights, whole


@pytest.mark.parametrize("value,lo,hi,message", [
    ("x", 0, 1, "must be a number, not 'x'"),
    (True, 0, 1, "must be a number, not bool"),
    (None, 0, 1, "must be a number, not NoneType"),
    (2, 0, 1, "must be between 0 and 1, not 2"),
    (float("nan"), 0, 1, "must be between 0 and 1"),
    (-1, 0, math.inf, "must be at least 0, not -1"),
    ("5", -math.inf, 4, "must be at most 4, not '5'"),
    ("inf", -math.inf, math.inf, "must be a finite number, not 'inf'"),
    (float("nan"), -math.inf, math.inf, "must be a finite number"),
])
def test_number_refuses_with_the_range_it_wanted(value, lo, hi, message):
    with pytest.raises(SPMValueError, match="^w " + message):
        number(value, "w", lo, hi)


def test_number_accepts_ints_floats_and_numeric_strings():
    assert [number(v, "w", -1, 1) for v in (0, 0.5, " -1 ", "1e-1")] == [0.0, 0.5, -1.0, 0.1]


def test_whole_takes_integral_numbers_only():
    assert [whole(v, "n", 0) for v in (3, 3.0, " 7 ", "1e2")] == [3, 3, 7, 100]
    assert all(type(whole(v, "n")) is int for v in (3.0, "4"))
    assert whole(2**64 - 1, "n") == whole(str(2**64 - 1), "n") == 2**64 - 1  # exact, not through a float
    for bad, message in [(2.5, "^n must be a whole number, not 2.5$"), ("x", "^n must be a number"),
                         (-1, "^n must be at least 0, not -1$"), ("-2", "^n must be at least 0, not '-2'$"),
                         ("²", "^n must be a number"),
                         (True, "not bool")]:
        with pytest.raises(SPMValueError, match=message):
            whole(bad, "n", 0)


def test_name_weight_splits_at_the_last_colon():
    assert name_weight(" a : 0.5 ") == ("a", 0.5)
    assert name_weight("C:/x/a.safetensors:2") == ("C:/x/a.safetensors", 2.0)
    assert name_weight(" plain ") == ("plain", None)
    for bad, message in [(":1", "no name"), ("a:x", "weight of 'a' must be a number"), ("a:", "must be a number")]:
        with pytest.raises(SPMValueError, match=message):
            name_weight(bad)
    with pytest.raises(SPMValueError, match="strength of 'a' must be between -1 and 1"):
        name_weight("a:3", what="strength", lo=-1, hi=1)


def test_parse_name_weights_defaults_bare_names_and_checks_the_default_too():
    assert parse_name_weights("a:1, b:0.5\nc", default=0.25) == [("a", 1.0), ("b", 0.5), ("c", 0.25)]
    assert parse_name_weights(" , \n") == []
    with pytest.raises(SPMValueError, match="weight of 'c' must be at most 0.5"):
        parse_name_weights("a:0.1, c", hi=0.5)
