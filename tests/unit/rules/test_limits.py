"""The one table of limits (launcher/rules/limits.py): one grammar for number text, every number flag of
every command read by it in launch's voice, and a preset's number refused exactly where its flag's
is, naming the preset file and key (issues 16 and 17)."""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import click
import pytest
import typer
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from launcher.cli import app, main
from launcher.rules import limits
from tests.conftest import LLAMA

# --- one grammar for number text ------------------------------------------------------------------

NON_ASCII_DIGIT = st.characters(categories=["Nd"]).filter(lambda ch: not ch.isascii())
TABLE = {name: value for name, value in vars(limits).items() if isinstance(value, limits.Limit)}


def in_range(limit: limits.Limit) -> st.SearchStrategy:
    if limit.whole:
        return st.integers(int(limit.low), int(limit.high))
    return st.floats(limit.low, limit.high, exclude_min=limit.low_open, exclude_max=limit.high_open)


@given(st.sampled_from(sorted(TABLE)), st.data())
def test_a_number_in_range_is_read_as_written_with_ascii_digits(name, data):
    limit = TABLE[name]
    number = data.draw(in_range(limit))
    text = str(number) if limit.whole else repr(number)
    assert limit.parse(text) == number and type(limit.parse(text)) is (int if limit.whole else float)
    assert limit.parse(f" {text}\t") == number and limit.check(number) == number


@given(st.sampled_from(sorted(TABLE)), st.data())
def test_other_scripts_digits_underscores_and_words_are_no_numbers(name, data):
    limit = TABLE[name]
    text = str(data.draw(in_range(limit)))
    at = data.draw(st.integers(0, len(text)))
    odd = data.draw(st.one_of(NON_ASCII_DIGIT, st.just("_"), st.sampled_from(["\u00a0", "\u2009", "\x00", "\n"])))
    hostile = data.draw(st.sampled_from([text[:at] + odd + text[at:], text.replace(text[at - 1:at], odd) if at else odd,
                                         "nan", "inf", "-inf", "0x10", "1e", "+-1", "", " "]))
    assume(hostile.strip(" \t") != text)
    with pytest.raises(ValueError) as refused:
        limit.parse(hostile)
    assert str(refused.value) == f"must be {limit.rule}"


@given(st.sampled_from(sorted(TABLE)), st.one_of(st.booleans(), st.none(), st.text(max_size=5), st.lists(st.integers()),
                                                 st.just(float("nan")), st.just(float("inf")), st.just(10**400)))
def test_a_value_that_is_no_number_is_refused_by_every_limit(name, value):
    with pytest.raises(ValueError, match=r"^must be .*, found "):
        TABLE[name].check(value)


# --- every number flag of every command -----------------------------------------------------------


def options_of(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Option]]:
    if isinstance(command, click.Group):
        return [found for name, sub in command.commands.items() for found in options_of(sub, (*path, name))]
    return [(path, param) for param in command.params if isinstance(param, click.Option)]


def test_no_option_takes_clicks_own_number_types():
    """click's INT and FLOAT take "２" and "1_000" (Python's int() and float() do) and answer in
    click's voice: no option of any command uses them; number flags are text read by the table."""
    found = options_of(typer.main.get_command(app))
    assert len(found) > 40
    numeric = (click.types.IntParamType, click.types.FloatParamType)
    assert [(" ".join(p), o.name) for p, o in found if isinstance(o.type, numeric)] == []


# (command, flags) -> the flag's limit; `None`: read by the command's own settings (probe, ppl, fetch).
NUMBER_FLAGS = {
    "plan": {"--factor": limits.FACTOR, "--session-len": limits.SESSION_LEN, "--tp": limits.TP,
             "--max-batch-size": limits.MAX_BATCH_SIZE, "--cache-max-entry-count": limits.CACHE_MAX_ENTRY_COUNT,
             "--quant-policy": None, "--gpu-memory": limits.GPU_MEMORY, "--port": limits.PORT,
             "--replicas": limits.REPLICAS, "--nnodes": limits.NNODES, "--node-rank": limits.NODE_RANK},
    "serve": {"--factor": limits.FACTOR, "--session-len": limits.SESSION_LEN, "--tp": limits.TP,
              "--health-timeout": limits.SECONDS, "--gpu-memory": limits.GPU_MEMORY, "--port": limits.PORT,
              "--replicas": limits.REPLICAS, "--quant-policy": None},
    "patch": {"--factor": limits.FACTOR, "--session-len": limits.SESSION_LEN},
    "fetch": {"--timeout": limits.SECONDS},
    "probe": {"--trials": None, "--seed": None, "--native": None, "--max-tokens": None, "--timeout": None,
              "--min-accuracy": None},
    "ppl": {"--native": None, "--span": None, "--timeout": None},
    "proxy start": {"--start-timeout": limits.SECONDS, "--port": limits.PORT},
}
HOSTILE_NUMBER = st.one_of(
    st.builds(lambda d, n: d * n, NON_ASCII_DIGIT, st.integers(1, 3)),
    st.builds(lambda a, b: f"{a}_{b}", st.integers(0, 99), st.integers(0, 999)),
    st.sampled_from(["", " ", "x", "nan", "inf", "0x10", "+-2", "1e400", "9" * 30, "-1", "1 2", "²", "4\u00a0",
                     "\u20034", "4\n"]),
)


def tiny_model(tmp_path: Path, monkeypatch) -> Path:
    """A tiny model directory, launch's cache in ``tmp_path`` and no network: the hub and the
    probe/ppl URLs below on a closed port. (Not HF_HUB_OFFLINE: huggingface_hub reads it once, when
    first imported, so it would stay set for every later test of this process.)"""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "tiny"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    return model


def base_argv(command: str, model: Path, tmp_path: Path) -> list[str]:
    return {
        "plan": ["plan", str(model), "--factor", "2", "--gpu-memory", "80", "--json"],
        "serve": ["serve", str(model), "--factor", "2", "--gpu-memory", "80", "--dry-run"],
        "patch": ["patch", str(model), "--factor", "2", "--out", str(tmp_path / "ov")],
        "fetch": ["fetch", "org/none"],
        "probe": ["probe", "--url", "http://127.0.0.1:1", "--native", "100", "--out", str(tmp_path / "p")],
        "ppl": ["ppl", "--url", "http://127.0.0.1:1", "--native", "100", "--out", str(tmp_path / "q")],
        "proxy start": ["proxy", "start"],
    }[command]


def run(argv: list[str]) -> tuple[int, str, str]:
    """``launch ARGV`` in this process, its stdout and stderr strict UTF-8 text streams as a
    terminal's are: (exit code, stdout, stderr)."""
    out, err = io.BytesIO(), io.BytesIO()
    streams = sys.stdout, sys.stderr
    sys.stdout = text_out = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    sys.stderr = text_err = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    try:
        main(argv)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.stdout, sys.stderr = streams
    result = code, out.getvalue().decode(), err.getvalue().decode()
    text_out.detach(), text_err.detach()
    return result


FLAG_CASES = [(command, flag) for command, flags in NUMBER_FLAGS.items() for flag in flags]


def test_the_flag_list_is_every_number_flag_the_commands_declare():
    """Each flag listed above exists on its command (a renamed flag fails here, not silently)."""
    declared = {(" ".join(path), name) for path, o in options_of(typer.main.get_command(app)) for name in o.opts}
    assert [case for case in FLAG_CASES if case not in declared] == []


@pytest.mark.slow  # 160 commands through the CLI
@settings(max_examples=160, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=st.sampled_from(FLAG_CASES), text=HOSTILE_NUMBER)
def test_every_number_flag_of_every_command_refuses_what_is_no_number_in_one_voice(tmp_path, monkeypatch, case, text):
    command, flag = case
    model = tiny_model(tmp_path, monkeypatch)
    code, out, err = run([*base_argv(command, model, tmp_path), flag, text])
    assert code == 2 and out == "", (case, text, out, err)
    assert err.count("\n") == 1 and err.startswith(f"launch: error: {flag} {text!r}: "), (case, err)
    limit = NUMBER_FLAGS[command][flag]
    if limit is not None:  # the table's rule, word for word
        assert f": must be {limit.rule}" in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ov").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=st.sampled_from([(c, f) for c, f in FLAG_CASES
                             if NUMBER_FLAGS[c][f] is not None and c not in ("proxy start", "fetch")]),
       data=st.data())
def test_every_number_flag_takes_ascii_numbers_in_its_range(tmp_path, monkeypatch, case, data):
    """In range and written in ASCII, the flag itself is never what is refused (the command may
    still stop later for another reason: a layout past the GPUs). (A proxy would start, and fetch
    would import huggingface_hub into this process: test_hub_cli runs fetch with its --timeout.)"""
    command, flag = case
    limit = NUMBER_FLAGS[command][flag]
    number = data.draw(in_range(limit))
    text = str(number) if limit.whole else repr(number)
    err = run([*base_argv(command, tiny_model(tmp_path, monkeypatch), tmp_path), flag, text])[2]
    assert f"{flag} {text!r}: must be" not in err, err
    assert "Traceback" not in err and err.count("launch: error:") <= 1


# --- a preset's number: refused where the flag's is, naming the preset file and key ----------------

PRESET = {
    "name": "mine", "repo": "me/mine", "native_context": 256, "rope": {"type": "dynamic", "factor": 2.0},
    "parameters": 1.0e9,
    "config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 256, "num_hidden_layers": 2,
               "hidden_size": 64, "num_attention_heads": 4, "torch_dtype": "float16"},
    "engine": {"backend": "turbomind", "tp": 1},
}
# preset key -> the flag whose limit it shares
SHARED = {("rope", "factor"): "--factor", ("engine", "tp"): "--tp", ("engine", "max_batch_size"): "--max-batch-size",
          ("engine", "cache_max_entry_count"): "--cache-max-entry-count"}


def flag_limit(flag: str) -> limits.Limit:
    """The table's entry of a flag of plan: ``--max-batch-size`` -> ``limits.MAX_BATCH_SIZE``."""
    return getattr(limits, flag.lstrip("-").replace("-", "_").upper())


def with_value(key: tuple[str, ...], value: object) -> dict:
    data = json.loads(json.dumps(PRESET))
    data[key[0]][key[1]] = value
    return data


@pytest.mark.slow  # 120 plans through the CLI
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(key=st.sampled_from(sorted(SHARED)), data=st.data())
def test_a_preset_number_is_refused_exactly_where_its_flag_is_with_the_flags_rule(tmp_path, monkeypatch, key, data):
    flag = SHARED[key]
    limit = flag_limit(flag)
    edges = [0, 1, 64, 65, 128, 1024, 1025, 5000, 65536, 65537, 100000000, -1]
    value = data.draw(st.one_of(st.integers(-10, 10**9), st.sampled_from(edges)) if limit.whole else
                      st.one_of(st.floats(-10, 1e12, allow_nan=False), st.sampled_from([*edges, 0.5, 1.0, 0.999])))
    presets = Path(tempfile.mkdtemp(dir=tmp_path))  # a new file each time: presets are cached by path and mtime
    path = presets / "mine.yaml"
    path.write_text(yaml.safe_dump(with_value(key, value)))
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(presets))
    model = tiny_model(tmp_path, monkeypatch)
    by_flag = run(["plan", str(model), "--factor", "2", "--gpu-memory", "80", flag, repr(value)])
    by_preset = run(["plan", "mine", "--gpu-memory", "80", "--json"])
    rule = f": must be {limit.rule}"
    flag_refused = by_flag[2].startswith(f"launch: error: {flag} {repr(value)!r}: ")  # its range, or its model's
    preset_refused = by_preset[2].startswith(f"launch: error: invalid preset {path}: field '{'.'.join(key)}': ")
    assert flag_refused == preset_refused, (value, by_flag[2], by_preset[2])
    assert (rule in by_flag[2]) == (rule in by_preset[2]), (by_flag[2], by_preset[2])  # and by the same rule
    if preset_refused:
        assert by_preset[0] != 0 and by_preset[2].count("\n") == 1, by_preset[2]
        assert flag not in by_preset[2]  # the preset's key is named, not a flag the user never gave


@pytest.mark.parametrize("key, value, rule", [
    (("rope", "factor"), 5000, "must be a number greater than 1 and at most 1024, found 5000"),
    (("engine", "max_batch_size"), 100000000, "must be a whole number from 1 to 65,536, found 100000000"),
    (("engine", "tp"), 128, "must be a whole number from 1 to 64, found 128"),
])
def test_the_three_preset_disagreements_get_the_flags_answer(launch, tmp_path, key, value, rule):
    """Issue 16: a preset with factor 5000 planned a 163,840,000-token session, max_batch_size 1e8
    was accepted, tp 128 was refused as "--tp '128'", a flag the user never gave."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "mine.yaml").write_text(yaml.safe_dump(with_value(key, value)))
    result = launch("plan", "mine", "--gpu-memory", "80", env={"LAUNCH_PRESETS_DIR": str(presets)})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"launch: error: invalid preset {presets / 'mine.yaml'}: field '{'.'.join(key)}': {rule}\n"


@pytest.mark.parametrize("flag", ["--tp", "--replicas", "--nnodes", "--session-len", "--max-batch-size", "--port",
                                  "--gpu-memory", "--cache-max-entry-count", "--factor", "--node-rank"])
def test_tp_and_replicas_and_every_other_number_flag_answer_in_one_voice(launch, model_dir, flag):
    result = launch("plan", str(model_dir), "--factor", "2", "--gpu-memory", "80", flag, "x")
    assert result.returncode == 2 and result.stdout == ""
    limit = flag_limit(flag)
    assert result.stderr == f"launch: error: {flag} 'x': must be {limit.rule}, e.g. {flag} {limit.example}\n"


@pytest.mark.parametrize("command", ["probe", "ppl"])
@pytest.mark.parametrize("item", ["４000", "4_000", "０.５x", "1_5k", "٣k", "nanx", "0x10", "4\u00a0", "\u20038k"])
def test_a_length_is_written_in_ascii_digits_too(tmp_path, monkeypatch, command, item):
    """--lengths takes 4000, 8k and 1.5x: the number in each is read by the same grammar."""
    argv = base_argv(command, tiny_model(tmp_path, monkeypatch), tmp_path)
    code, out, err = run([*argv, "--lengths", f"2000,{item}"])
    assert code == 2 and out == "" and err.startswith(f"launch: error: --lengths {item!r}: not a whole token count"), err
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()
