"""Issue 15's cases that no other test took through the real CLI: ``launch plan`` / ``launch patch`` on local
checkpoints, then the overlay read the way the engines read it (``lmdeploy.archs.get_model_arch`` with the
model's own config class, TurboMind's text-config choice and ``parse_rope_param``, the PyTorch engine's
``build_rotary_params``), in a separate process: TurboMind's parser needs the stand-in for its CUDA
extension that tests/contract/lmdeploy_contract.py installs, which must not leak into this process."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import INTERNVL_QWEN2, assert_one_line_error, tree_state

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

pytest.importorskip("lmdeploy")

REPO = Path(__file__).resolve().parents[2]
REMOTE_CODE = REPO / "tests" / "support" / "remote_code"
SECTION = [16, 24, 24]

# Runs in a fresh interpreter: each overlay read as serving reads it, plus what the PyTorch engine's mrope
# parameters hold (pytorch_reads keeps the section only).
_READER = """
import json, sys
from pathlib import Path
from tests.contract.lmdeploy_contract import (engines_read, install_standin, own_class_accepts,
                                              pytorch_text_config)
install_standin()
from lmdeploy.archs import get_model_arch
from lmdeploy.pytorch.nn.rotary_embedding import build_rotary_params
trust = sys.argv[1] == "1"
out = []
for path in sys.argv[2:]:
    record = engines_read(Path(path), trust, 64, False)
    record["own_class"] = own_class_accepts(Path(path), trust)
    arch, cfg = get_model_arch(path, trust_remote_code=trust)
    mrope = build_rotary_params(pytorch_text_config(arch, cfg)).get("mrope_params")
    record["pytorch_mrope_interleaved"] = None if mrope is None else bool(mrope.mrope_interleaved)
    out.append(record)
print(json.dumps(out))
"""


def read_as_served(*dirs: Path, trust: bool = False) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", _READER, "1" if trust else "0", *map(str, dirs)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def checkpoint(root: Path, name: str, config: dict, remote: tuple[str, ...] = ()) -> Path:
    d = root / name
    d.mkdir()
    for module in remote:
        shutil.copy(REMOTE_CODE / f"{module}.py", d / f"{module}.py")
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


def patched(launch, src: Path, out: Path, *args: str) -> tuple[Path, dict]:
    result = launch("patch", str(src), *args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    overlay = Path(result.stdout.strip().splitlines()[-1])
    return overlay, json.loads((overlay / "config.json").read_text())


def llama(max_pos: int, rope_scaling=None, **extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": max_pos,
            "rope_theta": 10000.0, "rope_scaling": rope_scaling, "num_hidden_layers": 2, "hidden_size": 256,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "torch_dtype": "bfloat16",
            **extra}


def read_tuple(reads: dict) -> tuple:
    return reads["type"], reads["factor"], reads["threshold"], reads["base"]


def test_internlm2_factor_3_over_its_shipped_dynamic_2_is_read_by_its_own_class(launch, tmp_path):
    # issue 15 case 1, second example: --factor 3 over a shipped {"type": "dynamic", "factor": 2.0}
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
              "max_position_embeddings": 32768, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
              "num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 1000, "torch_dtype": "bfloat16"}
    src = checkpoint(tmp_path, "internlm2", config, ("configuration_internlm2",))
    overlay, written = patched(launch, src, tmp_path / "out", "--factor", "3", "--trust-remote-code")
    assert written["rope_scaling"] == {"type": "dynamic", "factor": 3.0}
    [read] = read_as_served(overlay, trust=True)
    assert read["own_class"] == {"accepted": True, "class": "InternLM2Config"}
    assert read["loaded_class"] == "InternLM2Config" and read["fallback"] is False
    for engine in ("turbomind", "pytorch"):
        assert read_tuple(read[engine]) == ("dynamic", 3.0, 32768, 1e6), engine


def test_with_both_keys_plan_reports_and_patch_writes_the_scaling_lmdeploy_serves(launch, tmp_path):
    # issue 15 case 4, second example: rope_scaling dynamic x3 (the usual recipe, added by hand) over a
    # transformers-5 rope_parameters dynamic x2 with the base inside it
    config = llama(4096, {"type": "dynamic", "factor": 3.0})
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0}
    src = checkpoint(tmp_path, "both", config)
    [shipped] = read_as_served(src)
    assert shipped["turbomind"]["type"] == shipped["pytorch"]["type"] == "dynamic"
    assert shipped["turbomind"]["factor"] == shipped["pytorch"]["factor"] == 3.0  # what lmdeploy serves as shipped
    plan = json.loads(launch("plan", str(src), "--json").stdout)
    assert (plan["rope_type"], plan["factor"]) == ("dynamic", shipped["turbomind"]["factor"])

    overlay, written = patched(launch, src, tmp_path / "out", "--factor", "2")
    assert written["rope_scaling"]["factor"] == written["rope_parameters"]["factor"] == 2.0
    assert written["rope_scaling"]["rope_type"] == written["rope_parameters"]["rope_type"] == "dynamic"
    [read] = read_as_served(overlay)
    assert read["own_class"]["accepted"] and read["fallback"] is False
    for engine in ("turbomind", "pytorch"):
        assert read_tuple(read[engine]) == ("dynamic", 2.0, 4096, 500000.0), engine


def _qwen2_5_vl_saved() -> dict:
    """Qwen2.5-VL as transformers 5 saves it: the language model under text_config, rope_parameters with
    rope_type default, the mrope section and mrope_interleaved."""
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "vision_config": {"depth": 1}, "torch_dtype": "bfloat16",
            "text_config": {"model_type": "qwen2_5_vl_text", "max_position_embeddings": 32768, "hidden_size": 256,
                            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
                            "vocab_size": 1000,
                            "rope_parameters": {"mrope_section": SECTION, "mrope_interleaved": True,
                                                "rope_theta": 1000000.0, "rope_type": "default"}}}


def _qwen2_5_vl_flat() -> dict:
    """One level, rope_scaling carrying the section with rope_type default (the issue's form)."""
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "max_position_embeddings": 32768, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": SECTION},
            "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "vocab_size": 1000, "vision_config": {"depth": 1}, "torch_dtype": "bfloat16"}


def test_qwen2_5_vl_keeps_its_mrope_section_and_interleaving_through_every_type(launch, tmp_path):
    # issue 15 case 3 for Qwen2.5-VL, and requirement 2: mrope_section / mrope_interleaved read back unchanged
    cases = [("saved", _qwen2_5_vl_saved(), ("--factor", "2"), ("dynamic", 2.0, 32768), True),
             ("saved", _qwen2_5_vl_saved(), ("--factor", "4", "--type", "yarn"), ("yarn", 4.0, 32768), True),
             ("flat", _qwen2_5_vl_flat(), ("--factor", "2", "--type", "linear"), ("linear", 2.0, None), False)]
    overlays = []
    for i, (name, config, args, _want, _interleaved) in enumerate(cases):
        src = checkpoint(tmp_path, f"{name}{i}", config)
        overlay, written = patched(launch, src, tmp_path / f"out{i}", *args)
        section = written.get("text_config", written)
        settings = section["rope_parameters"] if "rope_parameters" in section else section["rope_scaling"]
        assert settings["mrope_section"] == SECTION
        assert settings.get("mrope_interleaved", False) is _interleaved
        overlays.append(overlay)
    for (name, _config, args, want, interleaved), read in zip(cases, read_as_served(*overlays), strict=True):
        where = (name, args)
        assert read["loaded_class"] == "Qwen2_5_VLConfig" and read["fallback"] is False, where
        assert read["own_class"]["accepted"], where
        assert read["turbomind_text_class"] == "Qwen2_5_VLTextConfig", where
        for engine in ("turbomind", "pytorch"):
            assert read_tuple(read[engine])[:3] == want and read[engine]["base"] == 1e6, (where, engine)
            assert read[engine]["mrope_section"] == SECTION, (where, engine)
        assert read["pytorch_mrope_interleaved"] is interleaved, where


@pytest.mark.parametrize("command", ["plan", "patch"])
def test_a_yarn_factor_that_rounds_away_is_one_line_and_nothing_is_written(launch, tmp_path, command):
    # issue 15 case 5: --factor 1.0001 --type yarn over N = 4,097 is read as x1 by TurboMind
    src = checkpoint(tmp_path, "odd", llama(4097))
    before = tree_state(tmp_path)
    out = tmp_path / "out"
    result = launch(command, str(src), "--factor", "1.0001", "--type", "yarn",
                    *(["--out", str(out)] if command == "patch" else []))
    assert_one_line_error(result, "yarn x1.0001", "4,097", "x1 (no extension)", code=2)
    assert not out.exists() and tree_state(tmp_path) == before
    assert not (Path(os.environ["XDG_CACHE_HOME"]) / "launch").exists()


# --- the three cases the verification of issue 15 found open ---------------------------------------------

# Runs in a fresh interpreter: what lmdeploy's get_model_arch makes of each directory (its class, or what it
# raised), and whether transformers' AutoConfig loads it.
_LOADER = """
import json, sys
from pathlib import Path
from tests.contract.lmdeploy_contract import own_class_accepts
from lmdeploy.archs import get_model_arch
from transformers import PretrainedConfig
trust = sys.argv[1] == "1"
out = []
for path in sys.argv[2:]:
    try:
        _arch, cfg = get_model_arch(path, trust_remote_code=trust)
        lmdeploy = {"class": type(cfg).__name__, "fallback": type(cfg) is PretrainedConfig}
    except Exception as err:
        lmdeploy = {"raised": type(err).__name__, "error": str(err)[:300]}
    out.append({"lmdeploy": lmdeploy, "own_class": own_class_accepts(Path(path), trust)})
print(json.dumps(out))
"""


def loaded(*dirs: Path, trust: bool) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", _LOADER, "1" if trust else "0", *map(str, dirs)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def internlm2_config(rope_scaling) -> dict:
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}, "max_position_embeddings": 32768,
            "rope_theta": 1000000, "rope_scaling": rope_scaling, "num_hidden_layers": 2, "hidden_size": 256,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "torch_dtype": "bfloat16"}


def test_an_integer_factor_shipped_by_internlm2_is_written_as_the_float_its_own_class_reads(launch, tmp_path):
    src = checkpoint(tmp_path, "il2-int", internlm2_config({"type": "dynamic", "factor": 2}),
                     ("configuration_internlm2",))
    [shipped] = loaded(src, trust=True)
    assert not shipped["own_class"]["accepted"] and shipped["lmdeploy"]["fallback"]  # why it must be rewritten
    overlays = []
    for i, args in enumerate((("--factor", "2"), ())):
        result = launch("patch", str(src), *args, "--trust-remote-code", "--out", str(tmp_path / f"out{i}"))
        assert result.returncode == 0, result.stderr
        assert "read by: InternLM2Config" in result.stderr
        overlay = Path(result.stdout.strip().splitlines()[-1])
        assert json.loads((overlay / "config.json").read_text())["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
        overlays.append(overlay)
    for read in read_as_served(*overlays, trust=True):
        assert read["own_class"] == {"accepted": True, "class": "InternLM2Config"}
        assert read["loaded_class"] == "InternLM2Config" and read["fallback"] is False
        for engine in ("turbomind", "pytorch"):
            assert read_tuple(read[engine]) == ("dynamic", 2.0, 32768, 1e6), engine


def phi3_config(rope_scaling=None) -> dict:
    return {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
            "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"}, "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": rope_scaling,
            "num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
            "vocab_size": 1000, "torch_dtype": "bfloat16"}


def test_phi3s_own_class_and_transformers_refuse_every_dict_launch_could_write(launch, tmp_path):
    # why launch refuses every type for Phi-3: each dict launch writes for any reader (the two-field form and
    # the type + rope_type pair, with max_position_embeddings as written), loaded the way lmdeploy loads it
    from launcher.rules.readers import WRITABLE_TYPES
    from launcher.rules.rope import RopeRequest, apply, decide

    shapes = {"two-field": ({"auto_map": {"AutoConfig": "x--configuration_custom.CustomConfig"}}, ("dynamic", "linear")),
              "pair": ({"model_type": "llama", "auto_map": None}, WRITABLE_TYPES)}
    dirs = []
    for name, (change, types) in shapes.items():
        for rope_type in types:
            base = {**phi3_config(), **change}
            written = apply(base, decide(base, RopeRequest(factor=2.0, rope_type=rope_type)))
            config = {**phi3_config(written["rope_scaling"]), "max_position_embeddings": written["max_position_embeddings"]}
            dirs.append(checkpoint(tmp_path, f"{name}-{rope_type}", config, ("configuration_phi3",)))
    longrope = {"type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32}  # head_dim 64 / 2
    controls = [checkpoint(tmp_path, "as-shipped", phi3_config(), ("configuration_phi3",)),
                checkpoint(tmp_path, "longrope", {**phi3_config(longrope), "max_position_embeddings": 131072},
                           ("configuration_phi3",))]
    for trust in (True, False):  # its own code, and transformers' own Phi3Config
        *reads, shipped, own_longrope = loaded(*dirs, *controls, trust=trust)
        assert shipped["own_class"] == own_longrope["own_class"] == {"accepted": True, "class": "Phi3Config"}
        for path, read in zip(dirs, reads, strict=True):
            assert not read["own_class"]["accepted"], (path.name, trust)
            # lmdeploy then falls back (dynamic, linear) or cannot load the config at all (yarn, llama3)
            assert read["lmdeploy"].get("fallback") or read["lmdeploy"].get("raised") == "AttributeError", path.name
    result = launch("plan", str(controls[0]), "--factor", "2", "--trust-remote-code")
    assert_one_line_error(result, "Phi3Config", "holds only longrope", code=2)


def custom_config(rope_scaling=None) -> dict:
    """A checkpoint whose own class (tests/support/remote_code/configuration_custom.py) launch has not read."""
    return {"architectures": ["CustomForCausalLM"], "model_type": "custom",
            "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}, "max_position_embeddings": 4096,
            "rope_theta": 10000.0, "rope_scaling": rope_scaling, "num_hidden_layers": 2, "hidden_size": 256,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "torch_dtype": "bfloat16"}


def test_a_class_launch_does_not_know_gets_dynamic_with_a_warning_and_yarn_refused(launch, tmp_path):
    src = checkpoint(tmp_path, "custom", custom_config(), ("configuration_custom",))
    result = launch("patch", str(src), "--factor", "2", "--trust-remote-code", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    [note] = [line for line in result.stderr.splitlines() if "does not know" in line]
    assert "CustomConfig (configuration_custom.py" in note and "launch serve reads the overlay" in note
    overlay = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((overlay / "config.json").read_text())["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    [read] = read_as_served(overlay, trust=True)
    assert read["own_class"] == {"accepted": True, "class": "CustomConfig"} and read["fallback"] is False
    assert read_tuple(read["pytorch"]) == ("dynamic", 2.0, 4096, 10000.0)
    assert read_tuple(read["turbomind"]) == ("dynamic", 2.0, 4096, 10000.0)

    before = tree_state(tmp_path)
    for rope_type in ("yarn", "llama3"):
        out = tmp_path / f"refused-{rope_type}"
        result = launch("patch", str(src), "--factor", "4", "--type", rope_type, "--force", "--trust-remote-code",
                        "--out", str(out))
        assert_one_line_error(result, "CustomConfig", "not one launch knows", "generic fallback cannot read", code=2)
        assert not out.exists()
    assert tree_state(tmp_path) == before
    # the message's reason, measured: the class refuses a yarn / llama3 dict, and lmdeploy's fallback cannot
    # read it either (written by hand here, as launch would have with --force before)
    by_hand = []
    for rope_type, extra in (("yarn", {}), ("llama3", {"low_freq_factor": 1.0, "high_freq_factor": 4.0})):
        scaling = {"type": rope_type, "rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": 4096,
                   **extra}
        config = {**custom_config(scaling), "max_position_embeddings": 16384}
        by_hand.append(checkpoint(tmp_path, f"by-hand-{rope_type}", config, ("configuration_custom",)))
    for read in loaded(*by_hand, trust=True):
        assert not read["own_class"]["accepted"]
        assert read["lmdeploy"]["raised"] == "AttributeError" and "max_position_embeddings" in read["lmdeploy"]["error"]


_LINEAR_ONLY = '''
from transformers import PretrainedConfig


class LinearOnlyConfig(PretrainedConfig):
    """A rule launch has not read: linear scaling only."""
    model_type = "linearonly"

    def __init__(self, max_position_embeddings=2048, rope_theta=10000.0, rope_scaling=None, **kwargs):
        if rope_scaling is not None and rope_scaling.get("type") != "linear":
            raise ValueError(f"linear scaling only, got {rope_scaling}")
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        super().__init__(**kwargs)
'''


def test_launch_serve_stops_on_an_overlay_a_class_launch_does_not_know_refuses(launch, tmp_path):
    # the warning's promise: serve reads the overlay with the checkpoint's own class before any weight
    pytest.importorskip("lmdeploy")
    from launcher.engine.readback import readback_problem

    config = {**custom_config(), "model_type": "linearonly",
              "auto_map": {"AutoConfig": "configuration_linearonly.LinearOnlyConfig"}}
    src = checkpoint(tmp_path, "linear-only", config)
    (src / "configuration_linearonly.py").write_text(_LINEAR_ONLY)
    result = launch("patch", str(src), "--factor", "2", "--trust-remote-code", "--out", str(tmp_path / "out"))
    assert result.returncode == 0 and "launch does not know the RoPE rule of LinearOnlyConfig" in result.stderr
    overlay = Path(result.stdout.strip().splitlines()[-1])
    problem = readback_problem(overlay, trust_remote_code=True)
    assert problem.startswith("the model's own config class LinearOnlyConfig refuses the overlay's config.json")
    assert "linear scaling only" in problem and "\n" not in problem
    linear = launch("patch", str(src), "--factor", "2", "--type", "linear", "--trust-remote-code",
                    "--out", str(tmp_path / "out-linear"))
    assert readback_problem(Path(linear.stdout.strip().splitlines()[-1]), trust_remote_code=True) is None


def test_an_internvl_with_a_qwen2_llm_is_read_as_the_plan_says(launch, tmp_path):
    config = copy.deepcopy(INTERNVL_QWEN2)
    src = checkpoint(tmp_path, "ivl-qwen2", config, ("configuration_internvl_chat", "configuration_internlm2"))
    for trust in (False, True):
        flag = ("--trust-remote-code",) if trust else ()
        plan = json.loads(launch("plan", str(src), "--factor", "2", *flag, "--json").stdout)
        overlay, written = patched(launch, src, tmp_path / f"out{int(trust)}", "--factor", "2", *flag)
        assert written["llm_config"]["rope_scaling"] == {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}
        [read] = read_as_served(overlay, trust=trust)
        # the plan's "generic fallback" is lmdeploy's, and its "own class" is InternVLChatConfig with Qwen2Config
        assert read["fallback"] is (plan["reader"]["read_through"] == "generic fallback") is (not trust)
        if not trust:  # the plan's warning says why: the class that would check the overlay is not run
            assert any("InternVLChatConfig" in w and "--trust-remote-code" in w for w in plan["warnings"])
            assert not read["own_class"]["accepted"]
            continue
        assert read["loaded_class"] == plan["reader"]["outer"]["class"] == "InternVLChatConfig"
        assert read["turbomind_text_class"] == plan["reader"]["class"] == "Qwen2Config"
        assert read["own_class"] == {"accepted": True, "class": "InternVLChatConfig"}
        for engine in ("turbomind", "pytorch"):
            assert read_tuple(read[engine]) == ("dynamic", 2.0, 32768, 1e6), engine
