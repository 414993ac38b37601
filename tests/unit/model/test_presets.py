"""Presets: the schema, the built-in files, user directories, lookup and the `presets` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from launcher.model.presets import (
    InvalidPreset,
    UnknownPreset,
    all_presets,
    get_preset,
    load_preset_file,
    preset_files,
    suggestions,
)
from launcher.rules import limits
from launcher.rules.rope import read_rope
from launcher.runtime.paths import builtin_presets_dir

REQUIRED = [
    "internlm-chat-7b", "internlm2-chat-7b", "internlm2_5-7b-chat", "internlm2_5-7b-chat-1m",
    "internlm3-8b-instruct", "llama-2-7b-chat", "llama-3-8b-instruct", "llama-3.1-8b-instruct",
    "qwen2.5-7b-instruct", "qwen2.5-0.5b-instruct", "mistral-7b-instruct-v0.2",
]

# Facts from each model's own config.json (repo, architecture, max_position_embeddings,
# layers, hidden, heads, kv heads, head_dim, dtype).
FACTS = {
    "internlm-chat-7b": ("internlm/internlm-chat-7b", "InternLMForCausalLM", 2048, 32, 4096, 32, 32, 128, "float16"),
    "internlm2-chat-7b": ("internlm/internlm2-chat-7b", "InternLM2ForCausalLM", 32768, 32, 4096, 32, 8, 128, "bfloat16"),
    "internlm2_5-7b-chat": ("internlm/internlm2_5-7b-chat", "InternLM2ForCausalLM", 32768, 32, 4096, 32, 8, 128, "bfloat16"),
    "internlm2_5-7b-chat-1m": ("internlm/internlm2_5-7b-chat-1m", "InternLM2ForCausalLM", 262144, 32, 4096, 32, 8, 128, "bfloat16"),
    "internlm3-8b-instruct": ("internlm/internlm3-8b-instruct", "InternLM3ForCausalLM", 32768, 48, 4096, 32, 2, 128, "bfloat16"),
    "llama-2-7b-chat": ("meta-llama/Llama-2-7b-chat-hf", "LlamaForCausalLM", 4096, 32, 4096, 32, 32, 128, "float16"),
    "llama-3-8b-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "LlamaForCausalLM", 8192, 32, 4096, 32, 8, 128, "bfloat16"),
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", "LlamaForCausalLM", 131072, 32, 4096, 32, 8, 128, "bfloat16"),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B-Instruct", "Qwen2ForCausalLM", 32768, 28, 3584, 28, 4, 128, "bfloat16"),
    "qwen2.5-0.5b-instruct": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2ForCausalLM", 32768, 24, 896, 14, 2, 64, "bfloat16"),
    "mistral-7b-instruct-v0.2": ("mistralai/Mistral-7B-Instruct-v0.2", "MistralForCausalLM", 32768, 32, 4096, 32, 8, 128, "bfloat16"),
}

GOOD = {
    "name": "mine",
    "repo": "me/mine",
    "native_context": 4096,
    "rope": {"type": "dynamic", "factor": 2.0},
    "parameters": 1.0e9,
    "config": {
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "torch_dtype": "float16",
    },
}


def write_preset(directory: Path, data: dict, name: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name or data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_every_required_model_has_a_valid_preset():
    names = set(preset_files())
    assert set(REQUIRED) <= names
    for entry, preset in all_presets():
        assert entry.builtin and entry.path.parent == builtin_presets_dir()
        assert preset.name == entry.path.stem


@pytest.mark.parametrize("name", sorted(FACTS))
def test_preset_facts_match_the_models_configs(name):
    repo, arch, max_pos, layers, hidden, heads, kv, head_dim, dtype = FACTS[name]
    p = get_preset(name)
    c = p.config
    assert (p.repo, c.architectures[0], c.max_position_embeddings) == (repo, arch, max_pos)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads,
            c.head_dim, c.torch_dtype) == (layers, hidden, heads, kv, head_dim, dtype)
    assert read_rope(p.stub_config()).native_context == p.native_context


def test_remote_code_only_where_the_model_needs_it():
    for name in REQUIRED:
        assert get_preset(name).trust_remote_code == name.startswith("internlm"), name


def test_internlm_v1_preset_carries_the_v1_chat_template():
    t = get_preset("internlm-chat-7b").chat_template
    assert (t.system, t.user, t.assistant, t.eoa) == ("<|System|>:", "<|User|>:", "<|Bot|>:", "<eoa>")
    assert t.as_dict()["stop_words"] == ["<eoa>"] and "user" in t.as_dict()
    assert "Shanghai AI Laboratory" in t.meta_instruction


def test_user_presets_are_found_and_override_builtin(tmp_path, monkeypatch):
    user = tmp_path / "presets"
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(user))
    write_preset(user, GOOD)
    override = dict(GOOD, name="llama-2-7b-chat", repo="me/llama", description="mine")
    write_preset(user, override)
    files = preset_files()
    assert not files["mine"].builtin and not files["llama-2-7b-chat"].builtin
    assert get_preset("llama-2-7b-chat").repo == "me/llama"
    assert get_preset("mine").native_context == 4096


def test_default_user_directory_is_under_the_config_home(monkeypatch, tmp_path):
    config_home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    write_preset(config_home / "launch" / "presets", GOOD)
    assert get_preset("mine").repo == "me/mine"


@pytest.mark.parametrize(
    "mutate, field, problem",
    [
        (lambda d: d.update(contxt=5), "contxt", "unknown field"),
        (lambda d: d["config"].update(num_layers=3), "config.num_layers", "unknown field"),
        (lambda d: d["rope"].update(factor=1.0), "rope.factor", "greater than 1"),
        (lambda d: d["rope"].update(type="ntk"), "rope.type", "dynamic"),
        (lambda d: d.update(native_context=8192), "native_context", "disagrees"),
        (lambda d: d.update(repo="not a repo"), "repo", "repo id ORG/NAME"),
        (lambda d: d.pop("parameters"), "parameters", "required"),
        (lambda d: d.update(engine={"quant_policy": 2}), "engine.quant_policy", "one of 0, 8, 4"),
        (lambda d: d.update(engine={"cache_max_entry_count": 1.0}), "engine.cache_max_entry_count", "strictly between 0 and 1"),
        (lambda d: d.update(name="other"), "name", "must match the file name"),
        (lambda d: d.update(rope="dynamic"), "rope", "must be a mapping"),
        (lambda d: d["config"].update(rope_scaling="dynamic"), "config.rope_scaling", "must be a mapping"),
        (lambda d: d.update(trust_remote_code="yes"), "trust_remote_code", "true or false"),
        (lambda d: d.update(parameters="many"), "parameters", "must be a number"),
        (lambda d: d.update(revision="two words"), "revision", "branch, tag or commit sha"),
        (lambda d: d.update(revision=""), "revision", "branch, tag or commit sha"),
    ],
)
def test_invalid_presets_name_the_file_and_the_field(tmp_path, monkeypatch, mutate, field, problem):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    mutate(data)
    path = write_preset(tmp_path, data, name="mine")
    with pytest.raises(InvalidPreset) as err:
        load_preset_file(path)
    message = str(err.value)
    assert str(path) in message and repr(field) in message and problem in message, message


def test_unparseable_yaml_is_an_invalid_preset(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(InvalidPreset) as err:
        load_preset_file(path)
    assert "not valid YAML" in str(err.value)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownPreset) as err:
        get_preset("internlm2.5-7b-chat")
    assert "internlm2_5-7b-chat" in str(err.value)
    assert "qwen2.5-7b-instruct" in suggestions("qwen-7b-instruct") or "qwen2.5-7b-instruct" in suggestions("qwen2.5-7b")


def test_presets_command_lists_every_preset(launch, tmp_path):
    user = tmp_path / "presets"
    write_preset(user, GOOD)
    result = launch("presets", env={"LAUNCH_PRESETS_DIR": str(user)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in REQUIRED + ["mine"]:
        assert any(line.startswith(name + " ") for line in lines), name
    row = next(line for line in lines if line.startswith("internlm2_5-7b-chat "))
    assert "32,768" in row and "dynamic x2" in row and "65,536" in row
    row = next(line for line in lines if line.startswith("llama-3.1-8b-instruct "))
    assert "8,192" in row and "llama3 x8" in row and "131,072" in row  # as shipped, not 8 x 8k
    row = next(line for line in lines if line.startswith("qwen2.5-7b-instruct "))
    assert "yarn x4" in row and "131,072" in row
    assert "(user)" in next(line for line in lines if line.startswith("mine "))


def test_presets_show_prints_the_file(launch):
    result = launch("presets", "show", "qwen2.5-7b-instruct")
    assert result.returncode == 0, result.stderr
    assert "repo: Qwen/Qwen2.5-7B-Instruct" in result.stdout
    assert yaml.safe_load(result.stdout)["rope"] == {"type": "yarn", "factor": 4.0}


def test_presets_show_unknown_suggests(launch):
    result = launch("presets", "show", "qwen2.5-7b")
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Did you mean" in result.stderr and "qwen2.5" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_user_preset_fails_listing_with_one_line(launch, tmp_path):
    user = tmp_path / "presets"
    write_preset(user, dict(GOOD, factorr=2))
    result = launch("presets", env={"LAUNCH_PRESETS_DIR": str(user)})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "mine.yaml" in result.stderr and "'factorr'" in result.stderr and "Traceback" not in result.stderr


# --- a key given twice: YAML would take the last one silently (issue 17) -----------------------------


def _key_lines(text: str) -> list[tuple[int, str, str]]:
    """(line index, indent, key) of each block-style ``key: value`` line of ``text``."""
    found = []
    for index, line in enumerate(text.splitlines()):
        stripped = line.lstrip(" ")
        if stripped and not stripped.startswith(("-", "#")) and ":" in stripped:
            found.append((index, line[: len(line) - len(stripped)], stripped.split(":", 1)[0]))
    return found


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data(), quote=st.sampled_from(["{}", '"{}"', "'{}'"]), value=st.sampled_from(["evil/other", "3", "[]", "x"]))
def test_a_key_given_twice_anywhere_is_refused_naming_the_file_the_key_and_both_lines(tmp_path_factory, data, quote,
                                                                                       value):
    """Block style at any depth, with the second spelling quoted or not: refused before any field is
    read, naming the file, the dotted key and both lines (a second `repo:` would switch the repo)."""
    text = yaml.safe_dump(dict(GOOD, engine={"backend": "turbomind", "tp": 1}), sort_keys=False)
    lines = text.splitlines()
    index, indent, key = data.draw(st.sampled_from(_key_lines(text)))
    # the duplicate goes after the last line of the mapping that holds the key (same indent, or deeper)
    end = index + 1
    while end < len(lines) and (lines[end].startswith(indent + " ") or lines[end].startswith(indent + "-")):
        end += 1
    while end < len(lines) and lines[end].startswith(indent) and not lines[end].startswith(indent + " ") and indent:
        end += 1
    lines.insert(end, f"{indent}{quote.format(key)}: {value}")
    path = tmp_path_factory.mktemp("dup") / "mine.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidPreset) as err:
        load_preset_file(path)
    message = str(err.value)
    parents = [k for i, ind, k in _key_lines(text) if i < index and len(ind) < len(indent)]
    dotted = ".".join([*parents[-(len(indent) // 2):], key] if indent else [key])
    assert message == (f"invalid preset {path}: field {dotted!r}: is given twice, on lines {index + 1} and {end + 1}; "
                       "keep one"), message


@pytest.mark.parametrize("text, key, where", [
    ("repo: me/mine\nrepo: evil/other\n", "repo", "on lines 1 and 2"),
    ("rope: {type: dynamic, factor: 2.0, factor: 3.0}\n", "rope.factor", "on line 1"),
    ("engine: {tp: 1}\nengine:\n  tp: 2\n", "engine", "on lines 1 and 2"),
    ("notes: [a]\nnotes: [b]\n", "notes", "on lines 1 and 2"),
])
def test_flow_style_and_whole_sections_given_twice_are_refused_too(tmp_path, text, key, where):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(InvalidPreset) as err:
        load_preset_file(path)
    assert str(err.value) == f"invalid preset {path}: field {key!r}: is given twice, {where}; keep one"


def test_a_preset_that_switches_its_repo_by_a_second_line_stops_plan_and_presets_in_one_line(launch, tmp_path):
    user = tmp_path / "presets"
    path = write_preset(user, GOOD)
    path.write_text(path.read_text() + "repo: evil/other\n")
    for argv in (("plan", "mine", "--gpu-memory", "80"), ("presets",), ("presets", "show", "mine")):
        result = launch(*argv, env={"LAUNCH_PRESETS_DIR": str(user)})
        assert result.returncode == 1 and result.stdout == "", result.stdout
        assert result.stderr.startswith(f"launch: error: invalid preset {path}: field 'repo': is given twice, on lines")
        assert result.stderr.count("\n") == 1 and "evil" not in result.stderr


# --- every number a preset holds has a type and a range (issue 17: parameters 1e300) -----------------

NUMBER_FIELDS = {
    ("parameters",): limits.PARAMETERS, ("native_context",): limits.CONTEXT, ("rope", "factor"): limits.FACTOR,
    ("engine", "tp"): limits.TP, ("engine", "max_batch_size"): limits.MAX_BATCH_SIZE,
    ("engine", "cache_max_entry_count"): limits.CACHE_MAX_ENTRY_COUNT,
    **{("config", key): limits.CONFIG_KEYS[key] for key in (
        "max_position_embeddings", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "sliding_window", "rope_theta")},
}


def outside(limit: limits.Limit) -> st.SearchStrategy:
    """Numbers past either end of ``limit`` (or not whole where it must be), and what is no number
    (a decimal number may be YAML text, "7.3e9": YAML 1.1 reads an exponent without a sign as text)."""
    below = st.floats(max_value=limit.low, allow_nan=False, allow_infinity=False, exclude_max=not limit.low_open)
    above = st.floats(min_value=limit.high, allow_nan=False, allow_infinity=False, exclude_min=not limit.high_open)
    if limit.whole:
        below = st.integers(max_value=int(limit.low) - 1)
        above = st.one_of(st.integers(min_value=int(limit.high) + 1), st.just(int(limit.high) + 0.5))
    return st.one_of(below, above, st.sampled_from([1e300, -1e300, True, "12" if limit.whole else "1_0", "twelve"]))


FULL = dict(GOOD, engine={"tp": 1}, chat_template={"model_name": "mine"})  # GOOD with every section


def preset_with(field: tuple, value: object) -> dict:
    """A copy of FULL with the dotted ``field`` set to ``value``."""
    preset = yaml.safe_load(yaml.safe_dump(FULL))
    section = preset
    for key in field[:-1]:
        section = section[key]
    section[field[-1]] = value
    return preset


def refusal(directory: Path, preset: dict) -> tuple[Path, str]:
    """The file ``preset`` is written to in ``directory``, and the InvalidPreset message of loading it."""
    path = write_preset(directory, preset)
    with pytest.raises(InvalidPreset) as err:
        load_preset_file(path)
    return path, str(err.value)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data(), field=st.sampled_from(sorted(NUMBER_FIELDS)))
def test_every_preset_number_out_of_its_range_is_refused_naming_the_file_and_key(tmp_path_factory, data, field):
    limit = NUMBER_FIELDS[field]
    path, message = refusal(tmp_path_factory.mktemp("num"), preset_with(field, data.draw(outside(limit))))
    assert message.startswith(f"invalid preset {path}: field {'.'.join(field)!r}: must be {limit.rule}, found ")


@pytest.mark.parametrize("tp, heads, hidden, what", [(8, 4, 64, "4 attention heads"), (2, 6, 63, "63 hidden size")])
def test_a_presets_tp_that_its_own_model_cannot_split_names_the_preset_key_not_the_flag(launch, tmp_path, tp, heads,
                                                                                       hidden, what):
    user = tmp_path / "presets"
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    data["config"].update(num_attention_heads=heads, hidden_size=hidden)
    data["engine"] = {"tp": tp}
    path = write_preset(user, data)
    result = launch("plan", "mine", "--gpu-memory", "80", env={"LAUNCH_PRESETS_DIR": str(user)})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"launch: error: invalid preset {path}: field 'engine.tp': {tp} does not divide the "
                                    f"model's {what}"), result.stderr
    assert "--tp" not in result.stderr and result.stderr.count("\n") == 1


# --- the schema is msgspec's: its refusals in launch's words, its numbers by the one table ----------

UNKNOWN = "unknown field (check its spelling; `launch presets show NAME` shows a valid preset)"


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data(), section=st.sampled_from([(), ("rope",), ("config",), ("engine",), ("chat_template",)]),
       key=st.one_of(st.text(max_size=30), st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False),
                     st.sampled_from(["x` - at `$.rope", "x` - at `key` in `$.config", "Object missing required field `a`",
                                      "Object contains unknown field `b`", "Factor", "config.tp"])))
def test_an_unknown_key_of_any_spelling_in_any_section_is_named_exactly(tmp_path_factory, data, section, key):
    """msgspec refuses it (forbid_unknown_fields); the message names the dotted key as written, even a
    key that looks like msgspec's own words, or one that is no text (YAML reads `1:` as a number)."""
    mapping = FULL
    for name in section:
        mapping = mapping[name]
    assume(key not in mapping)  # a key the section has is no unknown one
    value = data.draw(st.sampled_from([1, "x", None, [1], {"a": 1}]))
    path, message = refusal(tmp_path_factory.mktemp("key"), preset_with((*section, key), value))
    assert message == f"invalid preset {path}: field {'.'.join([*section, str(key)])!r}: {UNKNOWN}"


CHOICES = {("rope", "type"): ("dynamic", "linear", "yarn", "llama3"), ("config", "torch_dtype"): ("float16", "bfloat16",
           "float32"), ("engine", "backend"): ("turbomind", "pytorch"), ("engine", "quant_policy"): (0, 8, 4)}
KINDS = {  # field -> what its value must be (the hand-written schema's words, kept) and whether a value is that
    ("description",): ("text", str), ("trust_remote_code",): ("true or false", bool), ("notes",): ("a list of text", list),
    ("rope",): ("a mapping of fields", dict), ("config",): ("a mapping of fields", dict),
    ("config", "architectures"): ("a list of text", list), ("config", "model_type"): ("text", str),
    ("config", "rope_scaling"): ("a mapping", dict), ("config", "bias"): ("true or false", bool),
    ("engine",): ("a mapping of fields", dict), ("chat_template",): ("a mapping of fields", dict),
    ("chat_template", "model_name"): ("text", str), ("chat_template", "stop_words"): ("a list of text", list),
    **{field: (f"one of {', '.join(map(str, choices))}", choices) for field, choices in CHOICES.items()},
}
OPTIONAL = {("config", "model_type"), ("config", "rope_scaling"), ("config", "bias"), ("chat_template",),
            ("chat_template", "stop_words")}
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12),
                   st.sampled_from(["dynamic", "pytorch", "float16", 8, 8.0]),
                   st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def fits(kind: type | tuple, value: object) -> bool:
    """Whether ``value`` is of ``kind`` (a type, or a tuple of choices): the schema must then take it."""
    if isinstance(kind, tuple):
        return any(type(value) is type(choice) and value == choice for choice in kind)
    if kind is list:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, kind)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(field=st.sampled_from(sorted(KINDS)), value=VALUES)
def test_a_value_of_the_wrong_kind_is_refused_in_the_fields_words(tmp_path_factory, field, value):
    """msgspec checks the kind; the message says what the field must be and what was found, naming the
    file and the dotted key (not msgspec's "Expected `str`, got `int`")."""
    words, kind = KINDS[field]
    assume(not fits(kind, value) and not (value is None and field in OPTIONAL))
    path, message = refusal(tmp_path_factory.mktemp("kind"), preset_with(field, value))
    assert message.startswith(f"invalid preset {path}: field {'.'.join(field)!r}: must be {words}, found "), message
    assert "Expected" not in message and "\n" not in message


@pytest.mark.parametrize("key, written, read", [
    (("engine", "tp"), 2.0, 2),  # a whole float counts as whole, as a config's 32768.0 does
    (("parameters",), "7.3e9", 7.3e9),  # YAML 1.1 reads 7.3e9 as text: read by the flags' grammar
    (("rope", "factor"), "2.5", 2.5),
    (("rope", "factor"), 3, 3.0),
    (("engine", "cache_max_entry_count"), "5e-1", 0.5),
    (("config", "rope_theta"), "1e6", 1e6),
])
def test_numbers_are_read_by_the_table_not_by_msgspecs_own_rules(tmp_path, key, written, read):
    preset = load_preset_file(write_preset(tmp_path, preset_with(key, written)))
    value = preset
    for name in key:
        value = getattr(value, name)
    assert value == read and type(value) is type(read)


# --- YAML 1.1's other spellings of numbers and booleans: text, refused as the flag refuses it (issue 17) ---

_FIELDS = {  # dotted key -> where the text goes in GOOD (+ engine), and the flag that takes the same number
    "native_context": ("native_context",),
    "rope.factor": ("rope", "factor"),
    "parameters": ("parameters",),
    "engine.tp": ("engine", "tp"),
    "engine.max_batch_size": ("engine", "max_batch_size"),
    "engine.cache_max_entry_count": ("engine", "cache_max_entry_count"),
    "config.num_hidden_layers": ("config", "num_hidden_layers"),
}
_OTHER_SPELLINGS = st.sampled_from(["1_0", "2_048", "0x2", "0X10", "010", "0o7", "0b11", "1:30", "+0x1", "1_0.5",
                                    "1__0", "00", "-0x1", "190:20:30"])


def _with(text_value: str, path: tuple[str, ...]) -> str:
    data = dict(GOOD, engine={"backend": "turbomind", "tp": 1, "max_batch_size": 8, "cache_max_entry_count": 0.5})
    data = yaml.safe_load(yaml.safe_dump(data))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "@@"
    return yaml.safe_dump(data, sort_keys=False).replace("'@@'", text_value)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(field=st.sampled_from(sorted(_FIELDS)), spelling=_OTHER_SPELLINGS)
def test_a_number_yaml_11_would_read_from_other_digits_is_text_and_refused_naming_the_field(tmp_path_factory, field,
                                                                                            spelling):
    """`tp: 0x2` or `max_batch_size: 1_0` is refused like `--tp 0x2` (YAML 1.1 would have read 2 and 10); a
    decimal field's text is read by the flags' grammar, as `--gpu-memory 010` is (10)."""
    try:
        flag_reads = limits.number_text(spelling)
    except ValueError:
        flag_reads = None
    assume(field not in ("rope.factor", "parameters", "engine.cache_max_entry_count") or flag_reads is None)
    path = tmp_path_factory.mktemp("yaml11") / "mine.yaml"
    path.write_text(_with(spelling, _FIELDS[field]))
    with pytest.raises(InvalidPreset) as err:
        load_preset_file(path)
    assert f"field {field!r}" in str(err.value) and f"found {spelling!r}" in str(err.value), str(err.value)


@pytest.mark.parametrize("spelling", ["yes", "no", "on", "off", "y", "Yes", "ON"])
def test_a_boolean_is_true_or_false_only(tmp_path, spelling):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(GOOD, sort_keys=False) + f"trust_remote_code: {spelling}\n")
    with pytest.raises(InvalidPreset) as err:
        load_preset_file(path)
    assert str(err.value) == (f"invalid preset {path}: field 'trust_remote_code': must be true or false, "
                              f"found {spelling!r}")


@pytest.mark.parametrize(("spelling", "read"), [("4096", 4096), ("+4096", 4096), ("4.096e3", 4096), ("4096.0", 4096)])
def test_plain_decimal_numbers_are_still_numbers(tmp_path, spelling, read):
    path = tmp_path / "mine.yaml"
    path.write_text(_with(spelling, ("native_context",)).replace("max_position_embeddings: 4096",
                                                                 f"max_position_embeddings: {read}"))
    assert load_preset_file(path).native_context == read
