"""What a probe sweep does, checked before anything runs, and parsed from flag text.

Every check raises ``BadOption`` (exit 2, one line), so a bad flag stops ``launch probe`` before it
contacts the server or writes a file, and ``launch serve --probe`` gets the same checks when it
builds a ``ProbeSettings`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.net.http import redact
from launcher.net.lmdeploy import DEFAULT_URL, normalize_url
from launcher.rules import checks, limits
from launcher.rules.checks import BadOption
from launcher.rules.configcheck import INT32_MAX
from launcher.rules.limits import number_text, token_text

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_MULTIPLES = (0.5, 1.0, 1.5, 2.0)
DEFAULT_TRIALS = 3
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_TOKENS = 64
MAX_LENGTH = 10_000_000  # tokens of a prompt or window; also the largest --max-tokens and --span

TRIALS_MAX = 1000
SEED_MAX = INT32_MAX
TEMPLATE_HEADROOM = 128  # tokens a chat template may add around the prompt


@dataclass(frozen=True)
class ProbeSettings:
    """One sweep: every length x depth cell gets ``trials`` prompts.

    ``lengths`` are whole-prompt token counts (filler + passkey line + question, without the chat
    template). ``native_context`` only labels the table and chart (the "1x" line).
    """

    lengths: tuple[int, ...]
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    trials: int = DEFAULT_TRIALS
    seed: int = 0
    url: str = field(default=DEFAULT_URL, repr=False)  # may hold user:password@; shown through redact
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    native_context: int | None = None
    tokenizer: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_tokens: int = DEFAULT_MAX_TOKENS
    min_accuracy: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize_url(self.url))
        if not self.lengths:
            raise BadOption("--lengths", "", "give at least one length")
        for length in self.lengths:
            if not isinstance(length, int) or not 0 < length <= MAX_LENGTH:
                raise BadOption("--lengths", str(length), f"a length is a whole number of tokens, 1..{MAX_LENGTH}")
        if not self.depths:
            raise BadOption("--depths", "", "give at least one depth")
        for depth in self.depths:
            if not (isinstance(depth, (int, float)) and math.isfinite(depth) and 0 <= depth <= 1):
                raise BadOption("--depths", str(depth), "a depth is between 0 (start) and 1 (end)")
        typed = {
            "trials": whole_trials(self.trials),
            "seed": whole_seed(self.seed),
            "max_tokens": whole_max_tokens(self.max_tokens),
            "native_context": whole_native(self.native_context) if self.native_context is not None else None,
            "timeout": request_timeout(self.timeout),
            "min_accuracy": fraction_min_accuracy(self.min_accuracy),
        }
        for name, value in typed.items():
            object.__setattr__(self, name, value)
        # Sorted and de-duplicated: the table and the chart read left to right, top to bottom.
        object.__setattr__(self, "lengths", tuple(sorted(set(self.lengths))))
        object.__setattr__(self, "depths", tuple(sorted({float(d) for d in self.depths})))

    @property
    def planned_trials(self) -> int:
        return len(self.lengths) * len(self.depths) * self.trials

    def public(self) -> dict:
        """The settings as written to results.json: never the API key itself."""
        return {
            "url": redact(self.url),
            "model": self.model,
            "api_key_set": self.api_key is not None,
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "trials": self.trials,
            "seed": self.seed,
            "native_context": self.native_context,
            "tokenizer": self.tokenizer,
            "timeout_s": self.timeout,
            "max_tokens": self.max_tokens,
            "min_accuracy": self.min_accuracy,
        }


def longest_prompt(session_len: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """The longest prompt a session takes with room for the chat template and the answer."""
    return max(1, session_len - max_tokens - TEMPLATE_HEADROOM)


def default_lengths(native_context: int, session_len: int | None = None,
                    max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[int, ...]:
    """0.5x, 1x, 1.5x, 2x the native context; with a known ``session_len``, capped so that the prompt,
    the chat template and the answer still fit (lmdeploy refuses a prompt of session_len tokens or
    more with a 400, and cuts the answer short near the end)."""
    lengths = [round(m * native_context) for m in DEFAULT_MULTIPLES]
    if session_len is not None:
        cap = longest_prompt(session_len, max_tokens)
        lengths = [min(length, cap) for length in lengths]
    return tuple(sorted(set(lengths)))


def whole_trials(value: object) -> int:
    return checks.whole("--trials", value, 1, TRIALS_MAX, example=DEFAULT_TRIALS)


def whole_seed(value: object) -> int:
    return checks.whole("--seed", value, 0, SEED_MAX, example=0)


def whole_max_tokens(value: object) -> int:
    return checks.whole("--max-tokens", value, 1, MAX_LENGTH, example=DEFAULT_MAX_TOKENS)


def whole_native(value: object) -> int:
    """``--native``: the model's native context in tokens (probe and ppl)."""
    return int(checks.limited("--native", value, limits.NATIVE))


def fraction_min_accuracy(value: object) -> float:
    return checks.number("--min-accuracy", value, 0.0, 1.0, example=0.9)


def request_timeout(value: object) -> float:
    """``--timeout``: seconds each HTTP request may take, all of it (probe and ppl)."""
    return checks.seconds("--timeout", value, example=300)


def parse_lengths(text: str, native_context: int | None) -> tuple[int, ...]:
    """``4000,8k,1m,1.5x``: token counts by the one length grammar (``limits.token_text``: k = 1,024,
    m = 1,048,576), or multiples of the native context (``x``, rounded to whole tokens)."""
    items = [item.strip(" \t") for item in text.split(",")]  # the blanks number_text takes off
    if not text.strip() or any(not item for item in items):
        raise BadOption("--lengths", text, "give comma-separated token counts, e.g. 4000,8k,16k or 1x,2x")
    lengths = []
    for item in items:
        try:
            if item.lower().endswith("x"):
                factor = number_text(item[:-1])
                if native_context is None:
                    raise BadOption("--lengths", item, "a multiple of the native context needs --native N "
                                    "or --preset NAME; or give token counts")
                value = factor * native_context
            else:
                value = token_text(item)
        except ValueError:
            raise BadOption("--lengths", item, "not a whole token count (4000; 8k = 8,192; 1m = 1,048,576) "
                            "or a multiple of the native context (1.5x)") from None
        if not math.isfinite(value) or not 1 <= round(value) <= MAX_LENGTH:
            raise BadOption("--lengths", item, f"a length is between 1 and {MAX_LENGTH:,} tokens")
        lengths.append(round(value))
    return tuple(lengths)


def parse_depths(text: str) -> tuple[float, ...]:
    """``0,0.5,1``: where the passkey goes, 0 = start of the filler, 1 = its end."""
    items = [item.strip(" \t") for item in text.split(",")]  # the blanks number_text takes off
    if not text.strip() or any(not item for item in items):
        raise BadOption("--depths", text, "give comma-separated depths between 0 and 1, e.g. 0,0.5,1")
    return tuple(checks.number("--depths", item, 0.0, 1.0) for item in items)


def settings_from_flags(*, url: str | None, model: str | None, api_key: str | None, lengths: str | None,
                        depths: str | None, trials: str | None, seed: str | None, native: str | None,
                        tokenizer: str | None, timeout: str | None, max_tokens: str | None,
                        min_accuracy: str | None, native_from_preset: int | None = None) -> ProbeSettings:
    """Flag text -> ProbeSettings; any bad value raises BadOption naming the flag."""
    native_context, length_values = native_and_lengths(native, lengths, native_from_preset, default_lengths)
    if tokenizer is not None:
        from pathlib import Path

        if not Path(tokenizer).is_dir():
            raise BadOption("--tokenizer", tokenizer, "not a directory; give the model's local directory")
    return ProbeSettings(
        lengths=length_values,
        depths=parse_depths(depths) if depths is not None else DEFAULT_DEPTHS,
        trials=whole_trials(trials) if trials is not None else DEFAULT_TRIALS,
        seed=whole_seed(seed) if seed is not None else 0,
        url=url if url is not None else DEFAULT_URL,
        model=model or None,
        api_key=api_key or None,
        native_context=native_context,
        tokenizer=tokenizer,
        timeout=request_timeout(timeout) if timeout is not None else DEFAULT_TIMEOUT,
        max_tokens=whole_max_tokens(max_tokens) if max_tokens is not None else DEFAULT_MAX_TOKENS,
        min_accuracy=fraction_min_accuracy(min_accuracy) if min_accuracy is not None else 0.0,
    )


def native_and_lengths(native: str | None, lengths: str | None, native_from_preset: int | None,
                       default: Callable[[int], tuple[int, ...]]) -> tuple[int | None, tuple[int, ...]]:
    """``--native`` (else the preset's) and ``--lengths`` (else ``default(native)``), for probe and ppl."""
    native_context = whole_native(native) if native is not None else native_from_preset
    if lengths is not None:
        return native_context, tuple(parse_lengths(lengths, native_context))
    if native_context is None:
        raise BadOption("--lengths", "(none)", "give token counts, e.g. --lengths 4000,8000,16000, "
                        "or --native N / --preset NAME for the default 0.5x,1x,1.5x,2x")
    return native_context, tuple(default(native_context))


def preset_native(preset: str | None, native: str | None) -> int | None:
    """The native context of ``--preset`` (None without one); refused together with ``--native``."""
    if preset is None:
        return None
    if native is not None:
        raise BadOption("--preset", preset, "give --native or --preset, not both")
    from launcher.model.presets import get_preset

    return get_preset(preset).native_context

