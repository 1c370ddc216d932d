"""Numeric settings: sizes, durations and integers, finite and within bounds, or refused.

YAML hands the loader `.nan` and `.inf` floats, booleans (an `int` subclass in Python), and integers
of any size; flags and the environment hand it text such as "nan" or "1e400". Each used to pass or
fail late: `drain_timeout: .nan` hung the drain, `settle_time: .inf` never completed a file, and
`bandwidth_limit: .inf` ended in an OverflowError traceback. Values are read as exact fractions, so
nothing overflows while it is checked, and every bound is checked before a float or int is made.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from daemon.logs import redact

Parser = Callable[[Any], Any]

KiB, MiB, GiB, TiB, PiB = (1 << 10), (1 << 20), (1 << 30), (1 << 40), (1 << 50)
# No size setting means anything near this: it only keeps absurd values from overflowing later.
MAX_SIZE = PiB
# Longer than any pod lives; beyond it a timer or threading wait overflows (threading.TIMEOUT_MAX).
MAX_DURATION = 30 * 86400.0

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": KiB,
    "m": 1000**2, "mb": 1000**2, "mib": MiB,
    "g": 1000**3, "gb": 1000**3, "gib": GiB,
    "t": 1000**4, "tb": 1000**4, "tib": TiB,
}  # fmt: skip
_DURATION_UNITS = {"ms": Fraction(1, 1000), "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400}
# No exponent: Fraction("1e999999999") would build a billion-digit integer.
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([A-Za-z]*)\s*")
_NON_FINITE = re.compile(r"(?i)\s*[+-]?\.?(?:nan|inf|infinity)\s*")
_INTEGER = re.compile(r"\s*([+-]?\d{1,30})\s*")

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 4, 4, 2


def show(value: Any) -> str:
    """A bad value as an error message quotes it: bounded (a YAML alias bomb has a huge repr), one line,
    and without credentials."""
    return redact(_repr.repr(value))


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} (not a finite number)"
    return show(value) if isinstance(value, str | int | float) else f"a {type(value).__name__}"


def exact(value: Any, units: dict[str, Any], what: str, example: str) -> Fraction:
    """`value` (a number, or text with a unit) as an exact count of the base unit.

    | value                  | result                                |
    |------------------------|---------------------------------------|
    | 64, 1.5, "64MiB"       | 64, 3/2, 67108864                     |
    | true / false           | ValueError: a boolean is no number    |
    | .nan, .inf, "-inf"     | ValueError: must be finite            |
    | "1e400", "10MiB/s", [] | ValueError: expected a WHAT such as .. |
    """
    expected = f"expected a {what} such as {example}"
    if isinstance(value, bool):
        raise ValueError(f"{expected}, got {_kind(value)}")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"must be a finite {what} such as {example}, got {_kind(value)}")
        return Fraction(value)
    if not isinstance(value, str):
        raise ValueError(f"{expected}, got {_kind(value)}")
    if _NON_FINITE.fullmatch(value):
        raise ValueError(f"must be a finite {what} such as {example}, got {show(value)}")
    m = _NUMBER.fullmatch(value) if len(value) <= 64 else None
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"{expected}, got {show(value)}")
    return Fraction(m.group(1)) * units[m.group(2).lower()]


def human_size(n: int) -> str:
    for unit, factor in (("PiB", PiB), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes" if n != 0 else "0"


def size(minimum: int = 0, maximum: int = MAX_SIZE) -> Parser:
    """Bytes, as an integer or with a unit: 8MiB, 64MB, 1GiB. A fraction of a byte is rounded down,
    except below one byte, where rounding would turn a small value into 0 (often: "unlimited")."""

    def parse(value: Any) -> int:
        q = exact(value, _SIZE_UNITS, "size", "64MiB")
        if q < minimum or q > maximum or 0 < q < 1:
            raise ValueError(
                f"must be a size between {human_size(minimum)} and {human_size(maximum)}, got {show(value)}"
            )
        return math.floor(q)

    return parse


def _seconds(s: float) -> str:
    return f"{s / 86400:g}d" if s >= 86400 else f"{s:g}s"


def duration(minimum: float = 0.0, maximum: float = MAX_DURATION) -> Parser:
    """Seconds, as a number or with a unit: 500ms, 30s, 5m, 1h."""

    def parse(value: Any) -> float:
        q = exact(value, _DURATION_UNITS, "duration", "30s")
        if q < Fraction(minimum) or q > Fraction(maximum):
            bounds = f"between {_seconds(minimum)} and {_seconds(maximum)}"
            raise ValueError(f"must be a duration {bounds}, got {show(value)}")
        return float(q)

    return parse


def integer(minimum: int, maximum: int) -> Parser:
    """A whole number within bounds; YAML 4.0, true and .inf are refused, not truncated."""

    def parse(value: Any) -> int:
        non_finite = isinstance(value, float) and not math.isfinite(value)
        if non_finite or (isinstance(value, str) and _NON_FINITE.fullmatch(value)):
            raise ValueError(f"must be a finite integer, got {_kind(value)}")
        m = _INTEGER.fullmatch(value) if isinstance(value, str) else None
        if isinstance(value, bool) or not (m or isinstance(value, int)):
            raise ValueError(f"expected an integer, got {_kind(value)}")
        n = int(m.group(1)) if m else value
        if not minimum <= n <= maximum:
            raise ValueError(f"must be an integer between {minimum} and {maximum}, got {show(value)}")
        return n

    return parse
