"""The one checker for numbers and shapes launch reads from a model's config (config.json, or a
preset's stand-in for it). Each number has a type and a range, and a refusal names the file, the
field and the value: ``BadConfig(source, "num_key_value_heads must be ..., found 'abc'")``.

Flags are checked elsewhere (``launcher/checks.py``); presets' own fields use these checks through
``presets.py``. Pure functions: nothing here reads files.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import BadConfig

# lmdeploy keeps session_len, max_position_embeddings and token positions in 32-bit ints.
INT32_MAX = 2**31 - 1
# Model shape numbers (layers, heads, head sizes): far above any real model, far below overflow.
SHAPE_MAX = 1 << 20
# How deep a config.json may nest (real ones nest 3 or 4 levels; the copying and formatting code
# after parsing recurses once per level).
MAX_DEPTH = 64
_SHOWN = 60


def shown(value: Any) -> str:
    """``repr(value)``, cut to a readable length (a value may be a huge or deeply nested thing)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def whole_number(value: Any, low: int = 1, high: int = INT32_MAX) -> int:
    """``value`` as an int within [low, high], or ValueError saying what it must be. Booleans are
    not numbers; a float is taken only when it is whole (``32768.0``)."""
    number = value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise ValueError(f"must be a whole number from {low:,} to {high:,}, found {shown(value)}")
    return number


def real_number(value: Any, low: float = 0.0, high: float = float(INT32_MAX), *, low_open: bool = True) -> float:
    """``value`` as a finite float within (low, high] (or [low, high]), or ValueError."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    number = (float(value) if abs(value) < 1e308 else math.inf) if is_number else math.nan
    below = number <= low if low_open else number < low
    if not is_number:
        raise ValueError(f"must be a number, found {shown(value)}")
    if not math.isfinite(number) or below or number > high:
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise ValueError(f"must be a finite number {bound} and at most {high:g}, found {shown(value)}")
    return number


def config_int(section: dict, key: str, source: str, where: str = "", *, low: int = 1,
               high: int = INT32_MAX) -> int:
    """The whole number ``section[key]`` (required), or BadConfig naming file, field and value."""
    if section.get(key) is None:
        raise BadConfig(source, f"{where}{key} is missing (a whole number from {low:,} to {high:,})")
    try:
        return whole_number(section.get(key), low, high)
    except ValueError as err:
        raise BadConfig(source, f"{where}{key} {err}") from None


def config_number(section: dict, key: str, source: str, where: str = "", *, low: float = 0.0,
                  high: float = float(INT32_MAX), low_open: bool = True) -> float:
    if section.get(key) is None:
        raise BadConfig(source, f"{where}{key} is missing (a number)")
    try:
        return real_number(section.get(key), low, high, low_open=low_open)
    except ValueError as err:
        raise BadConfig(source, f"{where}{key} {err}") from None


def optional_int(section: dict, key: str, source: str, where: str = "", **bounds: int) -> int | None:
    return None if section.get(key) is None else config_int(section, key, source, where, **bounds)


def optional_number(section: dict, key: str, source: str, where: str = "", **bounds: Any) -> float | None:
    return None if section.get(key) is None else config_number(section, key, source, where, **bounds)


def optional_text(section: dict, key: str, source: str, where: str = "") -> str | None:
    value = section.get(key)
    if value is not None and not isinstance(value, str):
        raise BadConfig(source, f"{where}{key} must be text, found {shown(value)}")
    return value


def depth_within(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests at most ``limit`` containers deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def check_config(config: Any, source: str) -> dict:
    """The facts every config launch reads must have the right shape: an object, nested at most
    MAX_DEPTH deep, ``architectures`` a list of names. Returns ``config``."""
    if not isinstance(config, dict):
        raise BadConfig(source, f"the config must be a JSON object, found {type(config).__name__}")
    if not depth_within(config):
        raise BadConfig(source, f"the config nests more than {MAX_DEPTH} levels deep; it is not a model config")
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) and a for a in archs)):
        raise BadConfig(source, f"architectures must be a list of class names, found {shown(archs)}")
    return config
