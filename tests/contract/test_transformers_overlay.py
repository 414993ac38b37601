"""transformers loads launch's overlays: AutoConfig reads the written RoPE settings, and a tiny
random-weight Llama made by the test runs one forward pass past its native length on the CPU."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow  # processes, sockets or models: make test-fast leaves it out

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from launcher.model.tinymodel import make_tiny_llama
from launcher.plan.build import PlanRequest, build_plan, make_overlay

NATIVE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", native_context=NATIVE)


def overlay_of(tiny, tmp_path, **kw):
    plan = build_plan(PlanRequest(model=str(tiny), need_files=True, out=tmp_path / "overlay", **kw))
    return make_overlay(plan).path


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def logits(model, n):
    ids = torch.arange(4, 4 + n).remainder(1000).unsqueeze(0) + 20
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_autoconfig_and_tokenizer_load_from_the_overlay(tiny, tmp_path):
    path = overlay_of(tiny, tmp_path, factor="4", rope_type="yarn")
    config = transformers.AutoConfig.from_pretrained(str(path))
    params = config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0
    assert params["original_max_position_embeddings"] == NATIVE
    assert config.max_position_embeddings == 4 * NATIVE
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    assert tok("remember the pass key")["input_ids"][-1] == tok.convert_tokens_to_ids("key")
    assert os.path.islink(path / "tokenizer.json")


def test_dynamic_overlay_runs_past_native_and_changes_only_long_inputs(tiny, tmp_path):
    path = overlay_of(tiny, tmp_path, factor="2")
    assert json.loads((path / "config.json").read_text())["rope_scaling"]["rope_type"] == "dynamic"
    base, scaled = load(tiny), load(path)
    long_base, long_scaled = logits(base, 2 * NATIVE), logits(scaled, 2 * NATIVE)
    assert long_scaled.shape == (2 * NATIVE, base.config.vocab_size)
    assert torch.isfinite(long_scaled).all()
    # past the native length dynamic NTK changes the rotary base: the outputs differ ...
    assert not torch.allclose(long_base, long_scaled, atol=1e-4)
    # ... and within it nothing changes (max_position_embeddings stayed the NTK threshold)
    assert torch.allclose(logits(base, NATIVE // 2), logits(scaled, NATIVE // 2), atol=1e-5)


def test_yarn_overlay_runs_past_native(tiny, tmp_path):
    model = load(overlay_of(tiny, tmp_path, factor="2", rope_type="yarn"))
    out = logits(model, 2 * NATIVE - 1)
    assert torch.isfinite(out).all()
