"""The RoPE rules: what to write into a model's config so that lmdeploy really serves F x its context.

Everything here is a pure function of a config dict (the parsed ``config.json``) and a request.
Nothing reads files, imports an engine or prints. The facts behind the rules (lmdeploy 0.18):

* Native context N: ``max_position_embeddings`` when the config has no scaling, or ``dynamic`` /
  ``linear`` scaling (these leave it at the native value); ``original_max_position_embeddings``
  of an existing ``yarn`` / ``llama3`` scaling.
* dynamic / linear: write the factor, keep ``max_position_embeddings`` = N. TurboMind uses
  ``max_position_embeddings`` as the NTK threshold: raising it switches scaling off below it.
* yarn: write factor and ``original_max_position_embeddings`` = N, and ``max_position_embeddings``
  = N x F. TurboMind ignores ``factor`` when the original is present and uses the ratio instead.
* llama3: factor, low 1.0, high 4.0, original N, ``max_position_embeddings`` = N x F (the shape of
  Llama 3.1's own config).
* Both ``type`` and ``rope_type`` are written (older readers look at the first, transformers 5 and
  lmdeploy's override path at the second).
* A config that has ``rope_parameters`` (transformers 5) is read only there by lmdeploy: patch it,
  keeping ``rope_theta``. Multimodal configs keep the language model's settings under
  ``text_config`` / ``llm_config`` / ``language_config``.
* InternLM v1 is Llama with biases on the attention projections: rewritten to
  ``LlamaForCausalLM`` with ``attention_bias: true`` so that current TurboMind loads it.
* Never silently: shrink the context a trained scaling (linear, yarn, llama3) serves, replace
  another scaling type, or write a type the engine does not implement. Dynamic over dynamic takes
  the factor asked for, smaller included, with a note: dynamic NTK is training-free, and lmdeploy
  serves such a config at N anyway (InternLM3 ships dynamic x6).
* Every number read has a type and a range (``configcheck``); N x F must fit lmdeploy's int32.
* A transformers-5 ``rope_parameters`` keyed per attention type (Gemma 3) is refused, never rewritten:
  lmdeploy reads it only in its own Gemma code, as a fixed linear scaling.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from .configcheck import INT32_MAX, check_config, config_int, optional_number, shown
from .errors import (
    BadConfig,
    BadFactor,
    BadOption,
    ContextTooLong,
    ExistingScalingUnsupported,
    MissingFactor,
    PerAttentionRope,
    ReplacesScaling,
    SessionBeyondScaling,
    ShrinksContext,
    UnknownRopeType,
    UnsupportedRopeType,
)

# Types launch knows how to write (the one list: presets, flags and the contract test import it).
WRITABLE_TYPES: tuple[str, ...] = ("dynamic", "linear", "yarn", "llama3")
# Types each lmdeploy engine implements (turbomind: models/utils.py parse_rope_param;
# pytorch: nn/rotary_embedding.py build_rotary_params). A contract test checks these.
ENGINE_TYPES: dict[str, tuple[str, ...]] = {
    "turbomind": ("default", "linear", "dynamic", "yarn", "llama3"),
    "pytorch": ("default", "linear", "dynamic", "yarn", "longrope", "llama3"),
}
NESTED_TEXT_KEYS: tuple[str, ...] = ("text_config", "llm_config", "language_config")
# Keys of a transformers-5 ``rope_parameters`` dict that are not about scaling: kept on rewrite.
_BASE_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")
_NO_SCALING = (None, "", "default", "none")

LLAMA3_LOW_FREQ = 1.0
LLAMA3_HIGH_FREQ = 4.0

INTERNLM_V1_ARCH = "InternLMForCausalLM"
_REMOTE_MODEL_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForCausalLM")

_MISSING = object()


# --- parsing the user's values --------------------------------------------------------------


def parse_factor(value: str | float) -> float:
    """A finite number greater than 1, from a flag or a preset (plain ASCII digits: Python's float()
    would also take "３" or "1_0")."""
    if isinstance(value, str) and (not value.isascii() or "_" in value):
        raise BadFactor(ascii(value)[1:-1])
    try:
        factor = float(value)
    except (TypeError, ValueError):
        raise BadFactor(str(value)) from None
    if isinstance(value, bool) or not math.isfinite(factor) or factor <= 1.0:
        raise BadFactor(str(value))
    return factor


def parse_rope_type(value: str) -> str:
    name = str(value).strip().lower()
    if name not in WRITABLE_TYPES:
        raise UnknownRopeType(str(value), WRITABLE_TYPES)
    return name


# --- reading what a config says ---------------------------------------------------------------


@dataclass(frozen=True)
class RopeState:
    """What a config's RoPE settings are now."""

    section: tuple[str, ...]  # () for the top level, ("text_config",) for a nested language model
    key: str  # "rope_scaling" or "rope_parameters"
    settings: dict | None  # the dict under ``key`` (None when absent / null)
    rope_type: str | None  # None when the config has no scaling
    factor: float | None
    max_position_embeddings: int
    native_context: int
    served_context: int  # the context these settings cover


def text_section_path(config: dict) -> tuple[str, ...]:
    for key in NESTED_TEXT_KEYS:
        if isinstance(config.get(key), dict):
            return (key,)
    return ()


def _get_section(config: dict, path: tuple[str, ...]) -> dict:
    section = config
    for key in path:
        section = section[key]
    return section


def _scaling_type(settings: dict | None, source: str, where: str) -> str | None:
    if not isinstance(settings, dict):
        return None
    for key in ("rope_type", "type"):
        name = settings.get(key)
        if name is not None and not isinstance(name, str):
            raise BadConfig(source, f"{where}{key} must be a RoPE type name, found {shown(name)}")
    name = settings.get("rope_type") or settings.get("type")
    return None if name in _NO_SCALING else name


def _per_attention_kinds(settings: dict) -> tuple[str, ...]:
    """The keys of a transformers-5 ``rope_parameters`` that is keyed per attention type (Gemma 3:
    ``{"full_attention": {...}, "sliding_attention": {...}}``), else ()."""
    if "rope_type" in settings or "type" in settings:
        return ()
    return tuple(str(k) for k, v in settings.items() if isinstance(v, dict))


def served_context(rope_type: str | None, factor: float | None, max_pos: int, native: int) -> int:
    """The context a config's settings cover: N x F for dynamic / linear, the declared
    max_position_embeddings for yarn / llama3 (which carry N separately), N without scaling."""
    if rope_type in ("dynamic", "linear") and factor and factor > 1:
        return round(native * factor)
    if rope_type in ("yarn", "llama3"):
        return max(max_pos, native)
    return native


def read_rope(config: dict, source: str = "config.json") -> RopeState:
    """Read the RoPE state of ``config`` (raises BadConfig when a needed fact is missing or has
    the wrong type or range, naming the file, the field and the value)."""
    check_config(config, source)
    path = text_section_path(config)
    section = _get_section(config, path)
    where = "".join(f"{p}." for p in path)
    key = "rope_parameters" if "rope_parameters" in section else "rope_scaling"
    settings = section.get(key)
    if settings is not None and not isinstance(settings, dict):
        raise BadConfig(source, f"{where}{key} must be an object or null, found {shown(settings)}")
    if settings is not None:
        kinds = _per_attention_kinds(settings)
        if kinds:
            raise PerAttentionRope(source, f"{where}{key}", kinds)
    optional_number(section, "rope_theta", source, where)
    rope_type = _scaling_type(settings, source, f"{where}{key}.")
    max_pos = config_int(section, "max_position_embeddings", source, where)
    factor = None
    if settings is not None:
        optional_number(settings, "rope_theta", source, f"{where}{key}.")
    if rope_type is not None:
        factor = optional_number(settings, "factor", source, f"{where}{key}.")
    native = max_pos
    if rope_type in ("yarn", "llama3") and settings.get("original_max_position_embeddings") is not None:
        native = config_int(settings, "original_max_position_embeddings", source, f"{where}{key}.")
    return RopeState(
        section=path,
        key=key,
        settings=copy.deepcopy(settings),
        rope_type=rope_type,
        factor=factor,
        max_position_embeddings=max_pos,
        native_context=native,
        served_context=served_context(rope_type, factor, max_pos, native),
    )


# --- deciding what to write -------------------------------------------------------------------


@dataclass(frozen=True)
class RopeRequest:
    """What the user (or a preset) asks for. ``None`` means: keep what the config has."""

    factor: float | None = None
    rope_type: str | None = None
    session_len: int | None = None
    force: bool = False
    engine: str = "turbomind"


@dataclass(frozen=True)
class Change:
    """One config value that the patch sets (``new`` is ``None`` with ``removed`` for a deletion)."""

    path: tuple[str, ...]
    old: Any
    new: Any
    removed: bool = False
    added: bool = False

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class RopeDecision:
    native_context: int
    factor: float
    rope_type: str
    session_len: int
    covered_context: int  # what the written scaling covers
    section: tuple[str, ...]
    key: str
    settings: dict  # the RoPE dict as written
    max_position_embeddings: int  # as written
    changes: tuple[Change, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    before: RopeState | None = None

    @property
    def unchanged(self) -> bool:
        return not self.changes


def _v1_changes(config: dict, source: str) -> list[Change]:
    """InternLM v1 -> Llama with attention bias (lmdeploy dropped InternLM v1 in 0.14)."""
    if INTERNLM_V1_ARCH not in (config.get("architectures") or []):
        return []
    changes = [
        Change(("architectures",), config.get("architectures"), ["LlamaForCausalLM"]),
        Change(("model_type",), config.get("model_type"), "llama", added="model_type" not in config),
    ]
    bias = config.get("bias", True)
    if not isinstance(bias, bool):
        raise BadConfig(source, f"bias must be true or false, found {shown(bias)}")
    for key, value in (("attention_bias", bias), ("mlp_bias", False)):
        if config.get(key, _MISSING) != value:
            changes.append(Change((key,), config.get(key), value, added=key not in config))
    if "rope_theta" not in config and "rope_parameters" not in config:
        rotary = config.get("rotary") if isinstance(config.get("rotary"), dict) else {}
        theta = optional_number(rotary, "base", source, "rotary.") or 10000.0
        changes.append(Change(("rope_theta",), None, theta, added=True))
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and any(k in auto_map for k in _REMOTE_MODEL_CLASSES):
        kept = {k: v for k, v in auto_map.items() if k not in _REMOTE_MODEL_CLASSES}
        if kept:
            changes.append(Change(("auto_map",), auto_map, kept))
        else:
            changes.append(Change(("auto_map",), auto_map, None, removed=True))
    return changes


def _new_settings(before: RopeState, rope_type: str, factor: float) -> tuple[dict, int]:
    """The RoPE dict to write and the max_position_embeddings to write with it."""
    native = before.native_context
    old = before.settings or {}
    if before.rope_type == rope_type:
        settings = dict(old)  # same type: keep its extra keys (beta_fast, attention_factor, ...)
    else:
        settings = {k: old[k] for k in _BASE_ROPE_KEYS if k in old} if before.key == "rope_parameters" else {}
        for stale in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
            settings.pop(stale, None)
    settings["type"] = rope_type
    settings["rope_type"] = rope_type
    settings["factor"] = float(factor)
    if rope_type in ("dynamic", "linear"):
        settings.pop("original_max_position_embeddings", None)
        return settings, native
    settings["original_max_position_embeddings"] = native
    if rope_type == "llama3":
        settings.setdefault("low_freq_factor", LLAMA3_LOW_FREQ)
        settings.setdefault("high_freq_factor", LLAMA3_HIGH_FREQ)
    return settings, round(native * factor)


def _already_right(before: RopeState, rope_type: str, factor: float) -> bool:
    """The config already carries this scaling in a shape lmdeploy reads correctly."""
    if before.rope_type != rope_type or before.factor != factor:
        return False
    old = before.settings or {}
    if rope_type in ("dynamic", "linear"):
        return True
    original = old.get("original_max_position_embeddings")
    if original is None:
        return False
    if rope_type == "yarn":  # TurboMind derives the factor from the ratio
        return before.max_position_embeddings == round(original * factor)
    # llama3: both engines read factor, low, high and original directly; lmdeploy's PyTorch
    # engine needs both frequency factors present.
    return "low_freq_factor" in old and "high_freq_factor" in old


def decide(config: dict, request: RopeRequest, source: str = "config.json") -> RopeDecision:
    """Everything the patch will write for ``request`` on ``config``, or a refusal."""
    before = read_rope(config, source)
    if before.rope_type is not None and before.rope_type not in WRITABLE_TYPES:
        raise ExistingScalingUnsupported(before.rope_type)

    rope_type = request.rope_type or before.rope_type or "dynamic"
    if rope_type not in WRITABLE_TYPES:
        raise UnknownRopeType(rope_type, WRITABLE_TYPES)
    engine_types = ENGINE_TYPES.get(request.engine)
    if engine_types is None:
        raise BadOption("--backend", request.engine, f"choose one of {', '.join(ENGINE_TYPES)}")
    if rope_type not in engine_types:
        raise UnsupportedRopeType(rope_type, request.engine, engine_types)

    factor = request.factor if request.factor is not None else before.factor
    if factor is None:
        raise MissingFactor(source)
    factor = parse_factor(factor)
    if before.native_context * factor > INT32_MAX:
        raise ContextTooLong(source, before.native_context, factor, INT32_MAX)

    warnings: list[str] = []
    if before.rope_type is not None and before.rope_type != rope_type:
        if not request.force:
            raise ReplacesScaling(before.rope_type, before.factor, rope_type)
        had = f" x{before.factor:g}" if before.factor is not None else ""
        warnings.append(f"replacing the config's {before.rope_type}{had} scaling with {rope_type} (--force)")

    changes = _v1_changes(config, source)
    if _already_right(before, rope_type, factor):
        settings, max_pos = dict(before.settings or {}), before.max_position_embeddings
    else:
        settings, max_pos = _new_settings(before, rope_type, factor)
    covered = served_context(rope_type, factor, max_pos, before.native_context)
    if covered < before.served_context:
        if before.rope_type == rope_type == "dynamic":
            # Dynamic NTK is training-free, and lmdeploy serves such a config at N anyway (it never
            # multiplies by the factor): a smaller factor is the user's choice, not a loss.
            warnings.append(
                f"the config had dynamic x{before.factor:g} ({before.served_context} tokens); writing "
                f"dynamic x{factor:g} as asked ({covered} tokens)"
            )
        elif not request.force:
            raise ShrinksContext(before.served_context, covered, rope_type, factor)
        else:
            warnings.append(f"shrinking the served context from {before.served_context} to {covered} (--force)")

    path = before.section
    if settings != before.settings:
        changes.append(
            Change(path + (before.key,), before.settings, settings, added=before.key not in _get_section(config, path))
        )
    if max_pos != before.max_position_embeddings:
        changes.append(Change(path + ("max_position_embeddings",), before.max_position_embeddings, max_pos))

    session_len = covered
    if request.session_len is not None:
        session_len = request.session_len
        if isinstance(session_len, bool) or not isinstance(session_len, int) or not 0 < session_len <= INT32_MAX:
            raise BadOption("--session-len", str(request.session_len),
                            f"must be a whole number of tokens from 1 to {INT32_MAX:,} (lmdeploy's limit)")
        if session_len > covered:
            if rope_type == "dynamic":
                warnings.append(
                    f"session_len {session_len} is past the {covered} tokens dynamic x{factor:g} is meant "
                    "for; dynamic NTK keeps extrapolating there with falling quality"
                )
            elif request.force:
                warnings.append(f"session_len {session_len} is past what {rope_type} x{factor:g} covers (--force)")
            else:
                raise SessionBeyondScaling(session_len, covered, rope_type)
        if session_len <= before.native_context:
            warnings.append(
                f"session_len {session_len} is within the native {before.native_context}: "
                "the scaling changes nothing for it"
            )

    return RopeDecision(
        native_context=before.native_context,
        factor=factor,
        rope_type=rope_type,
        session_len=session_len,
        covered_context=covered,
        section=path,
        key=before.key,
        settings=settings,
        max_position_embeddings=max_pos,
        changes=tuple(changes),
        warnings=tuple(warnings),
        before=before,
    )


def apply(config: dict, decision: RopeDecision) -> dict:
    """A new config with ``decision``'s changes; ``config`` itself is left untouched."""
    patched = copy.deepcopy(config)
    for change in decision.changes:
        target = patched
        for key in change.path[:-1]:
            target = target[key]
        if change.removed:
            target.pop(change.path[-1], None)
        else:
            target[change.path[-1]] = copy.deepcopy(change.new)
    return patched
