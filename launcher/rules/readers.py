"""Who reads a model's config, and the RoPE shape each reader takes (the rules are written out, with their
sources, in ``launcher/rules/rope.py``'s docstring).

lmdeploy loads a config through transformers' ``AutoConfig``: the model's own config class, which for
InternLM2, InternLM3, InternVL and Phi-3 ships with the checkpoint as ``configuration_*.py`` (named by
``auto_map``), and otherwise is transformers' own. ``config_class`` names that class for a config section
and what it accepts in ``rope_scaling``; ``rope.decide`` writes exactly that, or refuses (``check_type``):
a known class's rule (InternLM2: dynamic, linear; Phi-3: none of launch's types, it holds longrope only),
``--force`` or not; a class launch has not read gets dynamic or linear with a warning
(``unknown_rule_note``), never yarn or llama3. ``outer_class`` names the whole config's own class when the
RoPE settings are nested in it (InternVL), which AutoConfig runs first. Pure: no files, no imports of
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.errors import LaunchError

# Types launch knows how to write (the one list: presets, flags and the contract test import it).
WRITABLE_TYPES: tuple[str, ...] = ("dynamic", "linear", "yarn", "llama3")
_TYPE_KEYS = ("type", "rope_type")


class ConfigClassRefusesType(LaunchError):
    """The model's own config class cannot hold this RoPE type (or, for a class launch has not read,
    may not): lmdeploy would load such an overlay only through its generic fallback, transformers not
    at all. ``--force`` does not change that."""

    config_class: str
    rope_type: str
    types: tuple[str, ...]
    known: bool = True
    code: str | None = None
    holds: str | None = None  # what the class holds, when it is none of the types launch writes
    exit_code = 2

    def message(self) -> str:
        where = f", {self.code}" if self.code else ""
        if self.holds is not None:
            return (f"{self.config_class} (the model's own config class{where}) holds only {self.holds}, "
                    f"none of the types launch writes ({', '.join(WRITABLE_TYPES)}), --force or not: "
                    "lmdeploy would read such a config only through its generic fallback, if at all, and "
                    "transformers not at all. Serve the checkpoint as it ships")
        if self.known:
            return (f"{self.config_class} (the model's own config class) cannot hold {self.rope_type!r} RoPE "
                    f"scaling, it takes {', '.join(self.types)}: lmdeploy would read such a config only through "
                    f"its generic fallback and transformers not at all. Use --type {self.types[0]}")
        return (f"{self.config_class} (the model's own config class{where}) is not one launch knows, so launch "
                f"writes only {', '.join(self.types)} for it, --force or not: if that class refuses {self.rope_type}, "
                f"lmdeploy's generic fallback cannot read a {self.rope_type} config either (get_model_arch fails: "
                f"the generic config has no max_position_embeddings). Use --type {self.types[0]}")


class ConfigClassRefusesKeys(LaunchError):
    """The config's RoPE dict holds keys the model's own class does not accept next to the scaling."""

    source: str
    key: str
    config_class: str
    extra: tuple[str, ...]
    allowed: tuple[str, ...]
    exit_code = 2
    message = (
        "{source}: {key} holds {extra_list}, but {config_class} accepts only {allowed_list} there. "
        "Fix the config (the model's own code would refuse it too), or pick a checkpoint with a valid one."
    )


@dataclass(frozen=True)
class ConfigClass:
    """The class that turns a config section into the object both engines read, and the RoPE shape it
    accepts: the types it can hold, the key(s) naming the type, and (when it allows no others) the only
    keys the dict may have."""

    name: str
    code: str | None = None  # the checkpoint's own file, for a class that comes with the checkpoint
    types: tuple[str, ...] = WRITABLE_TYPES
    type_keys: tuple[str, ...] = _TYPE_KEYS
    only: tuple[str, ...] | None = None
    known: bool = True  # False: a class of the checkpoint's code whose rule launch has not read
    holds: str | None = None  # what it holds when that is none of WRITABLE_TYPES (``types`` is then empty)

    @property
    def remote(self) -> bool:
        return self.code is not None

    def describe(self) -> str:
        if not self.remote:
            return f"{self.name} (transformers' own)"
        rule = "" if self.known else "; its rule is not one launch knows"
        return f"{self.name} (the model's own code, {self.code}{rule})"

    def as_dict(self) -> dict:
        return {"class": self.name, "remote_code": self.code, "types": list(self.types),
                "type_keys": list(self.type_keys), "only_keys": list(self.only) if self.only else None,
                "known": self.known, "holds": self.holds}


# The config classes that come with checkpoints, by model_type, and the architecture that names them.
_INTERNLM2 = ConfigClass("InternLM2Config", "configuration_internlm2.py", types=("dynamic", "linear"),
                         type_keys=("type",), only=("type", "factor"))
_INTERNLM3 = ConfigClass("InternLM3Config", "configuration_internlm3.py", type_keys=("rope_type",))
REMOTE_CLASSES: dict[str, ConfigClass] = {"internlm2": _INTERNLM2, "internlm3": _INTERNLM3}
_REMOTE_ARCHS = {"InternLM2ForCausalLM": "internlm2", "InternLM3ForCausalLM": "internlm3"}
# Phi-3's class holds only its own LongRoPE: ``{"type": "longrope", "short_factor": [...], "long_factor": [...]}``,
# exactly these three keys (``su`` and ``yarn`` are renamed ``longrope`` first), in the checkpoint's
# configuration_phi3.py and in transformers' own Phi3Config alike. Named by the module auto_map names.
_PHI3_HOLDS = 'longrope scaling ({"type": "longrope", "short_factor": [...], "long_factor": [...]})'
_REMOTE_MODULES = {"configuration_phi3": ConfigClass("Phi3Config", "configuration_phi3.py", types=(),
                                                     type_keys=("type",), only=("type", "short_factor", "long_factor"),
                                                     holds=_PHI3_HOLDS)}
_NATIVE_RULES = {"phi3": ConfigClass("Phi3Config", types=(), type_keys=("rope_type",), holds=_PHI3_HOLDS)}
# Classes of the checkpoint's code that hold a multimodal config and build its language model's section with
# the class that section names (InternVL's: InternLM2Config, Qwen2Config, LlamaConfig or Phi3Config by its
# architecture); they run first, so trust_remote_code is needed for them too.
_KNOWN_OUTER = {"configuration_internvl_chat": "InternVLChatConfig"}
# transformers' own config class names, for the plan (any other model_type is named by it).
_NATIVE_NAMES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig",
                 "qwen2_vl": "Qwen2VLConfig", "qwen2_vl_text": "Qwen2VLTextConfig",
                 "qwen2_5_vl": "Qwen2_5_VLConfig", "qwen2_5_vl_text": "Qwen2_5_VLTextConfig", "qwen3": "Qwen3Config",
                 "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig"}


def _shipped_type_keys(settings: dict | None) -> tuple[str, ...]:
    keys = tuple(k for k in _TYPE_KEYS if isinstance(settings, dict) and k in settings)
    return keys or ("type",)


def _named(auto_map) -> tuple[str, str] | None:
    """(class, module) of the AutoConfig an ``auto_map`` names (``repo--module.Class`` or ``module.Class``)."""
    remote = auto_map.get("AutoConfig") if isinstance(auto_map, dict) else None
    if not isinstance(remote, str) or not remote:
        return None
    module, _, name = remote.rpartition("--")[2].rpartition(".")
    return name or remote, module or name


def config_class(section: dict, settings: dict | None = None) -> ConfigClass:
    """The class that reads ``section`` (a config, or its language model's part): a known class of the
    checkpoint's code by ``model_type``, architecture or the module ``auto_map`` names, an unknown one named
    by ``auto_map``, else transformers' own."""
    model_type = section.get("model_type")
    archs = section.get("architectures") or []
    family = model_type if model_type in REMOTE_CLASSES else _REMOTE_ARCHS.get(archs[0] if archs else None)
    if family is not None:
        return REMOTE_CLASSES[family]
    named = _named(section.get("auto_map"))
    if named is not None:
        name, module = named
        if module in _REMOTE_MODULES:
            return _REMOTE_MODULES[module]
        return ConfigClass(name, f"{module}.py", types=("dynamic", "linear"),
                           type_keys=_shipped_type_keys(settings), known=False)
    if model_type in _NATIVE_RULES:
        return _NATIVE_RULES[model_type]
    return ConfigClass(_NATIVE_NAMES.get(model_type, f"the config class of model_type {model_type!r}"))


def outer_class(config: dict, path: tuple[str, ...]) -> ConfigClass | None:
    """The whole config's own class when the RoPE settings are in a nested section (``path``) and the
    config names the checkpoint's code for itself (``auto_map`` at the top: InternVL's InternVLChatConfig).
    AutoConfig runs it first, and it builds the section with the section's class."""
    named = _named(config.get("auto_map")) if path else None
    if named is None:
        return None
    name, module = named
    return ConfigClass(name, f"{module}.py", types=(), known=_KNOWN_OUTER.get(module) == name)


def dict_rule(reader: ConfigClass, key: str) -> ConfigClass:
    """The shape rule for the dict under ``key``: a class's own rule covers ``rope_scaling``, the argument
    it validates; ``rope_parameters`` is transformers 5's structure, read by its own code (both type keys,
    other keys allowed)."""
    if key == "rope_scaling":
        return reader
    return ConfigClass(reader.name, reader.code, reader.types, known=reader.known)


def shaped(settings: dict, reader: ConfigClass, rope_type: str) -> dict:
    """``settings`` with the type named the way ``reader`` reads it, in the key order of its examples."""
    out = {k: rope_type for k in reader.type_keys}
    out.update((k, v) for k, v in settings.items() if k not in _TYPE_KEYS)
    return out


def in_shape(settings: dict | None, reader: ConfigClass) -> bool:
    """Whether ``reader`` takes ``settings`` as they are: a class that allows other keys reads either type
    key (transformers' own convert one into the other); one that does not needs exactly its own."""
    if not settings or not any(k in settings for k in _TYPE_KEYS):
        return False
    if reader.only is None:
        return True
    present = tuple(k for k in _TYPE_KEYS if k in settings)
    return present == tuple(k for k in _TYPE_KEYS if k in reader.type_keys) and set(settings) <= set(reader.only)


def check_type(reader: ConfigClass, rope_type: str) -> None:
    """Refuse a type the config class cannot hold, ``--force`` or not: a known class's rule; for a class launch
    has not read, anything but dynamic and linear (lmdeploy's fallback cannot read yarn or llama3 either)."""
    if rope_type not in reader.types:
        raise ConfigClassRefusesType(reader.name, rope_type, reader.types, reader.known, reader.code, reader.holds)


def unknown_rule_note(cls: ConfigClass, reader: ConfigClass, rope_type: str, factor: float) -> str:
    """The warning for writing into a config that a class launch has not read will load (``cls``: the RoPE
    section's ``reader``, or the whole config's class)."""
    what = (f"{rope_type} x{factor:g} is written in the key style the checkpoint ships" if cls is reader
            else f"it loads the whole config, {reader.name} the section written")
    return (f"launch does not know the RoPE rule of {cls.name} ({cls.code}, the model's own code): {what}; with "
            "--trust-remote-code, launch serve reads the overlay with that class before loading any weight and "
            "stops if it refuses it")


def check_keys(reader: ConfigClass, settings: dict, source: str, where: str) -> None:
    """A class that takes only some keys gets only those (a key it refuses was in the shipped dict)."""
    extra = tuple(k for k in settings if reader.only is not None and k not in reader.only)
    if extra:
        raise ConfigClassRefusesKeys(source, where, reader.name, extra, reader.only or ())
