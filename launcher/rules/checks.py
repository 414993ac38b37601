"""Checks of flag values, written once: each takes the flag's name and the value as given and
returns it typed, or raises ``BadOption(option, value, reason)`` (one line, exit 2).

Every number flag is text in the parser and is read here by its entry in the one table of limits
(``launcher/rules/limits.py``: ``checks.limited("--tp", text, limits.TP)``), by the one grammar for
number text (ASCII digits, one sign; ``"２"``, ``"1_000"``, ``"nan"`` are refused), so every bad
number flag of every command is answered in one voice: ``--tp '２': must be a whole number from 1
to 64, e.g. --tp 2``. A preset's or a config's number is read by the same limits (``presets.py``,
``configcheck.py``), so the two never disagree.

Pure functions: no I/O (``hub_timeout`` reads its environment variable).
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from dataclasses import replace
from typing import TypeVar

from launcher.errors import LaunchError
from launcher.rules import limits
from launcher.rules.limits import WEEK_S, Limit


class BadOption(LaunchError):
    """A flag value that is not acceptable; ``reason`` says why and what to give instead."""

    option: str
    value: str
    reason: str
    exit_code = 2
    message = "{option} {value!r}: {reason}"


T = TypeVar("T")
__all__ = ["WEEK_S", "boolean", "choice", "hub_timeout", "limited", "number", "one_of", "refusal", "revision", "seconds", "whole", "word"]


def _shown(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def limited(option: str, value: object, limit: Limit) -> int | float:
    """The flag's value (text, or a number given in code) by ``limit``: typed and in range."""
    try:
        return limit.read(value)
    except ValueError:
        raise refusal(option, value, limit) from None


def refusal(option: str, value: object, limit: Limit) -> BadOption:
    """The one line that refuses ``value`` for ``option`` by ``limit`` ("must be ..., e.g. --tp 2"):
    what ``limited`` raises, for a typed value that a rule joining two flags puts out of range."""
    example = f"{limit.example:g}" if isinstance(limit.example, float) else limit.example
    hint = f", e.g. {option} {example}" if example is not None else ""
    return BadOption(option, _shown(value), f"must be {limit.rule}{hint}")


def whole(option: str, value: object, low: int, high: int, example: object | None = None) -> int:
    """A whole number in ``low..high`` (an ``int``, or text of ASCII digits)."""
    return int(limited(option, value, Limit(True, low, high, example=example)))


def number(option: str, value: object, low: float, high: float, *, low_open: bool = False,
           high_open: bool = False, unit: str = "", example: object | None = None) -> float:
    """A finite number in the range ``low..high`` (either end open when asked); ``unit``: what it
    counts ("GiB")."""
    return float(limited(option, value, Limit(False, low, high, low_open, high_open, unit, example)))


def boolean(option: str, value: object) -> bool:
    """On or off: ``True`` or ``False`` (a switch given in code; the parser's are booleans already)."""
    if not isinstance(value, bool):
        raise BadOption(option, _shown(value), "is a switch: give it or leave it out")
    return value


def choice(option: str, value: object, choices: Iterable[int]) -> object:
    """A whole number (text by the one grammar) that is one of ``choices`` (``--quant-policy``)."""
    options = tuple(choices)
    try:
        value = Limit(True, min(options), max(options)).read(value)
    except ValueError:
        pass
    return one_of(option, value, options)


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
    """A wait in seconds: more than 0 and at most a week (``limits.SECONDS``)."""
    return float(limited(option, value, replace(limits.SECONDS, example=example)))


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
