"""Passkey prompts: seeded filler, a passkey placed at a depth, the question at the end. Pure.

Everything here is a function of its arguments (no clock, no global RNG, no files), so the same seed
always gives the same prompts: the filler stream comes from ``(seed, trial)`` and the passkey from
``(seed, length, depth, trial)``. Sharing the filler across lengths and depths of one trial means a
cell differs from its neighbours only in where the passkey sits and how much filler there is.

The filler holds no digits, so the passkey is the only number in the prompt and scoring is simply
"does the exact passkey appear in the reply".
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the pass key."
)
QUESTION = "What is the pass key? Answer with the number only."

_ADJ = (
    "quiet", "green", "distant", "old", "bright", "small", "heavy", "gentle", "narrow", "wide",
    "silver", "early", "patient", "busy", "calm", "warm", "cold", "tall", "simple", "careful",
)
_NOUN = (
    "river", "garden", "mountain", "village", "baker", "teacher", "window", "forest", "harbor",
    "library", "farmer", "road", "bridge", "lantern", "orchard", "market", "sailor", "meadow",
    "kitchen", "painter",
)
_VERB = (
    "watches", "follows", "passes", "crosses", "remembers", "paints", "visits", "finds", "greets",
    "carries", "describes", "admires", "repairs", "leaves", "reaches",
)
_PLACE = (
    "the hills", "the old town", "the coast", "the valley", "the square", "the station",
    "the fields", "the lake", "the north road", "the market street",
)
_TIME = ("in the morning", "at noon", "in the evening", "after the rain", "before winter", "every day")


def _rng(*parts: object) -> random.Random:
    """A Random seeded by a stable digest (Python's ``hash`` of a str changes between runs)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def passkey_for(seed: int, length: int, depth: float, trial: int) -> str:
    """The five-digit passkey of one cell trial."""
    return str(_rng("passkey", seed, length, f"{depth:.6f}", trial).randint(10000, 99999))


def _sentence(rng: random.Random) -> str:
    adj1, adj2 = rng.choice(_ADJ), rng.choice(_ADJ)
    noun1, noun2 = rng.choice(_NOUN), rng.choice(_NOUN)
    form = rng.randrange(4)
    if form == 0:
        text = f"The {adj1} {noun1} {rng.choice(_VERB)} the {adj2} {noun2} near {rng.choice(_PLACE)}."
    elif form == 1:
        text = f"{rng.choice(_TIME).capitalize()}, the {noun1} {rng.choice(_VERB)} the {adj2} {noun2}."
    elif form == 2:
        text = f"A {adj1} {noun1} lives by {rng.choice(_PLACE)} and {rng.choice(_VERB)} a {noun2}."
    else:
        text = f"The {noun1} is {adj1}, and the {noun2} is {adj2} {rng.choice(_TIME)}."
    return text


class Filler:
    """The endless word stream of one ``(seed, trial)``; ``words(n)`` is always a prefix of ``words(n+1)``."""

    def __init__(self, seed: int, trial: int) -> None:
        self._rng = _rng("filler", seed, trial)
        self._words: list[str] = []
        self._ends: list[int] = [0]  # word counts at which a sentence ends (sentence boundaries)

    def _grow(self, n: int) -> None:
        while len(self._words) < n:
            self._words.extend(_sentence(self._rng).split())
            self._ends.append(len(self._words))

    def words(self, n: int) -> list[str]:
        self._grow(n)
        return self._words[:n]

    def boundary_near(self, position: float, n: int) -> int:
        """The sentence boundary within the first ``n`` words closest to ``position`` (0 and n count)."""
        self._grow(n)
        candidates = [b for b in self._ends if b <= n] + [n]
        return min(candidates, key=lambda b: (abs(b - position), b))


def needle(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


@dataclass(frozen=True)
class Prompt:
    """One built prompt and the facts about it a trial records."""

    text: str
    passkey: str
    filler_words: int
    needle_word: int  # filler words before the passkey line


def build_prompt(filler: Filler, passkey: str, depth: float, n_words: int) -> Prompt:
    """Intro, ``n_words`` of filler with the passkey line at ``depth`` (0 = start, 1 = end), question.

    The passkey goes at the sentence boundary nearest ``depth * n_words``, so it never splits a
    sentence (depth 0 and 1 are exactly the start and the end of the filler).
    """
    words = filler.words(n_words)
    at = filler.boundary_near(depth * n_words, n_words)
    before, after = " ".join(words[:at]), " ".join(words[at:])
    body = " ".join(part for part in (before, needle(passkey), after) if part)
    return Prompt(f"{INTRO}\n\n{body}\n\n{QUESTION}", passkey, n_words, at)


def is_correct(passkey: str, answer: str) -> bool:
    """The exact passkey appears in the reply as a whole number (12345 does not match 123456)."""
    return re.search(rf"(?<!\d){re.escape(passkey)}(?!\d)", answer or "") is not None
