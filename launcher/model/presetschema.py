"""The presets' schema: msgspec Structs, one per section of a preset file, and msgspec's refusals put in
launch's words (the dotted key and what its value must be). launcher/model/presets.py finds and reads
the files."""

import re
from collections.abc import Callable
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import msgspec

from launcher.engine.spec import BACKENDS, EngineSettings
from launcher.rules import checks, limits
from launcher.rules.checks import BadOption
from launcher.rules.context import Recipe
from launcher.rules.kvcache import QUANT_POLICIES
from launcher.rules.rope import WRITABLE_TYPES
from launcher.runtime.paths import is_repo_id

# --- the schema ----------------------------------------------------------------------------------
# msgspec Structs: msgspec.convert checks each section's structure, types and choices and refuses an
# unknown key, naming it. The values launch gives a meaning of its own (every number, a repo id, a
# revision) are typed by a _Checked type, which msgspec hands to ``read_field``: every number is read by its
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


def read_field(cls: type, value: Any) -> Any:
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


def refusal(err: msgspec.ValidationError, data: dict) -> tuple[str, str]:
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
