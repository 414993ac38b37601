"""The one table of limits: the type and range of every number launch takes from a flag, a preset
or a config, written once.

A ``Limit`` reads a value and returns it typed, or raises ``ValueError`` saying the rule in words
("must be a whole number from 1 to 64"). Where the value came from is the caller's to say:
``checks.py`` turns the refusal into ``BadOption`` naming the flag, ``presets.py`` into
``InvalidPreset`` naming the preset file and key, ``configcheck.py`` into ``BadConfig`` naming the
config and field. So a preset's ``tp: 128`` is refused by the rule ``--tp 128`` is refused by.

Text (a flag) is read by one grammar: ASCII digits, at most one sign, for a decimal number a point
and an exponent; no underscores, no other scripts' digits, no ``inf`` or ``nan`` (Python's
``int()`` and ``float()`` take ``"２"`` and ``"1_000"``; launch does not). A token count (a length:
``--context``, ``--session-len``, ``--native``, probe's ``--lengths``) may end in ``k`` (1,024) or
``m`` (1,048,576), the way model cards and lmdeploy's docs count: 32k = 32,768, 1M = 1,048,576
(``token_text``). A number from YAML or
JSON is taken as it is: a boolean is not a number, and a float counts as whole only when it is
(``32768.0``).

Pure: no I/O, and no imports from launch (every other layer may import this one).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

INT32_MAX = 2**31 - 1  # lmdeploy keeps session_len and token positions in 32-bit ints
SHAPE_MAX = 1 << 20  # layers, heads, head sizes: far above any real model, far below overflow
FLOAT32_MAX = 3.4028234663852886e38  # TurboMind keeps a RoPE base as a 32-bit float
WEEK_S = 7 * 24 * 3600.0  # the longest wait any flag may ask for

_WHOLE = re.compile(r"[+-]?[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_BLANKS = " \t"
_LONGEST = 400  # characters of a number's text: more is no number anyone typed (int() stops at 4300 digits)
_SHOWN = 60


def shown(value: Any) -> str:
    """``repr(value)``, cut to a readable length (a value may be a huge or deeply nested thing)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


@dataclass(frozen=True)
class Limit:
    """A number's type and range. ``whole``: an int (else a finite float). ``low_open`` /
    ``high_open``: the end itself is outside. ``unit`` names what a decimal number counts ("GiB");
    ``example`` is a good value, shown after a refused flag ("e.g. --tp 2"). ``tokens``: a token count,
    whose text may end in k or m (``token_text``)."""

    whole: bool
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    unit: str = ""
    example: Any = None
    tokens: bool = False

    @property
    def rule(self) -> str:
        """The range in words: "a whole number from 1 to 64", "a number greater than 1 and at most 1,024"."""
        if self.tokens:
            return f"a whole number of tokens from {self.low:,} to {self.high:,} (k = 1,024, m = 1,048,576)"
        if self.whole:
            return f"a whole number from {self.low:,} to {self.high:,}"
        what = f"a number of {self.unit}" if self.unit else "a number"
        if self.low_open and self.high_open:
            return f"{what} strictly between {self.low:g} and {self.high:g}"
        low = f"{'greater than' if self.low_open else 'at least'} {self.low:g}"
        high = f"{'less than' if self.high_open else 'at most'} {self.high:g}"
        return f"{what} {low} and {high}"

    def contains(self, number: float) -> bool:
        finite = isinstance(number, int) or math.isfinite(number)  # an int may be past any float
        return (finite and (number > self.low if self.low_open else number >= self.low)
                and (number < self.high if self.high_open else number <= self.high))

    def check(self, value: Any) -> int | float:
        """A number from YAML or JSON, typed and in range; ValueError("must be ..., found ...")."""
        number: int | float | None = None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            number = None
        elif not self.whole:
            number = float(value) if not isinstance(value, int) or abs(value) < 1e308 else math.inf
        elif isinstance(value, int):
            number = value
        elif math.isfinite(value) and value == int(value):
            number = int(value)
        if number is None or not self.contains(number):
            raise ValueError(f"must be {self.rule}, found {shown(value)}")
        return number

    def parse(self, text: str) -> int | float:
        """The text of a flag, by the one grammar (``number_text``), typed and in range;
        ValueError("must be ...") otherwise."""
        try:
            number = token_text(text) if self.tokens else number_text(text, whole=self.whole)
        except ValueError:
            number = None
        if number is None or not self.contains(number):
            raise ValueError(f"must be {self.rule}")
        return number

    def read(self, value: Any) -> int | float:
        """``parse`` for text, ``check`` for a number (a flag's value given in code as an int)."""
        if isinstance(value, str):
            return self.parse(value)
        try:
            return self.check(value)
        except ValueError:
            raise ValueError(f"must be {self.rule}") from None


def number_text(text: str, *, whole: bool = False) -> int | float:
    """Number text by the one grammar, with no range: ASCII digits and at most one sign; a decimal
    number may have a point and an exponent (``1.5``, ``2e3``). Blanks at the ends are taken off.
    ValueError for anything else ("２", "1_000", "nan", "0x10"). For a flag's part that is a number
    (``8k``, ``1.5x`` of ``--lengths``): ``number_text(item[:-1])``."""
    stripped = text.strip(_BLANKS) if isinstance(text, str) else ""
    if len(stripped) > _LONGEST or not (_WHOLE if whole else _DECIMAL).fullmatch(stripped):
        raise ValueError(f"not a {'whole ' if whole else ''}number written in ASCII digits: {text!r}")
    return int(stripped) if whole else float(stripped)


TOKEN_UNITS = {"k": 1024, "m": 1024 * 1024}  # 32k = 32,768 and 1M = 1,048,576, as model cards count


def token_text(text: str) -> int:
    """A token count by the one length grammar: whole ASCII digits (``65536``), or a number by the
    number grammar ended by ``k`` (1,024) or ``m`` (1,048,576), either case: ``64k`` = 65,536,
    ``1.5k`` = 1,536, ``1M`` = 1,048,576. The count must come out whole (``0.3k`` is 307.2: refused);
    it is computed exactly, not in floating point. No range: the caller's ``Limit`` has it."""
    stripped = text.strip(_BLANKS) if isinstance(text, str) else ""
    unit = TOKEN_UNITS.get(stripped[-1:].lower())
    if unit is None:
        return int(number_text(stripped, whole=True))
    if not abs(number_text(stripped[:-1])) < 2**63:  # the number grammar, or ValueError; 1e99999k is no count
        raise ValueError(f"too large to be a token count: {text!r}")
    value = Fraction(stripped[:-1].strip(_BLANKS)) * unit
    if value.denominator != 1:
        raise ValueError(f"not a whole number of tokens: {text!r} is {float(value):,.1f}")
    return int(value)


def _whole(low: int, high: int, example: Any = None) -> Limit:
    return Limit(True, low, high, example=example)


def _positive(high: float, unit: str = "", example: Any = None, *, high_open: bool = False) -> Limit:
    return Limit(False, 0.0, high, low_open=True, high_open=high_open, unit=unit, example=example)


# --- the table ----------------------------------------------------------------------------------
# Engine and request: the same limit for the flag, the preset's ``engine:`` / ``rope:`` key and the plan.
FACTOR = Limit(False, 1.0, 1024.0, low_open=True, example=2)  # x1024 of even a 2k model is 2M tokens
SESSION_LEN = Limit(True, 1, INT32_MAX, example="64k", tokens=True)
CONTEXT_ASKED = Limit(True, 1, INT32_MAX, example="64k", tokens=True)  # --context: the session asked for
CP = _whole(1, 64, 2)  # TurboMind's context parallelism: attention GPUs that split one sequence
TP = _whole(1, 64, 2)
MAX_BATCH_SIZE = _whole(1, 65536, 64)
CACHE_MAX_ENTRY_COUNT = _positive(1.0, example=0.8, high_open=True)
GPU_MEMORY = _positive(4096.0, "GiB", 80)  # per GPU; today's largest have under 300
PORT = _whole(1, 65535, 23333)  # 0 ("any free port") would make the printed URL wrong
REPLICAS = _whole(1, 256, 2)  # replicas on one machine
NNODES = _whole(1, 256, 2)  # nodes of one engine
NODE_RANK = _whole(0, NNODES.high - 1, 0)
SECONDS = _positive(WEEK_S, "seconds")  # any wait a flag or variable sets

# A model: the facts a preset stores and a config.json holds, read by the same limits.
CONTEXT = _whole(1, INT32_MAX, 8192)  # native_context, max_position_embeddings
NATIVE = Limit(True, 1, INT32_MAX, example="32k", tokens=True)  # --native (probe, ppl): the same, as a flag
SHAPE = _whole(1, SHAPE_MAX)  # layers, heads, KV heads, head_dim
HIDDEN_SIZE = _whole(1, SHAPE_MAX * SHAPE_MAX)
TOKENS = _whole(1, INT32_MAX)  # vocab_size, sliding_window
PARAMETERS = Limit(False, 1.0, 1e15, unit="parameters")  # the weight-size estimate; the largest have ~2e12
ROPE_THETA = _positive(FLOAT32_MAX)

# Config keys read by these limits (where a key has no entry, the reader passes its own bounds).
CONFIG_KEYS: dict[str, Limit] = {
    "max_position_embeddings": CONTEXT,
    "original_max_position_embeddings": CONTEXT,
    "num_hidden_layers": SHAPE,
    "num_attention_heads": SHAPE,
    "num_key_value_heads": SHAPE,
    "head_dim": SHAPE,
    "hidden_size": HIDDEN_SIZE,
    "vocab_size": TOKENS,
    "sliding_window": TOKENS,
    "rope_theta": ROPE_THETA,
}
