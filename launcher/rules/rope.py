"""The RoPE rules: what to write into a model's config so that every reader serves F x its context.

Everything here is a pure function of a config dict (the parsed ``config.json``) and a request.
Nothing reads files, imports an engine or prints. The facts behind the rules (lmdeploy 0.18,
transformers 5.25, read in their source and run on a CPU):

Who reads the overlay
  lmdeploy loads a config with ``lmdeploy.archs.get_model_arch`` -> ``hf_configs.config_from_pretrained``:
  transformers' ``AutoConfig`` first (the model's own class: transformers' or, with ``auto_map``, the
  checkpoint's ``configuration_*.py``), and when that raises, a generic ``PretrainedConfig`` that checks
  nothing. Both engines then read RoPE from that object: TurboMind's ``models/utils.parse_rope_param``
  (``rope_parameters`` first, else ``rope_scaling`` + ``rope_theta``; ``rope_type`` before ``type``) and
  the PyTorch engine's ``nn/rotary_embedding.build_rotary_params``. A fallback load is not acceptance:
  transformers, OpenCompass and every ``AutoModelForCausalLM`` script then fail on the same overlay. So
  the shape written is the one the model's own config class accepts (``ConfigClass`` below):

  * InternLM2 (``configuration_internlm2.py``, InternLM2Config, shipped with every InternLM2 checkpoint
    and copied into InternVL's): ``_rope_scaling_validation`` takes a dict of exactly two fields,
    ``type`` in {linear, dynamic} and a float ``factor`` >= 1. launch writes ``{"type": T, "factor": F}``
    (the seed fix's shape) and refuses yarn and llama3 for it, ``--force`` or not.
  * InternLM3 (``configuration_internlm3.py``, InternLM3Config): copies ``type`` into ``rope_type`` and
    runs transformers' ``rope_config_validation``; it ships ``{"rope_type": "dynamic", "factor": 6.0}``,
    and launch writes that form (``rope_type`` only), every type.
  * transformers' own classes (Llama, Qwen2, Mistral, Qwen2-VL, ...): ``type`` and ``rope_type`` both
    (transformers 4 reads the first, 5 the second, both accept the pair).
  * Phi-3 (``configuration_phi3.py``, Phi3Config, named by ``auto_map``; transformers' own Phi3Config, 5.25,
    has the same rule): ``_rope_scaling_adjustment`` renames ``su`` / ``yarn`` to ``longrope``, then
    ``_rope_scaling_validation`` takes only ``{"type": "longrope", "short_factor": [...], "long_factor": [...]}``.
    It holds none of the types launch writes: every one is refused, ``--force`` or not (measured: the class
    refuses each, lmdeploy then falls back for dynamic / linear and raises for yarn / llama3).
  * A class from a checkpoint's code that launch has not read (``auto_map`` names it): dynamic and linear
    only, in the key style the checkpoint ships (the two-field ``{"type", "factor"}`` form, which most such
    classes copied from transformers' LlamaConfig 4.31-4.41, when it ships none), with a warning that launch
    does not know its rule; ``launch serve`` reads the overlay with that class before loading any weight
    (``launcher/engine/readback.py``, with trust_remote_code) and stops if it refuses it. yarn and llama3
    are refused, ``--force`` or not: when such a class refuses them, lmdeploy's fallback cannot read them
    either (``get_model_arch`` raises AttributeError, the generic config has no ``max_position_embeddings``).
  * The whole config's own class, when the RoPE settings are nested (InternVL's ``InternVLChatConfig``, which
    builds ``llm_config`` with the class its architecture names: InternLM2Config, Qwen2Config, ...): AutoConfig
    runs it first, so trust_remote_code is needed for it whatever the language model's class is; the plan
    names both (``RopeDecision.outer``, ``remote_class``).
  * "Unchanged" means the same JSON (``differs``): ``{"factor": 2}`` is ``==`` ``{"factor": 2.0}`` in Python,
    but InternLM2's class refuses the first, so it is rewritten.

What to write, per type (TurboMind's reading rules)
  * Native context N: ``max_position_embeddings`` when the config has no scaling, or ``dynamic`` /
    ``linear`` scaling (these leave it at the native value); ``original_max_position_embeddings`` of an
    existing ``yarn`` / ``llama3`` scaling.
  * dynamic / linear: write the factor, keep ``max_position_embeddings`` = N. TurboMind uses
    ``max_position_embeddings`` as the NTK threshold: raising it switches scaling off below it.
  * yarn: write factor and ``original_max_position_embeddings`` = N, and ``max_position_embeddings``
    = N x F. TurboMind ignores ``factor`` when the original is present and reads
    ``max_position_embeddings / N`` instead, so N x F must be whole: a factor is rounded to the nearest
    one that is (x1.1 over 4096 is written as 4506 / 4096 = x1.10009765625, and every engine reads that),
    and a factor that rounds to x1 is refused.
  * llama3: factor, low 1.0, high 4.0, original N, ``max_position_embeddings`` = N x F (Llama 3.1's shape).

Where to write it
  * transformers 5 saves ``rope_parameters`` (with ``rope_theta`` inside). When a config has both keys,
    transformers 5 (``convert_rope_params_to_dict``: ``rope_scaling or rope_parameters``) and lmdeploy
    through it read a non-empty ``rope_scaling``: launch patches that one and rewrites ``rope_parameters``
    to the same settings (keeping its ``rope_theta``), so the two never disagree; a base kept only in
    ``rope_parameters`` is copied into the dict written, where transformers would otherwise put 10000.
  * Kept through every rewrite, ``--force`` included: ``rope_theta`` and ``partial_rotary_factor`` inside
    the dict, and Qwen2-VL's ``mrope_section`` / ``mrope_interleaved`` (``"type": "mrope"`` counts as no
    scaling, as in both engines; mrope is applied on top of the base RoPE in both, so a scaled mrope is
    served as planned: TurboMind's ``qwen2_vl`` reads ``text_config`` and ``parse_rope_param`` keeps the
    section).
  * Multimodal configs keep the language model under ``llm_config`` (InternVL: both engines' InternVL
    readers take it before ``text_config``), ``text_config`` or ``language_config``; launch patches the
    first present, in that order, and says so when another is present too.
  * InternLM v1 is Llama with biases on the attention projections: rewritten to ``LlamaForCausalLM``
    with ``attention_bias: true`` so that current TurboMind loads it; its reader is then transformers'
    LlamaConfig.

Never silently
  * shrink the context a trained scaling (linear, yarn, llama3) serves, replace another scaling type,
    or write a type the engine or the config class does not implement. Dynamic over dynamic takes the
    factor asked for, smaller included, with a note: dynamic NTK is training-free, and lmdeploy serves
    such a config at N anyway (InternLM3 ships dynamic x6).
  * Every number read has a type and a range (``configcheck``); N x F must fit lmdeploy's int32;
    ``rope_theta`` is any finite positive float32 (TurboMind keeps the base as a float).
  * A transformers-5 ``rope_parameters`` keyed per attention type (Gemma 3) is refused, never rewritten:
    lmdeploy reads it only in its own Gemma code, as a fixed linear scaling.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any

from launcher.errors import LaunchError
from launcher.rules.checks import BadOption
from launcher.rules.configcheck import INT32_MAX, BadConfig, check_config, config_int, optional_number, shown
from launcher.rules.limits import ROPE_THETA
from launcher.rules.readers import (
    _TYPE_KEYS,
    WRITABLE_TYPES,
    ConfigClass,
    check_keys,
    check_type,
    config_class,
    dict_rule,
    in_shape,
    outer_class,
    shaped,
    unknown_rule_note,
)


class BadFactor(LaunchError):
    value: str
    exit_code = 2
    message = "factor must be a finite number greater than 1, got {value!r}. Example: --factor 2"


class MissingFactor(LaunchError):
    model: str
    exit_code = 2
    message = (
        "{model} has no default factor (no preset, no RoPE scaling in its config). "
        "Give one, e.g. --factor 2"
    )


class UnknownRopeType(LaunchError):
    value: str
    known: tuple[str, ...]
    exit_code = 2
    message = "unknown RoPE type {value!r}. Choose one of: {known_list}"


class UnsupportedRopeType(LaunchError):
    """A type launch can write, but the chosen engine does not implement, or vice versa."""

    rope_type: str
    engine: str
    supported: tuple[str, ...]
    message = (
        "RoPE type {rope_type!r} is not implemented by the {engine} engine "
        "(it has: {supported_list}). Choose another --type or --backend."
    )


class ExistingScalingUnsupported(LaunchError):
    rope_type: str
    message = (
        "the config already uses {rope_type!r} RoPE scaling, which launch cannot extend. "
        "Serve it as it is with lmdeploy, or pick a checkpoint without it."
    )


class PerAttentionRope(LaunchError):
    """A transformers-5 ``rope_parameters`` keyed per attention type (Gemma 3's shape)."""

    source: str
    key: str
    kinds: tuple[str, ...]
    message = (
        "{source}: {key} holds separate RoPE settings per attention type ({kinds_list}); lmdeploy reads "
        "that shape only in its own model code (a fixed linear scaling), so launch does not patch it. "
        "Serve this checkpoint as it is with lmdeploy."
    )


class ReplacesScaling(LaunchError):
    existing: str
    existing_factor: float | None
    requested: str

    def message(self) -> str:
        factor = f" x{self.existing_factor:g}" if self.existing_factor else ""
        return (
            f"the config already has {self.existing}{factor} RoPE scaling; writing {self.requested} "
            f"would replace it. Use --type {self.existing} to extend it, or add --force to replace it "
            "on purpose."
        )


class ShrinksContext(LaunchError):
    served: int
    requested: int
    rope_type: str
    factor: float
    message = (
        "{rope_type} x{factor:g} serves {requested} tokens, less than the {served} the config "
        "already serves. Use a larger --factor, or add --force to shrink it on purpose."
    )


class ContextTooLong(LaunchError):
    """N x F past what lmdeploy can hold (its session length is a 32-bit int)."""

    source: str
    native: int
    factor: float
    limit: int
    message = (
        "{source}: factor {factor:g} over the native {native} tokens is past lmdeploy's limit of "
        "{limit} tokens per session. Use a smaller --factor."
    )


class SessionBeyondScaling(LaunchError):
    session_len: int
    covered: int
    rope_type: str
    message = (
        "--session-len {session_len} is past the {covered} tokens that {rope_type} scaling covers. "
        "Raise --factor, or add --force to serve it anyway."
    )


# Types each lmdeploy engine implements (turbomind: models/utils.py parse_rope_param;
# pytorch: nn/rotary_embedding.py build_rotary_params). A contract test checks these.
ENGINE_TYPES: dict[str, tuple[str, ...]] = {
    "turbomind": ("default", "linear", "dynamic", "yarn", "llama3"),
    "pytorch": ("default", "linear", "dynamic", "yarn", "longrope", "llama3"),
}
# Where multimodal configs keep the language model, in the order lmdeploy's readers look.
NESTED_TEXT_KEYS: tuple[str, ...] = ("llm_config", "text_config", "language_config")
# Keys of a RoPE dict that are not about scaling: kept through every rewrite.
_KEPT_KEYS = ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved")
_NO_SCALING = (None, "", "default", "none", "mrope")  # "mrope": no scaling, as both engines read it

LLAMA3_LOW_FREQ = 1.0
LLAMA3_HIGH_FREQ = 4.0

INTERNLM_V1_ARCH = "InternLMForCausalLM"
_REMOTE_MODEL_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForCausalLM")



class YarnFactorRoundsAway(LaunchError):
    """yarn x F over N: TurboMind reads max_position_embeddings / N, and round(N x F) / N is 1."""

    factor: float
    native: int
    exit_code = 2

    def message(self) -> str:
        return (
            f"yarn x{self.factor:g} over {self.native:,} tokens would be written as max_position_embeddings "
            f"{round(self.native * self.factor):,}, which TurboMind reads as x1 (no extension). "
            "Use a larger --factor, e.g. --factor 2"
        )


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
    """What a config's RoPE settings are now, as lmdeploy reads them."""

    section: tuple[str, ...]  # () for the top level, ("llm_config",) for a nested language model
    key: str  # "rope_scaling" or "rope_parameters": the one read
    settings: dict | None  # the dict under ``key`` (None when absent / null)
    rope_type: str | None  # None when the config has no scaling
    factor: float | None
    max_position_embeddings: int
    native_context: int
    served_context: int  # the context these settings cover
    mirror: str | None = None  # the other key, present too: kept consistent with ``key``
    others: tuple[str, ...] = ()  # other language-model sections present beside ``section``


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
    for key in _TYPE_KEYS:
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


def _read_key(section: dict) -> tuple[str, str | None]:
    """The key transformers 5 (and lmdeploy through it) reads, and the other one when present too:
    ``rope_scaling or rope_parameters``."""
    if section.get("rope_scaling"):
        return "rope_scaling", ("rope_parameters" if "rope_parameters" in section else None)
    if "rope_parameters" in section:
        return "rope_parameters", None
    return "rope_scaling", None


def served_context(rope_type: str | None, factor: float | None, max_pos: int, native: int) -> int:
    """The context a config's settings cover: N x F for dynamic / linear, the declared
    max_position_embeddings for yarn / llama3 (which carry N separately), N without scaling."""
    if rope_type in ("dynamic", "linear") and factor and factor > 1:
        return round(native * factor)
    if rope_type in ("yarn", "llama3"):
        return max(max_pos, native)
    return native


def _check_dict(settings: Any, source: str, where: str) -> dict | None:
    if settings is not None and not isinstance(settings, dict):
        raise BadConfig(source, f"{where} must be an object or null, found {shown(settings)}")
    if settings is not None:
        kinds = _per_attention_kinds(settings)
        if kinds:
            raise PerAttentionRope(source, where, kinds)
        optional_number(settings, "rope_theta", source, f"{where}.")
    return settings


def read_rope(config: dict, source: str = "config.json") -> RopeState:
    """Read the RoPE state of ``config`` (raises BadConfig when a needed fact is missing or has
    the wrong type or range, naming the file, the field and the value)."""
    check_config(config, source)
    path = text_section_path(config)
    section = _get_section(config, path)
    where = "".join(f"{p}." for p in path)
    key, mirror = _read_key(section)
    settings = _check_dict(section.get(key), source, f"{where}{key}")
    if mirror is not None:
        _check_dict(section.get(mirror), source, f"{where}{mirror}")
    optional_number(section, "rope_theta", source, where)
    rope_type = _scaling_type(settings, source, f"{where}{key}.")
    max_pos = config_int(section, "max_position_embeddings", source, where)
    factor = None
    if rope_type is not None:
        factor = optional_number(settings, "factor", source, f"{where}{key}.")
    native = max_pos
    if rope_type in ("yarn", "llama3") and settings.get("original_max_position_embeddings") is not None:
        native = config_int(settings, "original_max_position_embeddings", source, f"{where}{key}.")
    others = tuple(k for k in NESTED_TEXT_KEYS if path and k != path[0] and isinstance(config.get(k), dict))
    return RopeState(
        section=path,
        key=key,
        settings=copy.deepcopy(settings),
        rope_type=rope_type,
        factor=factor,
        max_position_embeddings=max_pos,
        native_context=native,
        served_context=served_context(rope_type, factor, max_pos, native),
        mirror=mirror,
        others=others,
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
    # ``--context`` the config already covers (``rules/context.py``): write no scaling, set the session only
    keep: bool = False
    # the longest session a published recipe serves with this scaling (``rules/context.py``): a dynamic
    # session up to it is the makers' own setting, not an extrapolation launch warns about
    published_session: int | None = None


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
    settings: dict | None  # the RoPE dict as written (None: the config has none, and launch wrote none)
    max_position_embeddings: int  # as written
    changes: tuple[Change, ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    before: RopeState | None = None
    reader: ConfigClass = field(default_factory=lambda: ConfigClass("unknown"))  # the RoPE section's class
    outer: ConfigClass | None = None  # the whole config's own class, when the section is nested in it

    @property
    def unchanged(self) -> bool:
        return not self.changes

    @property
    def remote_class(self) -> ConfigClass | None:
        """The first class of the checkpoint's code AutoConfig runs on the overlay (the whole config's, then the
        RoPE section's): without trust_remote_code, lmdeploy reads the overlay through its generic fallback."""
        return next((c for c in (self.outer, self.reader) if c is not None and c.remote), None)


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
        if key not in config or differs(value, config[key]):
            changes.append(Change((key,), config.get(key), value, added=key not in config))
    if "rope_theta" not in config and "rope_parameters" not in config:
        rotary = config.get("rotary") if isinstance(config.get("rotary"), dict) else {}
        theta = optional_number(rotary, "base", source, "rotary.", high=ROPE_THETA.high) or 10000.0
        changes.append(Change(("rope_theta",), None, theta, added=True))
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and any(k in auto_map for k in _REMOTE_MODEL_CLASSES):
        kept = {k: v for k, v in auto_map.items() if k not in _REMOTE_MODEL_CLASSES}
        if kept:
            changes.append(Change(("auto_map",), auto_map, kept))
        else:
            changes.append(Change(("auto_map",), auto_map, None, removed=True))
    return changes


def _reader_of(config: dict, before: RopeState, v1: list[Change]) -> ConfigClass:
    """The class that will read the patched section (InternLM v1 is rewritten to transformers' Llama)."""
    if v1:
        return config_class({"model_type": "llama"})
    return config_class(_get_section(config, before.section), before.settings)


def _new_settings(before: RopeState, reader: ConfigClass, rope_type: str, factor: float) -> tuple[dict, int]:
    """The RoPE dict to write and the max_position_embeddings to write with it."""
    native = before.native_context
    old = before.settings or {}
    if before.rope_type == rope_type:
        settings = dict(old)  # same type: keep its extra keys (beta_fast, attention_factor, ...)
    else:
        settings = {k: old[k] for k in _KEPT_KEYS if k in old}
    settings["factor"] = float(factor)
    if rope_type in ("dynamic", "linear"):
        settings.pop("original_max_position_embeddings", None)
        for stale in ("low_freq_factor", "high_freq_factor"):
            settings.pop(stale, None)
        return shaped(settings, reader, rope_type), native
    settings["original_max_position_embeddings"] = native
    if rope_type == "llama3":
        settings.setdefault("low_freq_factor", LLAMA3_LOW_FREQ)
        settings.setdefault("high_freq_factor", LLAMA3_HIGH_FREQ)
    return shaped(settings, reader, rope_type), round(native * factor)


def _already_right(before: RopeState, reader: ConfigClass, rope_type: str, factor: float) -> bool:
    """The config already carries this scaling in a shape its class and lmdeploy read correctly."""
    if before.rope_type != rope_type or before.factor != factor or before.mirror is not None:
        return False
    old = before.settings or {}
    if not in_shape(old, reader) or not isinstance(old.get("factor"), float):
        return False
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


def _yarn_factor(native: int, factor: float) -> tuple[float, str | None]:
    """yarn's factor as TurboMind will read it (max_position_embeddings / N, both whole)."""
    max_pos = round(native * factor)
    read = max_pos / native
    if read <= 1.0:
        raise YarnFactorRoundsAway(factor, native)
    if read == factor:
        return factor, None
    return read, (f"yarn x{factor:g} over {native:,} tokens is written as x{read!r} ({max_pos:,} / {native:,}): "
                  "TurboMind reads the factor as max_position_embeddings / N, so every engine reads that")


def _text_sections_note(before: RopeState) -> str | None:
    if not before.others:
        return None
    return (f"the config has {', '.join(before.others)} beside {before.section[0]}: lmdeploy's readers take "
            f"{before.section[0]}, so launch patches it and leaves {', '.join(before.others)} as shipped")


def decide(config: dict, request: RopeRequest, source: str = "config.json") -> RopeDecision:
    """Everything the patch will write for ``request`` on ``config``, or a refusal."""
    before = read_rope(config, source)
    if before.rope_type is not None and before.rope_type not in WRITABLE_TYPES:
        raise ExistingScalingUnsupported(before.rope_type)

    if request.keep:
        return _kept(config, before, request, source)
    rope_type = request.rope_type or before.rope_type or "dynamic"
    if rope_type not in WRITABLE_TYPES:
        raise UnknownRopeType(rope_type, WRITABLE_TYPES)
    engine_types = ENGINE_TYPES.get(request.engine)
    if engine_types is None:
        raise BadOption("--backend", request.engine, f"choose one of {', '.join(ENGINE_TYPES)}")
    if rope_type not in engine_types:
        raise UnsupportedRopeType(rope_type, request.engine, engine_types)

    factor = request.factor  # typed and checked where it entered (a flag, a preset)
    if factor is None:
        if before.factor is None:
            raise MissingFactor(source)
        factor = parse_factor(before.factor)  # the config's own
    if before.native_context * factor > INT32_MAX:
        raise ContextTooLong(source, before.native_context, factor, INT32_MAX)

    warnings: list[str] = []
    changes = _v1_changes(config, source)
    reader = _reader_of(config, before, changes)
    check_type(reader, rope_type)
    rule = dict_rule(reader, before.key)
    if rope_type == "yarn":
        factor, note = _yarn_factor(before.native_context, factor)
        if note:
            warnings.append(note)
    if before.rope_type is not None and before.rope_type != rope_type:
        if not request.force:
            raise ReplacesScaling(before.rope_type, before.factor, rope_type)
        had = f" x{before.factor:g}" if before.factor is not None else ""
        warnings.append(f"replacing the config's {before.rope_type}{had} scaling with {rope_type} (--force)")
    note = _text_sections_note(before)
    if note:
        warnings.append(note)

    if _already_right(before, rule, rope_type, factor):
        settings, max_pos = dict(before.settings or {}), before.max_position_embeddings
    else:
        settings, max_pos = _new_settings(before, rule, rope_type, factor)
    check_keys(rule, settings, source, ".".join(before.section + (before.key,)))
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

    section = _get_section(config, before.section)
    settings = _with_mirrored_base(section, before, rule, settings)
    changes.extend(_dict_changes(section, before, settings))
    if differs(max_pos, section.get("max_position_embeddings")):  # 4096.0 as shipped is written 4096
        changes.append(Change(before.section + ("max_position_embeddings",), section.get("max_position_embeddings"),
                              max_pos))

    outer = outer_class(config, before.section)
    if changes:
        warnings.extend(unknown_rule_note(c, reader, rope_type, factor) for c in (outer, reader) if c and not c.known)
    session_len = _session_len(request, before, rope_type, factor, covered, warnings)
    return RopeDecision(
        native_context=before.native_context,
        factor=factor,
        rope_type=rope_type,
        session_len=session_len,
        covered_context=covered,
        section=before.section,
        key=before.key,
        settings=settings,
        max_position_embeddings=max_pos,
        changes=tuple(changes),
        warnings=tuple(warnings),
        before=before,
        reader=reader,
        outer=outer,
    )


def _kept(config: dict, before: RopeState, request: RopeRequest, source: str) -> RopeDecision:
    """The config's scaling as it ships (none, or one that covers the context asked for), with the session
    asked for: nothing of the RoPE dict is written (InternLM v1 is still rewritten to Llama)."""
    rope_type = before.rope_type or "default"
    engine_types = ENGINE_TYPES.get(request.engine)
    if engine_types is None:
        raise BadOption("--backend", request.engine, f"choose one of {', '.join(ENGINE_TYPES)}")
    if rope_type not in engine_types:
        raise UnsupportedRopeType(rope_type, request.engine, engine_types)
    factor = parse_factor(before.factor) if before.factor is not None and rope_type != "default" else 1.0
    changes = _v1_changes(config, source)
    session_len = request.session_len if request.session_len is not None else before.served_context
    return RopeDecision(
        native_context=before.native_context,
        factor=factor,
        rope_type=rope_type,
        session_len=session_len,
        covered_context=before.served_context,
        section=before.section,
        key=before.key,
        settings=copy.deepcopy(before.settings),  # None when the config has no scaling
        max_position_embeddings=before.max_position_embeddings,
        changes=tuple(changes),
        before=before,
        reader=_reader_of(config, before, changes),
        outer=outer_class(config, before.section),
    )


def _with_mirrored_base(section: dict, before: RopeState, rule: ConfigClass, settings: dict) -> dict:
    """``settings`` with the base of the other dict when that is the only one the config has: transformers
    would fill in 10000 for the dict it reads (a class that allows no other keys reads its own base)."""
    if before.mirror is None or rule.only is not None or "rope_theta" in settings or "rope_theta" in section:
        return settings
    theta = (section.get(before.mirror) or {}).get("rope_theta")
    return settings if theta is None else {**settings, "rope_theta": theta}


def differs(new: Any, old: Any) -> bool:
    """Whether ``new`` would be written differently from ``old``, as JSON writes them: ``2.0`` is not ``2``
    and ``true`` is not ``1`` (Python's ``==`` says they are; InternLM2's class takes only a float factor).
    Key order is not a difference."""
    return json.dumps(new, sort_keys=True) != json.dumps(old, sort_keys=True)


def _dict_changes(section: dict, before: RopeState, settings: dict) -> list[Change]:
    """The RoPE dict read (and the other key, kept consistent with it) as changes."""
    path = before.section
    changes: list[Change] = []
    if differs(settings, before.settings):
        changes.append(Change(path + (before.key,), before.settings, settings, added=before.key not in section))
    if before.mirror is not None:
        old = section.get(before.mirror)
        kept = {k: v for k, v in (old or {}).items() if k in _KEPT_KEYS}
        mirrored = {"rope_type": settings.get("rope_type") or settings.get("type"),
                    **{k: v for k, v in settings.items() if k not in _TYPE_KEYS}, **kept}
        if differs(mirrored, old):
            changes.append(Change(path + (before.mirror,), old, mirrored))
    return changes


def _session_len(request: RopeRequest, before: RopeState, rope_type: str, factor: float, covered: int,
                 warnings: list[str]) -> int:
    if request.session_len is None:
        return covered
    session_len = request.session_len
    if isinstance(session_len, bool) or not isinstance(session_len, int) or not 0 < session_len <= INT32_MAX:
        raise BadOption("--session-len", str(request.session_len),
                        f"must be a whole number of tokens from 1 to {INT32_MAX:,} (lmdeploy's limit)")
    if session_len > covered:
        if rope_type == "dynamic":
            if request.published_session is None or session_len > request.published_session:
                warnings.append(
                    f"session_len {session_len:,} is past the {covered:,} tokens of dynamic x{factor:g} (N x F), and "
                    "no published recipe serves this model there: dynamic NTK keeps extrapolating, untested by "
                    "launch; measure it with `launch probe`"
                )
        elif request.force:
            warnings.append(f"session_len {session_len} is past what {rope_type} x{factor:g} covers (--force)")
        else:
            raise SessionBeyondScaling(session_len, covered, rope_type)
    if session_len <= before.native_context:
        warnings.append(
            f"session_len {session_len:,} is within the native {before.native_context:,}: "
            "the scaling changes nothing for it"
        )
    return session_len


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
