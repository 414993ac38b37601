"""The one checker for numbers and shapes launch reads from a model's config (config.json, or a
preset's stand-in for it). Each number has a type and a range, and a refusal names the file, the
field and the value: ``BadConfig(source, "num_key_value_heads must be ..., found 'abc'")``.

The ranges are the one table's (``launcher/rules/limits.py``, ``CONFIG_KEYS``), the same that flags
(``launcher/rules/checks.py``) and presets (``presets.py``) are read by. Pure functions: nothing here
reads files.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from launcher.errors import LaunchError
from launcher.rules.limits import CONFIG_KEYS, INT32_MAX, SHAPE_MAX, Limit, shown


class BadConfig(LaunchError):
    """config.json (or a preset's stand-in for it) lacks a fact the rules need, or has one of the
    wrong type or range; ``problem`` names the field and the value."""

    source: str
    problem: str
    message = "{source}: {problem}. Fix the config, or pick a checkpoint with a valid one."


__all__ = [
    "INT32_MAX",
    "MAX_DEPTH",
    "SHAPE_MAX",
    "check_config",
    "config_int",
    "config_number",
    "real_number",
    "shown",
    "whole_number",
]

# How deep a config.json may nest (real ones nest 3 or 4 levels; the copying and formatting code
# after parsing recurses once per level).
MAX_DEPTH = 64


def whole_number(value: Any, low: int = 1, high: int = INT32_MAX) -> int:
    """``value`` as an int within [low, high], or ValueError saying what it must be. Booleans are
    not numbers; a float is taken only when it is whole (``32768.0``)."""
    return int(Limit(True, low, high).check(value))


def real_number(value: Any, low: float = 0.0, high: float = float(INT32_MAX), *, low_open: bool = True) -> float:
    """``value`` as a finite float within (low, high] (or [low, high]), or ValueError."""
    return float(Limit(False, low, high, low_open=low_open).check(value))


def _limit(key: str, whole: bool, low: float | None, high: float | None, low_open: bool = True) -> Limit:
    """The table's limit of config field ``key`` (``limits.CONFIG_KEYS``), with the bounds a reader
    gives in its place; a field outside the table is a positive number up to INT32_MAX."""
    limit = CONFIG_KEYS.get(key)
    if limit is None or limit.whole != whole:
        limit = Limit(whole, 1 if whole else 0.0, INT32_MAX, low_open=not whole)
    if low is not None:
        limit = replace(limit, low=low, low_open=low_open and not whole)
    return limit if high is None else replace(limit, high=high)


def config_int(section: dict, key: str, source: str, where: str = "", *, low: int | None = None,
               high: int | None = None) -> int:
    """The whole number ``section[key]`` (required), or BadConfig naming file, field and value. Its
    range: the table's for ``key`` (``limits.CONFIG_KEYS``), unless ``low`` / ``high`` are given."""
    limit = _limit(key, True, low, high)
    if section.get(key) is None:
        raise BadConfig(source, f"{where}{key} is missing ({limit.rule})")
    try:
        return int(limit.check(section.get(key)))
    except ValueError as err:
        raise BadConfig(source, f"{where}{key} {err}") from None


def config_number(section: dict, key: str, source: str, where: str = "", *, low: float | None = None,
                  high: float | None = None, low_open: bool = True) -> float:
    limit = _limit(key, False, low, high, low_open)
    if section.get(key) is None:
        raise BadConfig(source, f"{where}{key} is missing ({limit.rule})")
    try:
        return float(limit.check(section.get(key)))
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
    MAX_DEPTH deep, ``architectures`` (when present, at the top or in a nested model's section such
    as ``text_config``) a non-empty list of class names: lmdeploy
    picks the model's code by its first name, so ``[]`` would plan as "architecture None" and fail
    only when serve loads it. Returns ``config``."""
    if not isinstance(config, dict):
        raise BadConfig(source, f"the config must be a JSON object, found {type(config).__name__}")
    if not depth_within(config):
        raise BadConfig(source, f"the config nests more than {MAX_DEPTH} levels deep; it is not a model config")
    sections = {"": config, **{f"{key}.": value for key, value in config.items() if isinstance(value, dict)}}
    for where, section in sections.items():  # the top level, and a nested model's (text_config, llm_config)
        archs = section.get("architectures")
        if archs is not None and (not isinstance(archs, list) or not archs
                                  or not all(isinstance(a, str) and a.strip() and a.isprintable() for a in archs)):
            raise BadConfig(source, f"{where}architectures must be a list of one or more class names (e.g. "
                            f"[\"LlamaForCausalLM\"]), found {shown(archs)}")
    return config
