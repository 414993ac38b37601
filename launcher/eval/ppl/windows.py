"""Windows cut from a text's tokens, and the target-span loss derived from two scored prefixes.

Every window ends at the same place, the end of the text, so the last ``span`` tokens, the target,
are the same tokens in every window; only the context before them grows. lmdeploy's ``/get_ppl``
answers the MEAN next-token loss over ``n - 1`` targets of an ``n``-token input (token 0 has no
target; ``AsyncEngine.async_get_ppl`` divides the summed loss by ``len(input_ids) - 1``). Scoring a
window of ``n`` tokens and its prefix without the span (``n - span`` tokens) gives the span's mean:

    loss_span = (L_window * (n - 1) - L_prefix * (n - span - 1)) / span

(the prefix's targets are the window's first ``n - span - 1``; the span's ``span`` targets are the
rest). Pure functions: no server, no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from launcher.errors import LaunchError


class PplTextTooShort(LaunchError):
    length: int
    available: int
    source: str
    exit_code = 2
    message = ("a window of {length} tokens is longer than the text: {source} has {available} tokens. "
               "Give a longer --text (or several) or shorter --lengths.")


@dataclass(frozen=True)
class Window:
    length: int
    start: int  # first token index in the text
    end: int  # one past the last (the text's token count)
    span: int

    @property
    def prefix_length(self) -> int:
        return self.length - self.span


def plan_windows(n_tokens: int, lengths: tuple[int, ...], span: int, source: str) -> list[Window]:
    """One window per length, all ending at the text's end; a length past the text is refused."""
    too_long = [length for length in lengths if length > n_tokens]
    if too_long:
        raise PplTextTooShort(max(too_long), n_tokens, source)
    return [Window(length, n_tokens - length, n_tokens, span) for length in sorted(lengths)]


def span_loss(window_loss: float, window_tokens: int, prefix_loss: float, prefix_tokens: int) -> float:
    """Mean loss of the tokens a window has beyond its prefix, from the two means ``/get_ppl`` gives."""
    if not 2 <= prefix_tokens < window_tokens:
        raise ValueError("the prefix must have at least 2 tokens and be shorter than the window")
    total = window_loss * (window_tokens - 1) - prefix_loss * (prefix_tokens - 1)
    return total / (window_tokens - prefix_tokens)


def perplexity(loss: float | None) -> float | None:
    """exp(loss), or None (too large to show meaningfully is still a float: inf)."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
