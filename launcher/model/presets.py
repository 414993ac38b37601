"""Model presets: one YAML file per model, validated by a schema that rejects unknown keys.

Built-in presets live in ``configs/``; users add their own in ``$LAUNCH_PRESETS_DIR`` (default
``~/.config/launch/presets``). A user preset with the name of a built-in one replaces it. A preset's
file name (without ``.yaml``) is its name.

A preset carries the facts of the checkpoint's ``config.json`` that ``plan`` needs (architecture,
shapes, RoPE as shipped), so that ``launch plan PRESET`` works offline and before any download.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from launcher.engine.spec import BACKENDS, EngineSettings
from launcher.errors import LaunchError
from launcher.rules import checks, limits
from launcher.rules.checks import BadOption
from launcher.rules.kvcache import QUANT_POLICIES
from launcher.rules.rope import WRITABLE_TYPES
from launcher.runtime.paths import builtin_presets_dir, is_repo_id, user_presets_dirs


class UnknownPreset(LaunchError):
    name: str
    suggestions: tuple[str, ...] = ()

    def message(self) -> str:
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        return (
            f"no preset or model directory named {self.name!r}.{hint} "
            "`launch presets` lists the presets; a path to a local model directory also works."
        )


class InvalidPreset(LaunchError):
    path: str
    field_name: str
    problem: str
    message = "invalid preset {path}: field {field_name!r}: {problem}"


class DuplicatePreset(LaunchError):
    name: str
    first: str
    second: str
    message = "preset {name!r} is defined twice: {first} and {second}. Rename or remove one."


class PresetsDirNotADir(LaunchError):
    path: str
    message = (
        "LAUNCH_PRESETS_DIR names {path}, which is not a directory. Point it at directories of "
        "preset files (several separated by ':'), or unset it."
    )


SUFFIXES = (".yaml", ".yml")
# A preset is a page of YAML. Bounding its size and refusing aliases keeps a hostile file (an
# "alias bomb": a few lines that expand to billions of nodes) from growing memory.
MAX_PRESET_BYTES = 256 * 1024
MAX_PRESET_EVENTS = 20_000
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster

# --- the schema ----------------------------------------------------------------------------------
# Each section is a frozen dataclass; a field's ``metadata["check"]`` turns the YAML value into the
# field's value or raises ValueError saying what is wrong. Unknown keys are refused, naming them.
# Every number is read by its entry in the one table of limits (``launcher/rules/limits.py``), the entry
# its flag or its config.json field is read by: a preset can hold nothing ``--tp`` or a config could
# not. (Hand-written rather than pydantic: importing pydantic costs every `launch plan` ~0.15 s.)

Check = Callable[[Any], Any]


def _spec(check: Check, default: Any = dataclasses.MISSING) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be text, found {value!r}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, found {value!r}")
    return value


def _limited(limit: limits.Limit) -> Check:
    """A number by ``limit``. A decimal number may be YAML text: YAML 1.1 reads 7.3e9 (no exponent
    sign) as a string, so such text is read by the flags' grammar."""

    def check(value: Any) -> int | float:
        if isinstance(value, str) and not limit.whole:
            try:
                return limit.parse(value)
            except ValueError:
                pass
        return limit.check(value)

    return check


def _config_number(key: str) -> Check:
    """A config.json fact by the limit its key has in config.json (``limits.CONFIG_KEYS``)."""
    return _limited(limits.CONFIG_KEYS[key])


def _one_of(*choices: Any) -> Check:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or value not in choices or type(value) is not type(choices[0]):
            raise ValueError(f"must be one of {', '.join(map(str, choices))}, found {value!r}")
        return value

    return check


def _texts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of text, found {value!r}")
    return tuple(value)


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping, found {value!r}")
    return dict(value)


def _repo(value: Any) -> str:
    if not is_repo_id(value):
        raise ValueError(f"must be a Hugging Face repo id ORG/NAME, found {value!r}")
    return value


def _revision(value: Any) -> str:
    try:
        return checks.revision("revision", value)
    except BadOption:
        raise ValueError(f"must be a branch, tag or commit sha, found {value!r}") from None


def _section(cls: type) -> Check:
    def check(value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping of fields, found {value!r}")
        return _build(cls, value)

    return check


class _Invalid(Exception):
    def __init__(self, field_name: str, problem: str) -> None:
        self.field_name, self.problem = field_name, problem


def _build(cls: type, data: dict) -> Any:
    """An instance of the schema dataclass ``cls`` from a YAML mapping, or _Invalid naming the field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = ""
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise _Invalid(where + str(unknown[0]),
                       "unknown field (check its spelling; `launch presets show NAME` shows a valid preset)")
    values = {}
    for name, spec in fields.items():
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise _Invalid(where + name, "required field is missing")
            continue
        try:
            values[name] = spec.metadata["check"](data[name])
        except _Invalid as inner:
            raise _Invalid(f"{where}{name}.{inner.field_name}", inner.problem) from None
        except ValueError as err:
            raise _Invalid(where + name, str(err)) from None
    return cls(**values)


def _plain(section: Any) -> dict:
    """A schema section as plain data (JSON-ready): its set fields, tuples as lists."""
    return {f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(section) if (v := getattr(section, f.name)) is not None}


@dataclass(frozen=True)
class RopeDefaults:
    type: str = _spec(_one_of(*WRITABLE_TYPES))
    factor: float = _spec(_limited(limits.FACTOR))


@dataclass(frozen=True)
class ShippedConfig:
    """The facts of the checkpoint's config.json, with config.json's own key names."""

    architectures: tuple[str, ...] = _spec(_texts)
    max_position_embeddings: int = _spec(_config_number("max_position_embeddings"))
    num_hidden_layers: int = _spec(_config_number("num_hidden_layers"))
    hidden_size: int = _spec(_config_number("hidden_size"))
    num_attention_heads: int = _spec(_config_number("num_attention_heads"))
    torch_dtype: str = _spec(_one_of("float16", "bfloat16", "float32"))
    model_type: str | None = _spec(_optional(_text), None)
    rope_theta: float | None = _spec(_optional(_config_number("rope_theta")), None)
    rope_scaling: dict | None = _spec(_optional(_mapping), None)
    rope_parameters: dict | None = _spec(_optional(_mapping), None)
    num_key_value_heads: int | None = _spec(_optional(_config_number("num_key_value_heads")), None)
    head_dim: int | None = _spec(_optional(_config_number("head_dim")), None)
    vocab_size: int | None = _spec(_optional(_config_number("vocab_size")), None)
    bias: bool | None = _spec(_optional(_flag), None)  # InternLM v1: biases on the attention projections
    attention_bias: bool | None = _spec(_optional(_flag), None)
    sliding_window: int | None = _spec(_optional(_config_number("sliding_window")), None)

    def as_config(self) -> dict:
        """A config.json-shaped dict (keys that are None are left out, except rope_scaling)."""
        config = _plain(self)
        if self.rope_parameters is None:
            config.setdefault("rope_scaling", None)
        return config


@dataclass(frozen=True)
class EngineDefaults:
    """A preset's engine settings; the defaults are the engine's own (``engine.EngineSettings``)."""

    backend: str = _spec(_one_of(*BACKENDS), EngineSettings.backend)
    tp: int = _spec(_limited(limits.TP), EngineSettings.tp)
    max_batch_size: int = _spec(_limited(limits.MAX_BATCH_SIZE), EngineSettings.max_batch_size)
    cache_max_entry_count: float = _spec(_limited(limits.CACHE_MAX_ENTRY_COUNT), EngineSettings.cache_max_entry_count)
    quant_policy: int = _spec(_one_of(*QUANT_POLICIES), EngineSettings.quant_policy)


@dataclass(frozen=True)
class ChatTemplate:
    """Fields of lmdeploy's ChatTemplateConfig, for models current lmdeploy has no template for."""

    model_name: str = _spec(_text)
    system: str | None = _spec(_optional(_text), None)
    meta_instruction: str | None = _spec(_optional(_text), None)
    eosys: str | None = _spec(_optional(_text), None)
    user: str | None = _spec(_optional(_text), None)
    eoh: str | None = _spec(_optional(_text), None)
    assistant: str | None = _spec(_optional(_text), None)
    eoa: str | None = _spec(_optional(_text), None)
    separator: str | None = _spec(_optional(_text), None)
    stop_words: tuple[str, ...] | None = _spec(_optional(_texts), None)

    def as_dict(self) -> dict:
        """The set fields, as lmdeploy's ChatTemplateConfig takes them."""
        return _plain(self)


@dataclass(frozen=True)
class Preset:
    name: str = _spec(_text)
    repo: str = _spec(_repo)
    native_context: int = _spec(_limited(limits.CONTEXT))
    rope: RopeDefaults = _spec(_section(RopeDefaults))
    parameters: float = _spec(_limited(limits.PARAMETERS))  # parameter count, for the weight-size estimate
    config: ShippedConfig = _spec(_section(ShippedConfig))
    revision: str | None = _spec(_optional(_revision), None)
    description: str = _spec(_text, "")
    trust_remote_code: bool = _spec(_flag, False)
    engine: EngineDefaults = _spec(_section(EngineDefaults), EngineDefaults())
    chat_template: ChatTemplate | None = _spec(_optional(_section(ChatTemplate)), None)
    notes: tuple[str, ...] = _spec(_texts, ())

    def stub_config(self) -> dict:
        return self.config.as_config()


@dataclass(frozen=True)
class PresetFile:
    name: str
    path: Path
    builtin: bool


def _files_in(directory: Path, builtin: bool) -> dict[str, PresetFile]:
    """The preset files of one directory; ``x.yaml`` beside ``x.yml`` is an error naming both."""
    found: dict[str, PresetFile] = {}
    if not directory.is_dir():
        if not builtin and directory.exists():
            raise PresetsDirNotADir(str(directory))
        return found
    try:
        paths = sorted(directory.iterdir())
    except OSError:
        return found
    for path in paths:
        if path.suffix in SUFFIXES and path.is_file():
            if path.stem in found:
                raise DuplicatePreset(path.stem, str(found[path.stem].path), str(path))
            found[path.stem] = PresetFile(path.stem, path, builtin)
    return found


def preset_files() -> dict[str, PresetFile]:
    """All preset names -> their file. User directories override the built-in ones, the first
    user directory wins over later ones."""
    files = _files_in(builtin_presets_dir(), builtin=True)
    for directory in reversed(user_presets_dirs()):
        files.update(_files_in(directory, builtin=False))
    return dict(sorted(files.items()))


def _yaml_refusal(text: str) -> str | None:
    """Why ``text`` is not loaded at all (aliases, too many nodes), else None. Scans the parser's
    events, which never expands an alias."""
    if "*" not in text and "&" not in text and len(text) < MAX_PRESET_EVENTS:
        return None  # no alias possible, and fewer characters than the event limit
    for count, event in enumerate(yaml.parse(text, Loader=_YamlLoader)):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            return f"uses a YAML anchor or alias (line {mark.line + 1}); write the values out instead"
        if count > MAX_PRESET_EVENTS:
            return f"has more than {MAX_PRESET_EVENTS:,} YAML nodes; a preset is a short file"
    return None


def _duplicate_key(root: yaml.Node) -> tuple[str, int, int] | None:
    """The first key given twice in one mapping of the composed YAML: (its dotted path, first line,
    second line). YAML takes the last silently (a second ``repo:`` would switch the repository)."""
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, where) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                name = f"{where}{key.value}" if isinstance(key, yaml.ScalarNode) else where.rstrip(".")
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in seen:
                        return name, seen[(key.tag, key.value)], line
                    seen[(key.tag, key.value)] = line
                stack.append((value, f"{name}." if name else ""))
    return None


def _parse(text: str, path: Path) -> Any:
    """The YAML document of ``text``; a key given twice in one mapping is refused, naming it."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        twice = _duplicate_key(node)
        if twice:
            key, first, second = twice
            lines = f"on line {first}" if first == second else f"on lines {first} and {second}"
            raise InvalidPreset(str(path), key, f"is given twice, {lines}; keep one")
        return loader.construct_document(node)
    finally:
        loader.dispose()


@lru_cache(maxsize=64)
def _load(path: Path, mtime_ns: int) -> Preset:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_PRESET_BYTES + 1)
        if len(raw) > MAX_PRESET_BYTES:
            raise InvalidPreset(str(path), "(file)", f"is larger than {MAX_PRESET_BYTES // 1024} KiB; a preset is a short file")
        text = raw.decode("utf-8")
        refusal = _yaml_refusal(text)
        if refusal:
            raise InvalidPreset(str(path), "(file)", refusal)
        data = _parse(text, path)
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidPreset(str(path), "(file)", f"cannot read it: {err}") from None
    except RecursionError:
        raise InvalidPreset(str(path), "(file)", "nests too deeply; a preset is a short file") from None
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
        preset = _build(Preset, data)
    except _Invalid as err:
        raise InvalidPreset(str(path), err.field_name, err.problem) from None
    _check_consistent(preset, path)
    return preset


def _check_consistent(preset: Preset, path: Path) -> None:
    """The preset's own numbers must agree with what the RoPE rules read from its config facts, and
    its default RoPE must be one the rules accept on those facts (else every use would fail later
    with a message that does not name the preset)."""
    from launcher.errors import LaunchError
    from launcher.rules.configcheck import BadConfig
    from launcher.rules.kvcache import LayoutHeadsIndivisible, ModelShape, tp_split
    from launcher.rules.rope import RopeRequest, decide, read_rope

    try:
        state = read_rope(preset.stub_config(), f"preset {preset.name}")
        ModelShape.from_config(preset.stub_config(), f"preset {preset.name}")  # heads against KV heads, hidden size
    except BadConfig as err:
        raise InvalidPreset(str(path), "config", err.problem) from None
    except LaunchError as err:
        raise InvalidPreset(str(path), "config", str(err)) from None
    if state.native_context != preset.native_context:
        raise InvalidPreset(
            str(path),
            "native_context",
            f"{preset.native_context} disagrees with the config facts, which give {state.native_context}",
        )
    request = RopeRequest(factor=preset.rope.factor, rope_type=preset.rope.type, engine=preset.engine.backend)
    try:
        decide(preset.stub_config(), request, f"preset {preset.name}")
    except LaunchError as err:
        raise InvalidPreset(str(path), "rope", str(err)) from None
    try:  # the preset's own tp on its own heads, by the layout's rule (else "--tp", a flag not given)
        tp_split(preset.stub_config(), preset.engine.tp, str(path))
    except LayoutHeadsIndivisible as err:
        raise InvalidPreset(str(path), "engine.tp", f"{err.tp} does not divide the model's {err.count} {err.what} "
                            "(they are split evenly over the tp GPUs); use a tp that divides it") from None


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
