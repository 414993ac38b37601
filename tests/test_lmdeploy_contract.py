"""Contract with the INSTALLED lmdeploy: its own parsers read from launch's overlays exactly the
RoPE type, factor and threshold launch intended, for every preset and every type.

The readers run in a separate process (tests/lmdeploy_contract.py) because TurboMind's parser is
only importable on a CPU machine with a stand-in for its CUDA extension module, which must not leak
into this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.presets import preset_files
from launcher.rope import WRITABLE_TYPES

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def contract(tmp_path_factory):
    work = tmp_path_factory.mktemp("contract")
    env = {"PYTHONPATH": str(HERE.parent), "LAUNCH_CACHE_DIR": str(work / "cache"), "PATH": "/usr/bin:/bin",
           "HOME": str(work), "HF_HUB_OFFLINE": "1", "LAUNCH_PRESETS_DIR": str(work / "no-user-presets")}
    result = subprocess.run([sys.executable, str(HERE / "lmdeploy_contract.py"), str(work)],
                            capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def records(contract, engine):
    return [(r, r[engine]) for r in contract["records"]]


def test_the_standin_only_stood_in_for_the_cuda_extension(contract):
    # the subprocess reached TurboMind's Python parser through the stand-in extension module
    assert contract["standin_in_use"] is True


def test_every_preset_and_type_was_checked(contract):
    seen = {(r["preset"], r["rope_type"]) for r in contract["records"]}
    assert seen == {(name, t) for name in preset_files() for t in WRITABLE_TYPES}


@pytest.mark.parametrize("engine", ["turbomind", "pytorch"])
def test_engines_read_the_intended_type_factor_and_threshold(contract, engine):
    for record, read in records(contract, engine):
        want = record["intended"]
        where = f"{record['preset']} {record['rope_type']} ({engine})"
        assert read["type"] == want["type"], where
        assert read["factor"] == pytest.approx(want["factor"], rel=1e-9), where
        assert read["threshold"] == want["threshold"], where


def test_internlm_v1_rewrite_lands_on_a_turbomind_architecture(contract):
    v1 = next(r for r in contract["records"] if r["preset"] == "internlm-chat-7b" and r["rope_type"] == "dynamic")
    assert v1["arch"] == "LlamaForCausalLM"
    assert v1["turbomind_is_supported"] is True
    assert v1["turbomind"]["base"] == 10000.0


def test_turbomind_support_answers_match_lmdeploy(contract):
    answers = {r["preset"]: r["turbomind_is_supported"] for r in contract["records"] if "arch" in r}
    assert answers["mistral-7b-instruct-v0.2"] is False  # why that preset uses the PyTorch engine
    assert answers["qwen2.5-7b-instruct"] is True and answers["llama-3.1-8b-instruct"] is True


def test_launch_tables_match_lmdeploy(contract):
    assert contract["launch_turbomind_archs"] == contract["turbomind_archs"]
    assert contract["launch_turbomind_rope_types"] == contract["turbomind_rope_types"]


def test_the_hand_written_qwen_recipe_is_what_launch_repairs(contract):
    # yarn x4 with max_position_embeddings left at 32768: TurboMind reads factor 1.0
    assert contract["qwen_card_recipe_turbomind_factor"] == 1.0
    qwen = next(r for r in contract["records"] if r["preset"] == "qwen2.5-7b-instruct" and r["rope_type"] == "yarn")
    assert qwen["turbomind"]["factor"] == 4.0
