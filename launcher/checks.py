"""Checks of flag values, written once: each takes the flag's name and the value as given and
returns it typed, or raises ``BadOption(option, value, reason)`` (one line, exit 2).

Pure functions: no I/O (``hub_timeout`` reads its environment variable). Every number from a
flag gets a type and a range here, so that a value such as ``1e305`` or ``-0`` is refused in words
instead of overflowing later.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Iterable
from typing import TypeVar

from .errors import BadOption

T = TypeVar("T")
_WHOLE = re.compile(r"[+-]?[0-9]+", re.ASCII)  # one sign at most; "٣" is a digit to str.isdigit, not here
WEEK_S = 7 * 24 * 3600.0  # the longest wait any flag may ask for


def _shown(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def whole(option: str, value: object, low: int, high: int, example: object | None = None) -> int:
    """A whole number in ``low..high`` (an ``int``, or text of ASCII digits)."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
        number = int(value.strip())
    if number is None or not low <= number <= high:
        hint = f", e.g. {option} {example}" if example is not None else ""
        raise BadOption(option, _shown(value), f"must be a whole number from {low:,} to {high:,}{hint}")
    return number


def number(option: str, value: object, low: float, high: float, *, low_open: bool = False,
           high_open: bool = False, unit: str = "", example: object | None = None) -> float:
    """A finite number in the range ``low..high`` (either end open when asked)."""
    result: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            result = None
    ok = (
        result is not None and math.isfinite(result)
        and (result > low if low_open else result >= low)
        and (result < high if high_open else result <= high)
    )
    if not ok:
        what = f" {unit}" if unit else ""
        hint = f", e.g. {option} {example}" if example is not None else ""
        if low_open and high_open:
            span = f"strictly between {low:g} and {high:g}"
        else:
            span = f"{'greater than' if low_open else 'at least'} {low:g} and {'less than' if high_open else 'at most'} {high:g}"
        raise BadOption(option, _shown(value), f"must be a number{what} {span}{hint}")
    return result  # type: ignore[return-value]


def one_of(option: str, value: T, choices: Iterable[T]) -> T:
    """``value`` itself when it is one of ``choices``."""
    options = tuple(choices)
    if value not in options or isinstance(value, bool):
        raise BadOption(option, _shown(value), f"choose one of {', '.join(str(c) for c in options)}")
    return value


def word(option: str, value: object, what: str) -> str:
    """Non-empty text without control characters or surrounding blanks (a revision, a name)."""
    text = value if isinstance(value, str) else None
    if not text or text != text.strip() or any(unicodedata.category(ch).startswith("C") for ch in text):
        raise BadOption(option, _shown(value), f"must be {what}: non-empty, without blanks at the ends or "
                        "control characters")
    return text


def revision(option: str, value: object) -> str:
    """A branch, tag or commit sha as the Hub takes it; ``''`` is refused (it is not "main")."""
    text = value if isinstance(value, str) else None
    if (not text or any(c.isspace() or unicodedata.category(c).startswith("C") for c in text)
            or ".." in text or "\\" in text or text.startswith("/") or text.endswith("/")):
        raise BadOption(option, _shown(value), "give a branch, tag or commit sha, e.g. main")
    return text


def seconds(option: str, value: object, example: object | None = None) -> float:
    """A wait in seconds: more than 0 and at most a week (``WEEK_S``)."""
    return number(option, value, 0.0, WEEK_S, low_open=True, unit="of seconds", example=example)


HUB_TIMEOUT_ENV = "LAUNCH_HUB_TIMEOUT"
HUB_TIMEOUT_S = 600.0


def hub_timeout(value: object = None) -> float:
    """Seconds without progress before a hub call is given up: ``value`` (``--timeout``), else
    ``$LAUNCH_HUB_TIMEOUT``, else 600; more than 0 and at most a week."""
    option, example = "--timeout", 600
    if value is None:
        option, value, example = HUB_TIMEOUT_ENV, os.environ.get(HUB_TIMEOUT_ENV, ""), None
        if not value.strip():
            return HUB_TIMEOUT_S
    return seconds(option, value, example)
