"""Model presets: one YAML file per model, validated by a schema that rejects unknown keys.

Built-in presets live in ``configs/``; users add their own in ``$LAUNCH_PRESETS_DIR`` (default
``~/.config/launch/presets``). A user preset with the name of a built-in one replaces it. A preset's
file name (without ``.yaml``) is its name.

A preset carries the facts of the checkpoint's ``config.json`` that ``plan`` needs (architecture,
shapes, RoPE as shipped), so that ``launch plan PRESET`` works offline and before any download.
"""

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgspec
import yaml

from launcher.errors import LaunchError
from launcher.model.presetschema import Preset, read_field, refusal
from launcher.runtime.paths import builtin_presets_dir, user_presets_dirs


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
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster


class _YamlLoader(_BaseLoader):  # type: ignore[misc,valid-type]
    """YAML 1.1 reads ``1_0`` as 10, ``0x2`` as 2, ``010`` as 8, ``1:30`` as 90 and ``yes`` / ``on`` as true,
    where ``--tp 1_0`` or ``--tp 0x2`` is refused. Here a number or a boolean is only what the flags' grammar
    would read as one (plain decimal digits, an optional sign, fraction and exponent; true / false): any
    other text stays text, and the field's reader refuses it in the flag's words."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rule) for tag, rule in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                  list("-+0123456789"))
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


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
        unsafe = _yaml_refusal(text)
        if unsafe:
            raise InvalidPreset(str(path), "(file)", unsafe)
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
        preset = msgspec.convert(data, Preset, dec_hook=read_field)
    except msgspec.ValidationError as err:
        raise InvalidPreset(str(path), *refusal(err, data)) from None
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
