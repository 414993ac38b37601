"""How many full-length sessions run at once: a pure decision.

One engine runs at most as many sequences at once as its KV cache holds full-length sessions (the
KV plan, ``kvcache.plan_memory``) AND as its ``max_batch_size`` allows: lmdeploy (TurboMind and
the PyTorch engine alike) schedules no more than ``max_batch_size`` sequences at once and queues
the rest. The smaller number binds. Replicas multiply the per-engine number; one engine across
nodes is one engine.
"""

from __future__ import annotations

from dataclasses import dataclass

MEMORY = "memory"
MAX_BATCH_SIZE = "max_batch_size"


@dataclass(frozen=True)
class Capacity:
    by_memory: int | None  # full-length sessions one engine's KV cache holds (None: memory unknown)
    max_batch_size: int  # the engine's --max-batch-size
    engines: int = 1  # replicas (one engine across nodes counts once)

    def __post_init__(self) -> None:
        for name, value, low in (("max_batch_size", self.max_batch_size, 1), ("engines", self.engines, 1),
                                 ("by_memory", 0 if self.by_memory is None else self.by_memory, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, not {value!r}")

    @property
    def per_engine(self) -> int | None:
        """Full-length sessions one engine runs at once; ``None`` when its memory is unknown."""
        return None if self.by_memory is None else min(self.by_memory, self.max_batch_size)

    @property
    def total(self) -> int | None:
        return None if self.per_engine is None else self.per_engine * self.engines

    @property
    def limit(self) -> str | None:
        """Which limit binds: ``"max_batch_size"`` when it is below what the memory holds, else
        ``"memory"`` (on a tie both allow the same number); ``None`` when the memory is unknown."""
        if self.by_memory is None:
            return None
        return MAX_BATCH_SIZE if self.max_batch_size < self.by_memory else MEMORY

    def json(self) -> dict:
        return {"sessions": self.total, "sessions_per_engine": self.per_engine, "limit": self.limit,
                "sessions_by_memory": self.by_memory, "max_batch_size": self.max_batch_size}

    def text(self, engine: str = "engine") -> str:
        """One line: ``"14 full-length session(s) at once (7 per replica; limited by memory: ...)"``.
        ``engine`` names one engine (``"replica"``); a single engine gets no per-engine part."""
        per = f"{self.per_engine} per {engine}; " if self.engines > 1 else ""
        if self.by_memory is None:
            return (f"not known: the KV-cache fit is unknown; at most {self.max_batch_size * self.engines} "
                    f"(max_batch_size {self.max_batch_size}{' per ' + engine if self.engines > 1 else ''})")
        if self.by_memory == 0:
            return f"none: not one full-length session fits in the KV cache of {'a' if self.engines > 1 else 'the'} {engine}"
        if self.limit == MAX_BATCH_SIZE:
            why = (f"limited by max_batch_size {self.max_batch_size}: the KV cache would hold {self.by_memory} "
                   f"per {engine}; raise --max-batch-size to run more")
        else:
            why = (f"limited by memory: the KV cache holds {self.by_memory} per {engine}; max_batch_size "
                   f"{self.max_batch_size} would allow {'as many' if self.max_batch_size == self.by_memory else 'more'}")
        return f"{self.total} full-length session(s) at once ({per}{why})"
