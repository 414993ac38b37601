"""Counting a prompt in the model's tokens, and sizing the filler to hit a target count.

Lengths are meant in the served model's tokens, so the best counter is the server itself (lmdeploy's
``/v1/encode``, vLLM's ``/tokenize``); next the model's tokenizer from a local directory; last an
estimate of ~4 characters per token, which the report flags as such.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from launcher.errors import LaunchError
from launcher.net.lmdeploy import Client, ServerBadReply, ServerHTTPError


class ProbeLengthTooShort(LaunchError):
    length: int
    minimum: int
    exit_code = 2
    message = ("length {length} is too short: the question and passkey alone take {minimum} tokens. "
               "Use lengths of at least {minimum}.")


class ProbeTokenizerFailed(LaunchError):
    path: str
    problem: str
    exit_code = 2
    message = "cannot load a tokenizer from {path}: {problem}. Fix --tokenizer or leave it out."


CHARS_PER_TOKEN = 4.0


class TokenCounter(Protocol):
    method: str  # how lengths are measured, as written to results.json
    exact: bool  # False: lengths are estimates

    def count(self, text: str) -> int: ...


@dataclass
class EncodeEndpoint:
    client: Client
    method: str = "server: POST /v1/encode"
    exact: bool = True

    def count(self, text: str) -> int:
        return self.client.encode(text)


@dataclass
class TokenizeEndpoint:
    client: Client
    model: str
    method: str = "server: POST /tokenize"
    exact: bool = True

    def count(self, text: str) -> int:
        return self.client.tokenize(self.model, text)


class TokenizerDir:
    """The model's own tokenizer from a local directory.

    ``tokenizer.json`` is read with the ``tokenizers`` library, the engine that transformers' fast
    tokenizers wrap (importing transformers' AutoTokenizer takes seconds, as it pulls in torch);
    a directory without one goes through ``AutoTokenizer``. Both are imported only here.
    """

    exact = True

    def __init__(self, path: str) -> None:
        self.method = f"tokenizer: {path}"
        self._ids: Callable[[str], list[int]]
        _refuse_special_files(path)  # the libraries would wait forever on a FIFO named tokenizer.json
        try:
            if (Path(path) / "tokenizer.json").is_file():
                from tokenizers import Tokenizer

                fast = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
                self._ids = lambda text: list(fast.encode(text, add_special_tokens=False).ids)
            else:
                from transformers import AutoTokenizer

                auto = AutoTokenizer.from_pretrained(path)
                self._ids = lambda text: list(auto.encode(text, add_special_tokens=False))
        except Exception as err:  # noqa: BLE001 - both libraries raise many kinds (OSError, ValueError, ...)
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ProbeTokenizerFailed(path, problem) from None

    def count(self, text: str) -> int:
        return len(self._ids(text))

    def ids(self, text: str) -> list[int]:
        """The token ids of ``text`` (no special tokens), as the server's tokenizer gives them."""
        return self._ids(text)


def _refuse_special_files(path: str) -> None:
    """``ProbeTokenizerFailed`` when the directory holds a FIFO, a socket or a device (links followed)."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    mode = entry.stat().st_mode
                except OSError:  # a dangling link: the loaders skip what they do not need
                    continue
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise ProbeTokenizerFailed(path, f"{entry.name} is not a regular file")
    except OSError as err:
        raise ProbeTokenizerFailed(path, err.strerror or str(err)) from None


@dataclass
class Estimate:
    method: str = f"estimate: ~{CHARS_PER_TOKEN:g} characters per token"
    exact: bool = False

    def count(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)


def pick_counter(client: Client, model: str, tokenizer_dir: str | None) -> TokenCounter:
    """The server's tokenize endpoint if it has one, else ``tokenizer_dir``, else the estimate."""
    for counter in (EncodeEndpoint(client), TokenizeEndpoint(client, model)):
        try:
            counter.count("The pass key is hidden here.")
        except (ServerHTTPError, ServerBadReply):
            continue  # no such endpoint on this server (404 / 405 / another shape)
        return counter
    if tokenizer_dir:
        return TokenizerDir(tokenizer_dir)
    return Estimate()


@dataclass(frozen=True)
class Fit:
    words: int  # filler words used
    base: int  # tokens of the prompt with no filler
    tokens: int  # measured tokens of the whole prompt
    requests: int  # how many counts it took


def fit_words(count: Callable[[int], int], target: int, tokens_per_word: float = 1.3,
              max_steps: int = 30) -> Fit:
    """The most filler words ``n`` whose prompt ``count(n)`` stays within ``target`` tokens.

    ``count`` is nearly linear in ``n``, so a proportional first guess and then secant steps inside
    the bracket [fits, too long] land within a word or two in a few counts; every third step bisects
    so an odd tokenizer cannot stall it. Raises ProbeLengthTooShort when even no filler is too long.
    """
    f0 = count(0)
    lo, f_lo = 0, f0
    requests = 1
    if f0 > target:
        raise ProbeLengthTooShort(target, f0)
    hi: int | None = None
    f_hi = 0
    step = 0
    while f_lo < target and (hi is None or hi - lo > 1) and step < max_steps:
        step += 1
        if hi is None:
            rate = (f_lo - f0) / lo if lo and f_lo > f0 else tokens_per_word
            n = lo + max(1, round((target - f_lo) / rate))
        elif step % 3 == 0:
            n = (lo + hi) // 2
        else:
            n = lo + round((target - f_lo) * (hi - lo) / max(f_hi - f_lo, 1))
            n = min(max(n, lo + 1), hi - 1)
        f = count(n)
        requests += 1
        if f <= target:
            lo, f_lo = n, f
        else:
            hi, f_hi = n, f
    return Fit(words=lo, base=f0, tokens=f_lo, requests=requests)
