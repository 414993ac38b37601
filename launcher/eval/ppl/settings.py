"""What a ``launch ppl`` run does, checked before anything runs, and parsed from flag text.

Every check raises ``BadOption`` (exit 2, one line) before the server is contacted or a file written.
Lengths take the probe's forms (``4000``, ``8k`` = 8,192, ``1.5x``); ``x`` needs the native context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from launcher.eval.probe.settings import MAX_LENGTH, native_and_lengths, request_timeout, whole_native
from launcher.net.http import redact
from launcher.net.lmdeploy import DEFAULT_URL, normalize_url
from launcher.rules import checks
from launcher.rules.checks import BadOption

DEFAULT_MULTIPLES = (0.5, 1.0, 1.5, 2.0)
DEFAULT_SPAN = 512
DEFAULT_TIMEOUT = 600.0  # one scoring pass of a long window on a busy engine
MIN_PREFIX = 2  # lmdeploy's get_ppl needs at least 2 tokens


@dataclass(frozen=True)
class PplSettings:
    """One run: every text is cut into one window per length, all ending at the text's end.

    ``span`` is the fixed target at the end of every window: its loss is compared across lengths
    (the same tokens, more and more context before them). ``texts`` empty means the bundled text.
    """

    lengths: tuple[int, ...]
    texts: tuple[Path, ...] = ()
    span: int = DEFAULT_SPAN
    url: str = field(default=DEFAULT_URL, repr=False)  # may hold user:password@; shown through redact
    api_key: str | None = field(default=None, repr=False)
    native_context: int | None = None
    tokenizer: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    label: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize_url(self.url))
        if not self.lengths:
            raise BadOption("--lengths", "", "give at least one length")
        for length in self.lengths:
            if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= MAX_LENGTH:
                raise BadOption("--lengths", str(length), f"a length is a whole number of tokens, 1..{MAX_LENGTH}")
        object.__setattr__(self, "span", whole_span(self.span))
        shortest = min(self.lengths)
        if shortest - self.span < MIN_PREFIX:
            raise BadOption("--span", str(self.span), f"the target span must leave at least {MIN_PREFIX} tokens of "
                            f"context in the shortest window ({shortest} tokens): give --span {max(1, shortest // 2)} "
                            "or longer --lengths")
        if self.native_context is not None:
            object.__setattr__(self, "native_context", whole_native(self.native_context))
        object.__setattr__(self, "timeout", request_timeout(self.timeout))
        object.__setattr__(self, "lengths", tuple(sorted(set(self.lengths))))

    def public(self) -> dict:
        """As written to results.json: never the API key or URL credentials."""
        return {
            "url": redact(self.url),
            "api_key_set": self.api_key is not None,
            "lengths": list(self.lengths),
            "span": self.span,
            "native_context": self.native_context,
            "tokenizer": self.tokenizer,
            "timeout_s": self.timeout,
            "label": self.label,
        }


def whole_span(value: object) -> int:
    return checks.whole("--span", value, 1, MAX_LENGTH, example=DEFAULT_SPAN)


def default_lengths(native_context: int, cap: int | None = None) -> tuple[int, ...]:
    """0.5x, 1x, 1.5x, 2x the native context, each at most ``cap`` (a session's longest input)."""
    lengths = [round(m * native_context) for m in DEFAULT_MULTIPLES]
    if cap is not None:
        lengths = [min(length, cap) for length in lengths]
    return tuple(sorted(set(lengths)))


def settings_from_flags(*, url: str | None, api_key: str | None, lengths: str | None, native: str | None,
                        texts: list[Path] | None, tokenizer: str | None, span: str | None, timeout: str | None,
                        label: str | None, native_from_preset: int | None = None) -> PplSettings:
    """Flag text -> PplSettings; any bad value raises BadOption naming the flag."""
    native_context, length_values = native_and_lengths(native, lengths, native_from_preset, default_lengths)
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise BadOption("--tokenizer", tokenizer, "not a directory; give the model's local directory")
    for text in texts or ():
        if not Path(text).is_file():
            raise BadOption("--text", str(text), "not a file; give a UTF-8 text file")
    if label is not None and (not label.strip() or len(label) > 80 or any(ord(c) < 32 for c in label)):
        raise BadOption("--label", label, "give a short name of 1 to 80 printable characters")
    span_value = whole_span(span) if span is not None else min(DEFAULT_SPAN, min(length_values) // 2)
    return PplSettings(
        lengths=length_values,
        texts=tuple(Path(t) for t in texts or ()),
        span=span_value,
        url=url if url is not None else DEFAULT_URL,
        api_key=api_key or None,
        native_context=native_context,
        tokenizer=tokenizer,
        timeout=request_timeout(timeout) if timeout is not None else DEFAULT_TIMEOUT,
        label=label,
    )
