"""The README's contract for `patch` and `plan`, over generated configs and flags (issue 9).

Each example builds a fresh world (a local model directory with a generated config.json, $HOME,
launch's cache, an HF cache, an --out that may already hold something) and runs the CLI in-process.
Then, on every example, exactly one of:

* success: the overlay (patch) or the plan (plan --json) is read by the installed lmdeploy's own
  PyTorch-engine parser (``build_rotary_params``) as the type, factor and threshold launch said it
  planned; the session fits lmdeploy's int32; nothing outside the overlay changed;
* refusal: exit != 0, exactly one ``launch: error:`` line on stderr, no traceback, nothing on
  stdout, and every watched tree (source, --out, HF cache, launch's cache, $HOME) unchanged byte
  for byte.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.cli import main
from tests.conftest import tree_state

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

REPO = Path(__file__).resolve().parents[2]

INT32_MAX = 2**31 - 1
_ENV = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "LAUNCH_CACHE_DIR", "LAUNCH_PRESETS_DIR")

# --- generated configs --------------------------------------------------------------------------

GOOD_POSITIVE = st.sampled_from([1, 2, 4, 8, 16, 32])
BAD_NUMBER = st.sampled_from([0, -1, -4, "abc", "4096", [128], {"n": 1}, True, False, 1e30, 2.5, float("nan"),
                              2**40, None])


def pick(draw, bad: bool, good, hostile):
    """A good value, or (in a hostile example, one time in three) a hostile one."""
    if bad and draw(st.integers(0, 2)) == 0:
        return draw(hostile)
    return draw(good)


@st.composite
def rope_settings(draw, bad: bool) -> dict:
    settings: dict = {}
    rope_type = pick(draw, bad, st.sampled_from(["dynamic", "linear", "yarn", "llama3", "default", None]),
                     st.sampled_from(["longrope", 5, "", "mrope"]))
    if rope_type is not None:
        settings[draw(st.sampled_from(["type", "rope_type"]))] = rope_type
    factor = pick(draw, bad, st.sampled_from([2.0, 4.0, 8.0, 1.0, None]), st.sampled_from(["2", 1e305, True, -3, 0.5]))
    if factor is not None:
        settings["factor"] = factor
    if draw(st.booleans()):
        settings["original_max_position_embeddings"] = pick(draw, bad, st.sampled_from([128, 256, 4096]), BAD_NUMBER)
    if rope_type == "llama3" and draw(st.booleans()):
        settings.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return settings


@st.composite
def configs(draw):
    bad = draw(st.booleans())

    def num(good):
        return pick(draw, bad, good, BAD_NUMBER)

    config = {
        "architectures": pick(draw, bad, st.sampled_from([["LlamaForCausalLM"], ["InternLMForCausalLM"]]),
                              st.sampled_from([5, "LlamaForCausalLM", [], [3]])),
        "model_type": "llama",
        "max_position_embeddings": num(st.sampled_from([128, 256, 4096, 32768])),
        "num_hidden_layers": num(GOOD_POSITIVE),
        "hidden_size": num(st.sampled_from([64, 128])),
        "num_attention_heads": num(st.sampled_from([4, 8])),
        "torch_dtype": pick(draw, bad, st.sampled_from(["float16", "bfloat16"]), st.just(16)),
    }
    for key, good in (("num_key_value_heads", st.sampled_from([1, 2, 4])), ("head_dim", st.sampled_from([16, 32]))):
        if draw(st.booleans()):
            config[key] = num(good)
    if config["architectures"] == ["InternLMForCausalLM"] and draw(st.booleans()):
        config["rotary"] = {"base": pick(draw, bad, st.sampled_from([10000.0, 1e6]), st.sampled_from(["abc", -1]))}
    shape = pick(draw, bad, st.sampled_from(["none", "null", "rope_scaling", "rope_parameters"]),
                 st.sampled_from(["per_attention", "bad"]))
    if shape == "null":
        config["rope_scaling"] = None
    elif shape == "rope_scaling":
        config["rope_scaling"] = draw(rope_settings(bad))
        config["rope_theta"] = pick(draw, bad, st.sampled_from([10000.0, 1e6]), st.just("big"))
    elif shape == "rope_parameters":  # transformers 5: rope_theta inside
        theta = pick(draw, bad, st.sampled_from([10000.0, 1e6]), st.just("x"))
        config["rope_parameters"] = {**draw(rope_settings(bad)), "rope_theta": theta}
    elif shape == "per_attention":  # Gemma 3 under transformers 5
        config["rope_parameters"] = {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
    elif shape == "bad":
        config["rope_scaling"] = draw(st.sampled_from(["dynamic", 2, [1]]))
    wrap = pick(draw, bad, st.sampled_from(["top", "top", "text_config", "llm_config", "deep"]),
                st.sampled_from(["deeper", "list"]))
    if wrap in ("text_config", "llm_config"):
        return {"architectures": ["SomeVLM"], "vision_config": {}, wrap: config}
    if wrap in ("deep", "deeper"):
        nested: object = 1
        for _ in range(10 if wrap == "deep" else 70):
            nested = {"x": nested}
        return {**config, "extra": nested}
    if wrap == "list":
        return [config]
    return config


# --- generated flags ----------------------------------------------------------------------------

GOOD_OUT = ("none", "fresh", "deep/fresh", "empty", "own")
HOSTILE_OUT = ("own+user", "foreign", "file", "''", "long", "control", "hf")
OUT = st.one_of(st.sampled_from(GOOD_OUT), st.sampled_from(GOOD_OUT), st.sampled_from(HOSTILE_OUT))


@st.composite
def flags(draw):
    bad = draw(st.booleans())
    argv: list[str] = []
    factor = pick(draw, bad, st.sampled_from([None, "2", "1.5", "4", "8"]),
                  st.sampled_from(["0", "-1", "1", "abc", "1e305", "nan", "inf", "\uff13", ""]))
    if factor is not None:
        argv += ["--factor", factor]
    rope_type = pick(draw, bad, st.sampled_from([None, None, "dynamic", "linear", "yarn", "llama3"]),
                     st.sampled_from(["bogus", "DYNAMIC", ""]))
    if rope_type is not None:
        argv += ["--type", rope_type]
    session = pick(draw, bad, st.sampled_from([None, None, "100", "1000"]),
                   st.sampled_from(["0", "-5", str(2**40), "x"]))
    if session is not None:
        argv += ["--session-len", session]
    if draw(st.booleans()):
        argv.append("--force")
    return argv


# --- the world each example runs in -------------------------------------------------------------


@contextmanager
def world():
    saved = {k: os.environ.get(k) for k in _ENV}
    with tempfile.TemporaryDirectory(prefix="launch-prop-") as tmp:
        root = Path(tmp)
        home = root / "home"
        (home / ".cache").mkdir(parents=True)
        (home / "notes.txt").write_text("the user's own")
        os.environ.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
                          XDG_CONFIG_HOME=str(home / ".config"), HF_HOME=str(home / "hf"))
        for key in ("LAUNCH_CACHE_DIR", "LAUNCH_PRESETS_DIR"):
            os.environ.pop(key, None)
        try:
            yield root
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def make_source(root: Path, config) -> Path:
    src = root / "src" / "model"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(config, allow_nan=True))
    (src / "model.safetensors").write_bytes(b"\0" * 128)
    (root / "shared").mkdir()
    (root / "shared" / "tokenizer.json").write_text("{}")
    os.symlink("../../shared", src / "tokdir")
    return src


def prepare_out(root: Path, src: Path, kind: str) -> str | None:
    """Make --out's place hold what ``kind`` says; returns the --out text (None: no --out)."""
    target = root / "out" / "ov"
    (root / "out").mkdir()
    if kind == "none":
        return None
    if kind in ("fresh", "deep/fresh"):
        return str(root / "out" / kind)
    if kind == "empty":
        target.mkdir()
    elif kind in ("own", "own+user"):
        from launcher.model.overlay import build_overlay

        build_overlay(src, {"max_position_embeddings": 1}, {"tool": "launch"}, target)
        if kind == "own+user":
            (target / "user.txt").write_text("mine")
    elif kind == "foreign":
        target.mkdir()
        (target / "launch-patch.json").write_text("{}")
        (target / "thesis.tex").write_text("mine")
    elif kind == "file":
        target.write_text("a file")
    elif kind == "''":
        return ""
    elif kind == "long":
        return str(root / "out" / ("n" * 300))
    elif kind == "control":
        return str(root / "out" / "a\x1bb")
    elif kind == "hf":
        return str(root / "home" / "hf" / "hub" / "ov")
    return str(target)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# --- what lmdeploy reads ------------------------------------------------------------------------

_NAMES = {"DynamicNTKScaling": "dynamic", "LinearScaling": "linear", "Yarn": "yarn", "Llama3": "llama3",
          "Default": "default"}


def _text_section(config: dict) -> dict:
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(key), dict):
            return config[key]
    return config


def lmdeploy_reads(section: dict, build_rotary_params) -> dict:
    """The installed lmdeploy PyTorch engine's reading of a config section (attributes as a
    transformers config carries them: rope_parameters only when the config has it)."""
    rope = section.get("rope_parameters", section.get("rope_scaling"))
    attrs = {"rope_scaling": rope, "max_position_embeddings": section["max_position_embeddings"]}
    if "rope_parameters" in section:
        attrs["rope_parameters"] = rope
    params = build_rotary_params(SimpleNamespace(**attrs))
    rope_type = _NAMES[params["emb_type"].name]
    if rope_type == "yarn":
        threshold = params.get("max_position_embeddings", section["max_position_embeddings"])
    elif rope_type == "llama3":
        threshold = params["llama3_params"].original_max_position_embeddings
    elif rope_type == "dynamic":
        threshold = section["max_position_embeddings"]
    else:
        threshold = None
    return {"type": rope_type, "factor": float(params.get("scaling_factor", 1.0)), "threshold": threshold}


# Every success is also handed, at the end, to TurboMind's own parser (in a subprocess: it needs a
# stand-in for its CUDA extension, see tests/contract/lmdeploy_contract.py).
TURBOMIND_CASES: list[dict] = []

_TURBOMIND_READER = r"""
import json, sys
from tests.contract.lmdeploy_contract import install_standin
install_standin()
from lmdeploy.turbomind.models.utils import parse_rope_param
out = []
for case in json.load(open(sys.argv[1])):
    p, max_pos = parse_rope_param(case["section"], 64)
    threshold = {"dynamic": p.max_position_embeddings, "yarn": p.max_position_embeddings,
                 "llama3": p.original_max_position_embeddings}.get(p.type)
    out.append({"type": p.type, "factor": float(p.factor), "threshold": threshold})
print(json.dumps(out))
"""


def turbomind_reads(cases: list[dict], workdir: Path) -> list[dict]:
    path = workdir / "cases.json"
    path.write_text(json.dumps([{"section": c["section"]} for c in cases]))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", _TURBOMIND_READER, str(path)], capture_output=True, text=True,
                            timeout=300, env=env, cwd=str(REPO), check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def check_read_as_planned(read: dict, rope_type: str, factor: float, native: int) -> None:
    assert read["type"] == rope_type, read
    assert math.isclose(read["factor"], factor), read
    if rope_type != "linear":
        assert read["threshold"] == native, read


_WRITTEN = re.compile(r"^(written|reused): (\w+) x(\S+), native (\d+), session_len (\d+), \d+ linked files$")


def check_patch_success(root: Path, src: Path, out_text: str | None, before: dict, out: str, err: str,
                        build_rotary_params) -> None:
    lines = err.splitlines()
    assert all(line.startswith(("warning: ", "read by: ")) for line in lines[:-1]), err
    summary = _WRITTEN.match(lines[-1])
    assert summary, err
    rope_type, factor, native, session = summary[2], float(summary[3]), int(summary[4]), int(summary[5])
    assert 0 < session <= INT32_MAX
    overlay = Path(out.splitlines()[-1])
    if out_text is not None:
        assert overlay == Path(out_text)
    else:
        assert overlay.parent == root / "home" / ".cache" / "launch" / "overlays"
    written = json.loads((overlay / "config.json").read_text())
    check_read_as_planned(lmdeploy_reads(_text_section(written), build_rotary_params), rope_type, factor, native)
    TURBOMIND_CASES.append({"section": _text_section(written), "type": rope_type, "factor": factor, "native": native})
    # complete: every file of the source (the linked tokenizer directory included) is there
    assert (overlay / "tokdir" / "tokenizer.json").read_text() == "{}"
    assert (overlay / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    # nothing else changed: the overlay's own tree is the only difference
    rel = str(overlay.relative_to(root))
    after = {k: v for k, v in tree_state(root).items() if not (k == rel or k.startswith(rel + "/"))}
    kept = {k: v for k, v in before.items() if not (k == rel or k.startswith(rel + "/"))}
    created_parents = {k for k in set(after) - set(kept) if after[k] == "dir" and rel.startswith(k + "/")}
    assert {k: v for k, v in after.items() if k not in created_parents} == kept


def check_plan_success(root: Path, before: dict, out: str, build_rotary_params) -> None:
    plan = json.loads(out)
    assert 0 < plan["session_len"] <= INT32_MAX
    assert plan["kv_cache"]["bytes_per_token"] > 0
    section = {plan["rope_key"].split(".")[-1]: plan["rope_scaling"],
               "max_position_embeddings": plan["max_position_embeddings"]}
    check_read_as_planned(lmdeploy_reads(section, build_rotary_params), plan["rope_type"], plan["factor"],
                          plan["native_context"])
    TURBOMIND_CASES.append({"section": section, "type": plan["rope_type"], "factor": plan["factor"],
                            "native": plan["native_context"]})
    assert tree_state(root) == before


def check_refusal(root: Path, before: dict, code: int, out: str, err: str) -> None:
    assert code != 0, (out, err)
    assert out == "", out
    assert err.count("\n") == 1 and err.startswith("launch: error: "), err
    assert "Traceback" not in err
    assert tree_state(root) == before


def test_patch_and_plan_keep_the_contract_over_generated_configs_and_flags(capsys, tmp_path):
    # Imported here, under the test's own HOME (importing lmdeploy writes a cache there).
    from lmdeploy.pytorch.nn.rotary_embedding import build_rotary_params

    outcomes: dict[str, int] = {}
    TURBOMIND_CASES.clear()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(config=configs(), argv=flags(), command=st.sampled_from(["patch", "plan"]), out_kind=OUT)
    def check(config, argv, command, out_kind):
        with world() as root:
            src = make_source(root, config)
            args = [command, str(src), *argv]
            out_text = None
            if command == "patch":
                out_text = prepare_out(root, src, out_kind)
                if out_text is not None:
                    args += ["--out", out_text]
            else:
                args += ["--json", "--gpu-memory", "80"]
            before = tree_state(root)
            code, out, err = run_cli(capsys, args)
            if code == 0:
                outcomes[f"{command} success"] = outcomes.get(f"{command} success", 0) + 1
                if command == "patch":
                    assert out_kind not in HOSTILE_OUT
                    check_patch_success(root, src, out_text, before, out, err, build_rotary_params)
                else:
                    check_plan_success(root, before, out, build_rotary_params)
            else:
                outcomes[f"{command} refusal"] = outcomes.get(f"{command} refusal", 0) + 1
                check_refusal(root, before, code, out, err)

    check()
    # The generators reach both sides of the contract (else the test would prove little).
    assert all(outcomes.get(f"{c} {o}", 0) >= 5 for c in ("patch", "plan") for o in ("success", "refusal")), outcomes

    # TurboMind reads every successful overlay and plan as planned too. (It takes yarn's factor
    # from max_position_embeddings / original, which launch writes as round(N x F).)
    cases = TURBOMIND_CASES[:]
    assert len(cases) == outcomes["patch success"] + outcomes["plan success"]
    reads = turbomind_reads(cases, tmp_path)
    assert len(reads) == len(cases), (len(reads), len(cases))  # one reading per case, none skipped
    for case, read in zip(cases, reads, strict=True):
        assert read["type"] == case["type"], (case, read)
        assert math.isclose(read["factor"], case["factor"], rel_tol=0.01), (case, read)
        if case["type"] != "linear":
            assert read["threshold"] == case["native"], (case, read)
