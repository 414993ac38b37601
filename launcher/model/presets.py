"""Model presets: one YAML file per model, validated by a schema that rejects unknown keys.

Built-in presets live in ``configs/``; users add their own in ``$LAUNCH_PRESETS_DIR`` (default
``~/.config/launch/presets``). A user preset with the name of a built-in one replaces it. A preset's
file name (without ``.yaml``) is its name.

A preset carries the facts of the checkpoint's ``config.json`` that ``plan`` needs (architecture,
shapes, RoPE as shipped), so that ``launch plan PRESET`` works offline and before any download.
"""

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import msgspec
import yaml

from launcher.engine.spec import BACKENDS, EngineSettings
from launcher.errors import LaunchError
from launcher.rules import checks, limits
from launcher.rules.checks import BadOption
from launcher.rules.context import Recipe
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
# msgspec Structs: msgspec.convert checks each section's structure, types and choices and refuses an
# unknown key, naming it. The values launch gives a meaning of its own (every number, a repo id, a
# revision) are typed by a _Checked type, which msgspec hands to ``_read``: every number is read by its
# entry in the one table of limits (``launcher/rules/limits.py``), the entry its flag or its config.json
# field is read by, so a preset can hold nothing ``--tp`` or a config could not. (msgspec rather than
# pydantic: importing pydantic costs every `launch plan` ~0.15 s.)


class _Checked(type):
    """The type of the plain values (``kinds``: numbers or text) that ``read`` accepts. msgspec gives
    a field of such a type to the decode hook, and checks what the hook returns with isinstance."""

    kinds: tuple[type, ...]
    read: Callable[[Any], Any]

    def __instancecheck__(cls, value: Any) -> bool:
        return isinstance(value, cls.kinds) and not isinstance(value, bool)


def _checked(name: str, kinds: tuple[type, ...], read: Callable[[Any], Any]) -> _Checked:
    return _Checked(name, (), {"kinds": kinds, "read": staticmethod(read)})


def _read(cls: type, value: Any) -> Any:
    """msgspec's decode hook: a _Checked type's value, or ValueError saying what is wrong."""
    if not isinstance(cls, _Checked):
        raise TypeError(f"no reader for {cls.__name__}")
    return cls.read(value)


def _number(limit: limits.Limit) -> _Checked:
    """A number by ``limit``. A decimal number may be YAML text: YAML 1.1 reads 7.3e9 (no exponent
    sign) as a string, so such text is read by the flags' grammar."""

    def read(value: Any) -> int | float:
        if isinstance(value, str) and not limit.whole:
            try:
                return limit.parse(value)
            except ValueError:
                pass
        return limit.check(value)

    return _checked("Number", (int, float), read)


def _config_number(key: str) -> _Checked:
    """A config.json fact by the limit its key has in config.json (``limits.CONFIG_KEYS``)."""
    return _number(limits.CONFIG_KEYS[key])


def _repo(value: Any) -> str:
    if not is_repo_id(value):
        raise ValueError(f"must be a Hugging Face repo id ORG/NAME, found {limits.shown(value)}")
    return value


def _revision(value: Any) -> str:
    try:
        return checks.revision("revision", value)
    except BadOption:
        raise ValueError(f"must be a branch, tag or commit sha, found {limits.shown(value)}") from None


RepoId = _checked("RepoId", (str,), _repo)
Revision = _checked("Revision", (str,), _revision)
Texts = tuple[str, ...]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    def _plain(self) -> dict:
        """The section as plain data (JSON-ready): its set fields, tuples as lists."""
        return {name: list(v) if isinstance(v, tuple) else v
                for name in self.__struct_fields__ if (v := getattr(self, name)) is not None}


class RopeDefaults(_Section):
    type: Literal[WRITABLE_TYPES]
    factor: _number(limits.FACTOR)


class ShippedConfig(_Section):
    """The facts of the checkpoint's config.json, with config.json's own key names."""

    architectures: Texts
    max_position_embeddings: _config_number("max_position_embeddings")
    num_hidden_layers: _config_number("num_hidden_layers")
    hidden_size: _config_number("hidden_size")
    num_attention_heads: _config_number("num_attention_heads")
    torch_dtype: Literal["float16", "bfloat16", "float32"]
    model_type: str | None = None
    rope_theta: _config_number("rope_theta") | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    num_key_value_heads: _config_number("num_key_value_heads") | None = None
    head_dim: _config_number("head_dim") | None = None
    vocab_size: _config_number("vocab_size") | None = None
    bias: bool | None = None  # InternLM v1: biases on the attention projections
    attention_bias: bool | None = None
    sliding_window: _config_number("sliding_window") | None = None

    def as_config(self) -> dict:
        """A config.json-shaped dict (keys that are None are left out, except rope_scaling)."""
        config = self._plain()
        if self.rope_parameters is None:
            config.setdefault("rope_scaling", None)
        return config


class EngineDefaults(_Section):
    """A preset's engine settings; the defaults are the engine's own (``engine.EngineSettings``)."""

    backend: Literal[BACKENDS] = EngineSettings.backend
    tp: _number(limits.TP) = EngineSettings.tp
    max_batch_size: _number(limits.MAX_BATCH_SIZE) = EngineSettings.max_batch_size
    cache_max_entry_count: _number(limits.CACHE_MAX_ENTRY_COUNT) = EngineSettings.cache_max_entry_count
    quant_policy: Literal[QUANT_POLICIES] = EngineSettings.quant_policy
    cp: _number(limits.CP) = EngineSettings.cp
    enable_prefix_caching: bool = EngineSettings.enable_prefix_caching


class RecipeEngine(_Section):
    """The engine values a published recipe sets (the others stay the preset's)."""

    tp: _number(limits.TP) | None = None
    max_batch_size: _number(limits.MAX_BATCH_SIZE) | None = None
    cache_max_entry_count: _number(limits.CACHE_MAX_ENTRY_COUNT) | None = None
    quant_policy: Literal[QUANT_POLICIES] | None = None
    cp: _number(limits.CP) | None = None


class RecipeSection(_Section):
    """A published serving setting for the preset's own scaling (``rope``): the session its makers (or
    lmdeploy's docs) serve, with the engine values they serve it with, and where it is published."""

    source: str
    session_len: _number(limits.SESSION_LEN)
    engine: RecipeEngine = RecipeEngine()
    default: bool = True  # false: the recipe only vouches for sessions up to session_len (no warning there)


class ChatTemplate(_Section):
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
    stop_words: Texts | None = None

    def as_dict(self) -> dict:
        """The set fields, as lmdeploy's ChatTemplateConfig takes them."""
        return self._plain()


class Preset(_Section):
    name: str
    repo: RepoId
    native_context: _number(limits.CONTEXT)
    rope: RopeDefaults
    parameters: _number(limits.PARAMETERS)  # parameter count, for the weight-size estimate
    config: ShippedConfig
    revision: Revision | None = None
    description: str = ""
    trust_remote_code: bool = False
    engine: EngineDefaults = EngineDefaults()
    chat_template: ChatTemplate | None = None
    notes: Texts = ()
    recipe: RecipeSection | None = None

    def stub_config(self) -> dict:
        return self.config.as_config()

    @property
    def published(self) -> Recipe | None:
        """The preset's recipe as the context rules take it (its scaling is the preset's ``rope``)."""
        if self.recipe is None:
            return None
        engine = {k: v for k, v in self.recipe.engine._plain().items() if v is not None}
        return Recipe(self.recipe.source, self.recipe.session_len, self.rope.type, self.rope.factor, engine,
                      self.recipe.default)


# --- msgspec's refusals in launch's words: the dotted key and what its value must be ----------------

_AT = re.compile(r"(?P<what>.*?)(?: - at `(?P<key>key` in `)?\$(?P<path>[^`]*)`)?", re.DOTALL)
_NAMED = re.compile(r"Object (?P<kind>contains unknown|missing required) field `(?P<name>.*)`", re.DOTALL)
_UNKNOWN = "unknown field (check its spelling; `launch presets show NAME` shows a valid preset)"


def _wanted(kind: Any) -> str:
    """What a value of the schema type ``kind`` must be, in words."""
    args = [arg for arg in get_args(kind) if arg is not type(None)]
    if get_origin(kind) is Literal:
        return f"one of {', '.join(map(str, args))}"
    if get_origin(kind) in (Union, UnionType):
        return _wanted(args[0])
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return "a mapping of fields"
    return {str: "text", bool: "true or false", dict: "a mapping", Texts: "a list of text"}.get(kind, "valid")


def _refusal(err: msgspec.ValidationError, data: dict) -> tuple[str, str]:
    """(dotted key, problem) of msgspec's refusal of ``data`` as a Preset."""
    text = str(err)
    named = _NAMED.fullmatch(text)  # at the top, msgspec adds no " - at `$...`": a key may look like one
    if named and named["kind"] == "contains unknown" and named["name"] in data:
        return named["name"], _UNKNOWN
    match = _AT.fullmatch(text)
    what, path = match["what"], [part for part in re.split(r"[.\[]", match["path"] or "") if part]
    keys = [part for part in path if not part.endswith("]")]  # an item's fault is its list's
    section, kind, value = Preset, Preset, data
    try:
        for key in keys:
            kind = next(f.type for f in msgspec.structs.fields(section) if f.name == key)
            section = next((arg for arg in (kind, *get_args(kind)) if isinstance(arg, type)
                            and issubclass(arg, msgspec.Struct)), None)
            value = value[key]
    except (StopIteration, KeyError, TypeError):  # a path this reading of msgspec's words does not know
        return "(file)", text
    if match["key"]:  # a mapping's key that is no text: no field is called that
        return ".".join([*keys, str(next(k for k in value if not isinstance(k, str)))]), _UNKNOWN
    named = _NAMED.fullmatch(what)
    if named:
        unknown = named["kind"] == "contains unknown"
        return ".".join([*keys, named["name"]]), _UNKNOWN if unknown else "required field is missing"
    if what.startswith(("Expected `", "Invalid enum value")):  # msgspec's own words: the field's instead
        what = f"must be {_wanted(kind)}, found {limits.shown(value)}"
    return ".".join(keys), what


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
        preset = msgspec.convert(data, Preset, dec_hook=_read)
    except msgspec.ValidationError as err:
        raise InvalidPreset(str(path), *_refusal(err, data)) from None
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
    tps = [("engine.tp", preset.engine.tp)]
    if preset.recipe is not None and preset.recipe.engine.tp is not None:
        tps.append(("recipe.engine.tp", preset.recipe.engine.tp))
    for key, tp in tps:  # the preset's own tp on its own heads, by the layout's rule (else "--tp", a flag not given)
        try:
            tp_split(preset.stub_config(), tp, str(path))
        except LayoutHeadsIndivisible as err:
            raise InvalidPreset(str(path), key, f"{err.tp} does not divide the model's {err.count} {err.what} "
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
