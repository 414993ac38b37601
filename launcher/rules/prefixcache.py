"""Prefix caching that stays correct: when lmdeploy's ``enable_prefix_caching`` may be turned on.

Read in lmdeploy 0.18's source (the commit and lines are in README "Choosing a context"):

* Both engines write keys into the KV cache *after* rotating them, and both reuse a cached prefix by
  its tokens alone (TurboMind's and the PyTorch engine's block tries match token ids; nothing about
  RoPE is part of the match).
* Under dynamic NTK the rotation depends on the request, not only on the position. TurboMind picks the
  RoPE base once per request, at admission, when the prompt is longer than ``max_position_embeddings``;
  the PyTorch engine recomputes it from the longest position in the batch. A prefix cached by one
  request is then reused by a request of another length with keys rotated under another base: wrong
  attention, no error.
* Static types (linear, yarn, llama3) rotate by position only, and under dynamic NTK nothing changes
  while every sequence stays within ``max_position_embeddings``.

So prefix caching is refused exactly when a served session can pass the dynamic-NTK threshold: the
type written is dynamic and ``session_len > max_position_embeddings``.
"""

from __future__ import annotations

from launcher.errors import LaunchError


class PrefixCachingUnsafe(LaunchError):
    """``--enable-prefix-caching`` with a dynamic-NTK session that can pass the threshold."""

    session_len: int
    max_position_embeddings: int
    factor: float
    exit_code = 2

    def message(self) -> str:
        return (
            f"--enable-prefix-caching: under dynamic NTK (x{self.factor:g}) lmdeploy rotates keys with a base that "
            f"depends on each request's length past {self.max_position_embeddings:,} tokens, and a cached prefix "
            f"would be reused under another base (session {self.session_len:,}); use a static type (--type yarn) "
            f"or a session within {self.max_position_embeddings:,} tokens, or leave prefix caching off"
        )


def prefix_caching_safe(rope_type: str, session_len: int, max_position_embeddings: int) -> bool:
    """Whether cached prefixes are rotated the same for every request that can reuse them."""
    return rope_type != "dynamic" or session_len <= max_position_embeddings


def check_prefix_caching(rope_type: str, factor: float, session_len: int, max_position_embeddings: int) -> None:
    """``PrefixCachingUnsafe`` unless ``prefix_caching_safe``."""
    if not prefix_caching_safe(rope_type, session_len, max_position_embeddings):
        raise PrefixCachingUnsafe(session_len, max_position_embeddings, factor)
