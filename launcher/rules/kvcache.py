"""The KV-cache plan: how many bytes a token costs, whether one full session fits, and what would
make it fit. Pure functions over numbers; nothing here touches a GPU.

TurboMind's rules (lmdeploy 0.18):
* bytes per token per GPU = layers x 2 x (kv_heads / attn_tp) x (head_dim x bits / 8 + (4 if quantized));
  bits = 16, 8 (quant_policy 8) or 4 (quant_policy 4); KV heads fewer than attn_tp are repeated up to it.
* context parallelism (``cp``): of the tp GPUs, attention runs on attn_tp = tp / cp head groups, each
  group's cp GPUs holding every cp-th token of a sequence (``turbomind/parallel_config.py``:
  devices = attn_tp x cp = tp; the C++ engine interleaves tokens, rank r holding positions t with
  t % cp == r). So one session of S tokens holds ceil(S / cp) tokens of attn_tp's heads on each GPU.
  Without cp, attn_tp = tp.
* the cache is handed out in blocks of 64 tokens (of each GPU's share);
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


def attn_tp(tp: int, cp: int = 1) -> int:
    """The attention's tensor-parallel size: tp / cp (lmdeploy's layout check has made sure cp divides tp)."""
    return max(1, tp // cp)


def tp_split(section: Mapping, tp: int, source: str = "config.json", cp: int = 1) -> int:
    """The tp rule, written once: TurboMind splits the attention heads evenly over attn_tp = tp / cp GPUs
    and the hidden size over the tp GPUs (``LayoutHeadsIndivisible`` otherwise). Returns the KV heads each
    GPU holds."""
    heads = config_int(section, "num_attention_heads", source)
    hidden = optional_int(section, "hidden_size", source)
    kv_heads = optional_int(section, "num_key_value_heads", source, high=heads) or heads
    if heads % attn_tp(tp, cp):
        raise LayoutHeadsIndivisible("attention heads", heads, tp)
    if hidden is not None and hidden % tp:
        raise LayoutHeadsIndivisible("hidden size (embedding columns)", hidden, tp)
    return kv_heads_per_gpu(kv_heads, attn_tp(tp, cp))


def bytes_per_token(shape: ModelShape, tp: int = 1, quant_policy: int = 0, cp: int = 1) -> int:
    """KV-cache bytes one token costs on a GPU that holds it (its attn_tp share of the KV heads)."""
    bits = QUANT_BITS[quant_policy]
    per_head = shape.head_dim * bits // 8 + (4 if quant_policy else 0)
    return shape.layers * 2 * kv_heads_per_gpu(shape.kv_heads, attn_tp(tp, cp)) * per_head


def blocks(tokens: int) -> int:
    return math.ceil(tokens / BLOCK_TOKENS)


def bytes_per_session(shape: ModelShape, session_len: int, tp: int = 1, quant_policy: int = 0, cp: int = 1) -> int:
    """Bytes one full-length session holds on each GPU: its ceil(S / cp) tokens, in whole 64-token blocks."""
    return blocks(math.ceil(session_len / cp)) * BLOCK_TOKENS * bytes_per_token(shape, tp, quant_policy, cp)


@dataclass(frozen=True)
class KvCost:
    quant_policy: int
    bytes_per_token: int
    bytes_per_session: int

    @property
    def name(self) -> str:
        return QUANT_NAMES[self.quant_policy]


def kv_costs(shape: ModelShape, session_len: int, tp: int = 1, cp: int = 1) -> dict[int, KvCost]:
    """The cost per token and per session for fp16, int8 and int4 KV cache."""
    return {
        q: KvCost(q, bytes_per_token(shape, tp, q, cp), bytes_per_session(shape, session_len, tp, q, cp))
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
    cp: int = 1

    @property
    def fits(self) -> bool:
        return self.sessions >= 1


def attention_weight_bytes(shape: ModelShape) -> int:
    """The attention projections' bytes (q, k, v, o), with the hidden size taken as heads x head_dim: what
    context parallelism keeps on each of a group's cp GPUs instead of splitting it over all tp."""
    q_dim = shape.heads * shape.head_dim
    per_layer = q_dim * q_dim * 2 + 2 * q_dim * shape.kv_heads * shape.head_dim
    return shape.layers * per_layer * DTYPE_BYTES.get(shape.dtype, 2)


def weights_per_gpu(shape: ModelShape, weights_bytes: int, tp: int, cp: int = 1) -> int:
    """Weight bytes on each GPU: everything over tp, except (with cp) the attention over attn_tp = tp / cp."""
    if cp == 1:
        return math.ceil(weights_bytes / tp)
    attention = min(weights_bytes, attention_weight_bytes(shape))
    return math.ceil((weights_bytes - attention) / tp + attention / attn_tp(tp, cp))


def _budget(shape: ModelShape, gpu_bytes: int, weights_bytes: int, tp: int, ratio: float, cp: int = 1) -> int:
    free_after_weights = gpu_bytes - weights_per_gpu(shape, weights_bytes, tp, cp)
    return max(0, int(free_after_weights * ratio))


def largest_session(budget: int, per_token: int, cp: int = 1) -> int:
    """The longest session (whole blocks of each GPU's share) that ``budget`` holds."""
    if per_token <= 0:
        return 0
    return (budget // per_token) // BLOCK_TOKENS * BLOCK_TOKENS * cp


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
    cp: int = 1,
    length_flag: str = "--session-len",
) -> MemoryPlan:
    """Whether one full session fits (``cp``: context parallelism, see the module's rules).
    ``length_flag``: the flag the advice names for a shorter session (``--context`` when it was asked)."""
    per_token = bytes_per_token(shape, tp, quant_policy, cp)
    per_session = bytes_per_session(shape, session_len, tp, quant_policy, cp)
    budget = _budget(shape, gpu_bytes, weights_bytes, tp, cache_max_entry_count, cp)
    sessions = budget // per_session if per_session else 0
    largest = largest_session(budget, per_token, cp)
    advice: list[str] = []
    if sessions < 1:
        advice = _advice(
            shape, session_len, gpu_bytes, weights_bytes, tp, cache_max_entry_count, quant_policy,
            largest, native_context, gpu_count, cp, length_flag,
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
        cp=cp,
    )


def _advice(shape, session_len, gpu_bytes, weights_bytes, tp, ratio, quant_policy, largest, native,
            gpu_count, cp=1, length_flag="--session-len") -> list[str]:
    def fits(tp=tp, ratio=ratio, quant_policy=quant_policy, cp=cp) -> bool:
        budget = _budget(shape, gpu_bytes, weights_bytes, tp, ratio, cp)
        return budget >= bytes_per_session(shape, session_len, tp, quant_policy, cp)

    tips: list[str] = []
    if largest > 0:
        tips.append(f"{length_flag} {largest} (the largest that fits)")
    for q in (8, 4):
        if QUANT_BITS[q] < QUANT_BITS[quant_policy] and fits(quant_policy=q):
            tips.append(f"--quant-policy {q} ({QUANT_NAMES[q]} KV cache)")
            break
    for more_tp in (2, 4, 8):
        if more_tp <= tp or (gpu_count is not None and more_tp > gpu_count) or more_tp % cp:
            continue
        if fits(tp=more_tp):
            tips.append(f"--tp {more_tp} ({more_tp} GPUs)")
            break
    if cp == 1 and tp >= 2 and tp % 2 == 0 and shape.heads % (tp // 2) == 0 and fits(cp=2):
        tips.append("--cp 2 (context parallelism: each GPU holds half of every session's tokens)")
    if native and largest > native and length_flag == "--session-len":
        tips.append(f"--factor {math.floor(largest / native * 100) / 100:g} (a smaller factor)")
    if ratio < 0.95 and fits(ratio=0.95):
        tips.append("--cache-max-entry-count 0.95")
    if not tips:
        tips.append("a GPU with more memory: the weights leave no room for the KV cache")
    return tips


def weights_bytes_estimate(parameters: float, dtype: str) -> int:
    return int(parameters * DTYPE_BYTES.get(dtype, 2))
