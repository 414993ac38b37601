"""The KV-cache plan: how many bytes a token costs, whether one full session fits, and what would
make it fit. Pure functions over numbers; nothing here touches a GPU.

TurboMind's rules (lmdeploy 0.18):
* bytes per token per GPU = layers x 2 x (kv_heads / tp) x (head_dim x bits / 8 + (4 if quantized));
  bits = 16, 8 (quant_policy 8) or 4 (quant_policy 4); KV heads fewer than tp are repeated up to tp.
* the cache is handed out in blocks of 64 tokens;
* budget = free GPU memory after the weights are loaded (smallest over the TP group) x
  cache_max_entry_count.
Nothing in lmdeploy checks at start-up that one full session fits: a request that never can be
admitted fails later with HTTP 500. ``plan_memory`` makes that check up front.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from launcher.errors import LaunchError
from launcher.rules.configcheck import SHAPE_MAX, config_int, optional_int, optional_text


class LayoutHeadsIndivisible(LaunchError):
    what: str
    count: int
    tp: int
    exit_code = 2
    # the flag's voice (BadOption's): presets name their own key instead (presets.py)
    message = (
        "--tp '{tp}': does not divide the model's {count} {what} (TurboMind splits them evenly over the tp "
        "GPUs); use a tp that divides {count}"
    )


GiB = 1024**3
BLOCK_TOKENS = 64
# The KV-cache quant policies lmdeploy takes (the one list: flags and presets import it).
QUANT_BITS = {0: 16, 8: 8, 4: 4}
# lmdeploy's default share of free GPU memory (after weights) for the KV cache; engine.EngineSettings uses it.
DEFAULT_CACHE_RATIO = 0.8
QUANT_POLICIES = tuple(QUANT_BITS)  # 0 fp16, 8 int8, 4 int4: most precise first
QUANT_NAMES = {0: "fp16", 8: "int8", 4: "int4"}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def from_config(cls, section: dict, source: str = "config.json") -> ModelShape:
        """Read the shape from a config dict (the language-model section of a multimodal one).
        Every number is a whole number in range (BadConfig names the file, field and value)."""
        layers = config_int(section, "num_hidden_layers", source, high=SHAPE_MAX)
        heads = config_int(section, "num_attention_heads", source, high=SHAPE_MAX)
        kv_heads = optional_int(section, "num_key_value_heads", source, high=heads)
        head_dim = optional_int(section, "head_dim", source, high=SHAPE_MAX)
        if head_dim is None:
            hidden = config_int(section, "hidden_size", source, low=heads, high=SHAPE_MAX * SHAPE_MAX)
            head_dim = hidden // heads
        dtype = optional_text(section, "torch_dtype", source) or optional_text(section, "dtype", source)
        return cls(layers, heads, kv_heads or heads, head_dim, dtype or "bfloat16")


def kv_heads_per_gpu(kv_heads: int, tp: int) -> int:
    """KV heads each GPU holds: TurboMind repeats KV heads fewer than, or not divisible by, tp up to a
    multiple of tp."""
    return max(1, math.ceil(kv_heads / tp))


def tp_split(section: Mapping, tp: int, source: str = "config.json") -> int:
    """The tp rule, written once: TurboMind splits the attention heads and the hidden size evenly over
    the tp GPUs (``LayoutHeadsIndivisible`` otherwise). Returns the KV heads each GPU holds."""
    heads = config_int(section, "num_attention_heads", source)
    hidden = optional_int(section, "hidden_size", source)
    kv_heads = optional_int(section, "num_key_value_heads", source, high=heads) or heads
    if heads % tp:
        raise LayoutHeadsIndivisible("attention heads", heads, tp)
    if hidden is not None and hidden % tp:
        raise LayoutHeadsIndivisible("hidden size (embedding columns)", hidden, tp)
    return kv_heads_per_gpu(kv_heads, tp)


def bytes_per_token(shape: ModelShape, tp: int = 1, quant_policy: int = 0) -> int:
    """KV-cache bytes one token costs on each GPU of the TP group."""
    bits = QUANT_BITS[quant_policy]
    per_head = shape.head_dim * bits // 8 + (4 if quant_policy else 0)
    return shape.layers * 2 * kv_heads_per_gpu(shape.kv_heads, tp) * per_head


def blocks(tokens: int) -> int:
    return math.ceil(tokens / BLOCK_TOKENS)


def bytes_per_session(shape: ModelShape, session_len: int, tp: int = 1, quant_policy: int = 0) -> int:
    """Bytes one full-length session holds on each GPU (whole 64-token blocks)."""
    return blocks(session_len) * BLOCK_TOKENS * bytes_per_token(shape, tp, quant_policy)


@dataclass(frozen=True)
class KvCost:
    quant_policy: int
    bytes_per_token: int
    bytes_per_session: int

    @property
    def name(self) -> str:
        return QUANT_NAMES[self.quant_policy]


def kv_costs(shape: ModelShape, session_len: int, tp: int = 1) -> dict[int, KvCost]:
    """The cost per token and per session for fp16, int8 and int4 KV cache."""
    return {
        q: KvCost(q, bytes_per_token(shape, tp, q), bytes_per_session(shape, session_len, tp, q))
        for q in (0, 8, 4)
    }


@dataclass(frozen=True)
class MemoryPlan:
    """Whether full-length sessions fit on the GPUs, and the advice when none does."""

    gpu_bytes: int  # free memory per GPU before loading (the smallest of the group)
    gpu_source: str  # "nvml" or "--gpu-memory"
    weights_bytes: int  # the whole model
    weights_source: str
    tp: int
    cache_max_entry_count: float
    quant_policy: int
    session_len: int
    bytes_per_token: int
    bytes_per_session: int
    budget_bytes: int  # KV-cache budget per GPU
    sessions: int  # full-length sessions that fit at once
    advice: tuple[str, ...] = field(default_factory=tuple)
    largest_session_len: int = 0

    @property
    def fits(self) -> bool:
        return self.sessions >= 1


def _budget(gpu_bytes: int, weights_bytes: int, tp: int, ratio: float) -> int:
    free_after_weights = gpu_bytes - math.ceil(weights_bytes / tp)
    return max(0, int(free_after_weights * ratio))


def largest_session(budget: int, per_token: int) -> int:
    """The longest session (whole blocks) that ``budget`` holds."""
    if per_token <= 0:
        return 0
    return (budget // per_token) // BLOCK_TOKENS * BLOCK_TOKENS


def plan_memory(
    shape: ModelShape,
    *,
    session_len: int,
    gpu_bytes: int,
    weights_bytes: int,
    tp: int = 1,
    cache_max_entry_count: float = DEFAULT_CACHE_RATIO,
    quant_policy: int = 0,
    native_context: int | None = None,
    gpu_source: str = "--gpu-memory",
    weights_source: str = "preset",
    gpu_count: int | None = None,
) -> MemoryPlan:
    per_token = bytes_per_token(shape, tp, quant_policy)
    per_session = bytes_per_session(shape, session_len, tp, quant_policy)
    budget = _budget(gpu_bytes, weights_bytes, tp, cache_max_entry_count)
    sessions = budget // per_session if per_session else 0
    largest = largest_session(budget, per_token)
    advice: list[str] = []
    if sessions < 1:
        advice = _advice(
            shape, session_len, gpu_bytes, weights_bytes, tp, cache_max_entry_count, quant_policy,
            largest, native_context, gpu_count,
        )
    return MemoryPlan(
        gpu_bytes=gpu_bytes,
        gpu_source=gpu_source,
        weights_bytes=weights_bytes,
        weights_source=weights_source,
        tp=tp,
        cache_max_entry_count=cache_max_entry_count,
        quant_policy=quant_policy,
        session_len=session_len,
        bytes_per_token=per_token,
        bytes_per_session=per_session,
        budget_bytes=budget,
        sessions=int(sessions),
        advice=tuple(advice),
        largest_session_len=largest,
    )


def _advice(shape, session_len, gpu_bytes, weights_bytes, tp, ratio, quant_policy, largest, native,
            gpu_count) -> list[str]:
    tips: list[str] = []
    if largest > 0:
        tips.append(f"--session-len {largest} (the largest that fits)")
    for q in (8, 4):
        if QUANT_BITS[q] < QUANT_BITS[quant_policy]:
            budget = _budget(gpu_bytes, weights_bytes, tp, ratio)
            if budget >= bytes_per_session(shape, session_len, tp, q):
                tips.append(f"--quant-policy {q} ({QUANT_NAMES[q]} KV cache)")
                break
    for more_tp in (2, 4, 8):
        if more_tp <= tp or (gpu_count is not None and more_tp > gpu_count):
            continue
        budget = _budget(gpu_bytes, weights_bytes, more_tp, ratio)
        if budget >= bytes_per_session(shape, session_len, more_tp, quant_policy):
            tips.append(f"--tp {more_tp} ({more_tp} GPUs)")
            break
    if native and largest > native:
        tips.append(f"--factor {math.floor(largest / native * 100) / 100:g} (a smaller factor)")
    if ratio < 0.95:
        budget = _budget(gpu_bytes, weights_bytes, tp, 0.95)
        if budget >= bytes_per_session(shape, session_len, tp, quant_policy):
            tips.append("--cache-max-entry-count 0.95")
    if not tips:
        tips.append("a GPU with more memory: the weights leave no room for the KV cache")
    return tips


def weights_bytes_estimate(parameters: float, dtype: str) -> int:
    return int(parameters * DTYPE_BYTES.get(dtype, 2))
