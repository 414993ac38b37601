"""Model presets: one YAML file per model, validated by a schema that rejects unknown keys.

Built-in presets live in ``configs/``; users add their own in ``$LAUNCH_PRESETS_DIR`` (default
``~/.config/launch/presets``). A user preset with the name of a built-in one replaces it. A preset's
file name (without ``.yaml``) is its name.

A preset carries the facts of the checkpoint's ``config.json`` that ``plan`` needs (architecture,
shapes, RoPE as shipped), so that ``launch plan PRESET`` works offline and before any download.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidPreset, UnknownPreset
from .paths import builtin_presets_dir, user_presets_dirs

SUFFIXES = (".yaml", ".yml")
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RopeDefaults(_Strict):
    type: Literal["dynamic", "linear", "yarn", "llama3"]
    factor: float = Field(description="default context multiplier (> 1)")

    @field_validator("factor")
    @classmethod
    def _factor(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 1:
            raise ValueError("must be a finite number greater than 1")
        return value


class ShippedConfig(_Strict):
    """The facts of the checkpoint's config.json, with config.json's own key names."""

    architectures: list[str]
    model_type: str | None = None
    max_position_embeddings: int = Field(gt=0)
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    num_hidden_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    head_dim: int | None = Field(default=None, gt=0)
    torch_dtype: Literal["float16", "bfloat16", "float32"]
    vocab_size: int | None = Field(default=None, gt=0)
    bias: bool | None = None  # InternLM v1: biases on the attention projections
    attention_bias: bool | None = None
    sliding_window: int | None = None

    def as_config(self) -> dict:
        """A config.json-shaped dict (keys that are None are left out, except rope_scaling)."""
        data = self.model_dump()
        rope_scaling = data.pop("rope_scaling")
        config = {k: v for k, v in data.items() if v is not None}
        if "rope_parameters" not in config:
            config["rope_scaling"] = rope_scaling
        return config


class EngineDefaults(_Strict):
    backend: Literal["turbomind", "pytorch"] = "turbomind"
    tp: int = Field(default=1, ge=1)
    max_batch_size: int = Field(default=64, ge=1)
    cache_max_entry_count: float = Field(default=0.8, gt=0, lt=1)
    quant_policy: Literal[0, 4, 8] = 0


class ChatTemplate(_Strict):
    """Fields of lmdeploy's ChatTemplateConfig, for models current lmdeploy has no template for."""

    model_name: str
    system: str | None = None
    meta_instruction: str | None = None
    eosys: str | None = None
    user: str | None = None
    eoh: str | None = None
    assistant: str | None = None
    eoa: str | None = None
    separator: str | None = None
    stop_words: list[str] | None = None


class Preset(_Strict):
    name: str
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    revision: str | None = None
    description: str = ""
    trust_remote_code: bool = False
    native_context: int = Field(gt=0)
    rope: RopeDefaults
    parameters: float = Field(gt=0, description="parameter count, for the weight-size estimate")
    config: ShippedConfig
    engine: EngineDefaults = EngineDefaults()
    chat_template: ChatTemplate | None = None
    notes: list[str] = []

    def stub_config(self) -> dict:
        return self.config.as_config()


@dataclass(frozen=True)
class PresetFile:
    name: str
    path: Path
    builtin: bool


def _files_in(directory: Path, builtin: bool) -> dict[str, PresetFile]:
    found: dict[str, PresetFile] = {}
    if not directory.is_dir():
        return found
    for path in sorted(directory.iterdir()):
        if path.suffix in SUFFIXES and path.is_file():
            found.setdefault(path.stem, PresetFile(path.stem, path, builtin))
    return found


def preset_files() -> dict[str, PresetFile]:
    """All preset names -> their file. User directories override the built-in ones, the first
    user directory wins over later ones."""
    files = _files_in(builtin_presets_dir(), builtin=True)
    for directory in reversed(user_presets_dirs()):
        files.update(_files_in(directory, builtin=False))
    return dict(sorted(files.items()))


def _field_of(error: dict) -> str:
    return ".".join(str(part) for part in error.get("loc", ())) or "(file)"


@lru_cache(maxsize=64)
def _load(path: Path, mtime_ns: int) -> Preset:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidPreset(str(path), "(file)", f"cannot read it: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InvalidPreset(str(path), "(file)", f"not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise InvalidPreset(str(path), "(file)", "must be a mapping of fields")
    if data.get("name", path.stem) != path.stem:
        raise InvalidPreset(str(path), "name", f"{data.get('name')!r} must match the file name {path.stem!r}")
    data.setdefault("name", path.stem)
    try:
        preset = Preset.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        # A misspelt key usually also shows up as a missing one: name the misspelling first.
        first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
        problem = first.get("msg", "invalid")
        if first.get("type") == "extra_forbidden":
            problem = "unknown field (check its spelling; `launch presets show NAME` shows a valid preset)"
        if len(errors) > 1:
            problem += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        raise InvalidPreset(str(path), _field_of(first), problem) from None
    _check_consistent(preset, path)
    return preset


def _check_consistent(preset: Preset, path: Path) -> None:
    """The preset's own numbers must agree with what the RoPE rules read from its config facts."""
    from .errors import BadConfig
    from .rope import read_rope

    try:
        state = read_rope(preset.stub_config(), f"preset {preset.name}")
    except BadConfig as err:
        raise InvalidPreset(str(path), "config", err.problem) from None
    if state.native_context != preset.native_context:
        raise InvalidPreset(
            str(path),
            "native_context",
            f"{preset.native_context} disagrees with the config facts, which give {state.native_context}",
        )


def load_preset_file(path: Path) -> Preset:
    path = Path(path)
    return _load(path, path.stat().st_mtime_ns)


def suggestions(name: str, names: list[str] | None = None) -> tuple[str, ...]:
    names = names if names is not None else list(preset_files())
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [n for n in names if lowered in n.lower() or n.lower() in lowered][:3]
    return tuple(close)


def find_preset(name: str) -> Preset | None:
    entry = preset_files().get(name)
    return load_preset_file(entry.path) if entry else None


def get_preset(name: str) -> Preset:
    """The preset called ``name``, or UnknownPreset with the closest names."""
    preset = find_preset(name)
    if preset is None:
        raise UnknownPreset(name, suggestions(name))
    return preset


def all_presets() -> list[tuple[PresetFile, Preset]]:
    """Every preset, validated (an invalid file raises InvalidPreset naming it)."""
    return [(entry, load_preset_file(entry.path)) for entry in preset_files().values()]
