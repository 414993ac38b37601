"""Who reads a model's config, and the RoPE shape each reader takes (the rules are written out, with their
sources, in ``launcher/rules/rope.py``'s docstring).

lmdeploy loads a config through transformers' ``AutoConfig``: the model's own config class, which for
InternLM2, InternLM3 and InternVL ships with the checkpoint as ``configuration_*.py`` (named by
``auto_map``), and otherwise is transformers' own. ``config_class`` names that class for a config section
and what it accepts in ``rope_scaling``; ``rope.decide`` writes exactly that. Pure: no files, no imports of
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
    at all."""

    config_class: str
    rope_type: str
    types: tuple[str, ...]
    known: bool = True
    exit_code = 2

    def message(self) -> str:
        if self.known:
            return (f"{self.config_class} (the model's own config class) cannot hold {self.rope_type!r} RoPE "
                    f"scaling, it takes {', '.join(self.types)}: lmdeploy would read such a config only through "
                    f"its generic fallback and transformers not at all. Use --type {self.types[0]}")
        return (f"{self.config_class} (the model's own config class) is not one launch knows; launch writes only "
                f"{', '.join(self.types)} for it. Use --type {self.types[0]}, or add --force to write "
                f"{self.rope_type!r} and check that the model still loads")


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
                "known": self.known}


# The config classes that come with checkpoints, by model_type, and the architecture that names them.
_INTERNLM2 = ConfigClass("InternLM2Config", "configuration_internlm2.py", types=("dynamic", "linear"),
                         type_keys=("type",), only=("type", "factor"))
_INTERNLM3 = ConfigClass("InternLM3Config", "configuration_internlm3.py", type_keys=("rope_type",))
REMOTE_CLASSES: dict[str, ConfigClass] = {"internlm2": _INTERNLM2, "internlm3": _INTERNLM3}
_REMOTE_ARCHS = {"InternLM2ForCausalLM": "internlm2", "InternLM3ForCausalLM": "internlm3"}
# transformers' own config class names, for the plan (any other model_type is named by it).
_NATIVE_NAMES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig",
                 "qwen2_vl": "Qwen2VLConfig", "qwen2_vl_text": "Qwen2VLTextConfig",
                 "qwen2_5_vl": "Qwen2_5_VLConfig", "qwen2_5_vl_text": "Qwen2_5_VLTextConfig", "qwen3": "Qwen3Config",
                 "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig"}


def _shipped_type_keys(settings: dict | None) -> tuple[str, ...]:
    keys = tuple(k for k in _TYPE_KEYS if isinstance(settings, dict) and k in settings)
    return keys or ("type",)


def config_class(section: dict, settings: dict | None = None) -> ConfigClass:
    """The class that reads ``section`` (a config, or its language model's part): a known class of the
    checkpoint's code by ``model_type`` or architecture, an unknown one named by ``auto_map``, else
    transformers' own."""
    model_type = section.get("model_type")
    archs = section.get("architectures") or []
    family = model_type if model_type in REMOTE_CLASSES else _REMOTE_ARCHS.get(archs[0] if archs else None)
    if family is not None:
        return REMOTE_CLASSES[family]
    auto_map = section.get("auto_map")
    remote = auto_map.get("AutoConfig") if isinstance(auto_map, dict) else None
    if isinstance(remote, str) and remote:
        module, _, name = remote.rpartition("--")[2].rpartition(".")
        return ConfigClass(name or remote, f"{module or name}.py", types=("dynamic", "linear"),
                           type_keys=_shipped_type_keys(settings), known=False)
    return ConfigClass(_NATIVE_NAMES.get(model_type, f"the config class of model_type {model_type!r}"))


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


def check_type(reader: ConfigClass, rope_type: str, force: bool, warnings: list[str]) -> None:
    """Refuse a type the config class cannot hold (a known class: ``--force`` or not)."""
    if rope_type in reader.types:
        return
    if reader.known or not force:
        raise ConfigClassRefusesType(reader.name, rope_type, reader.types, reader.known)
    warnings.append(f"writing {rope_type} for {reader.name}, whose rule launch does not know (--force)")


def check_keys(reader: ConfigClass, settings: dict, source: str, where: str) -> None:
    """A class that takes only some keys gets only those (a key it refuses was in the shipped dict)."""
    extra = tuple(k for k in settings if reader.only is not None and k not in reader.only)
    if extra:
        raise ConfigClassRefusesKeys(source, where, reader.name, extra, reader.only or ())
