"""build_plan with --context, a preset's recipe and a preset's prefix caching (config facts only: no files)."""

from __future__ import annotations

import pytest

from launcher.model.presets import InvalidPreset, builtin_presets_dir
from launcher.plan.build import PlanRequest, build_plan
from launcher.rules.prefixcache import PrefixCachingUnsafe


def user_preset(tmp_path, monkeypatch, base: str, name: str, extra: str) -> str:
    """A user preset: the built-in ``base`` renamed, with ``extra`` YAML lines appended."""
    text = (builtin_presets_dir() / f"{base}.yaml").read_text().replace(f"name: {base}\n", f"name: {name}\n")
    (tmp_path / f"{name}.yaml").write_text(text + extra)
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(tmp_path))
    return name


def test_a_presets_prefix_caching_is_left_off_with_a_warning_where_the_rule_forbids_it(tmp_path, monkeypatch):
    text = (builtin_presets_dir() / "internlm2_5-7b-chat.yaml").read_text()
    name = "cached"
    (tmp_path / f"{name}.yaml").write_text(
        text.replace("name: internlm2_5-7b-chat\n", f"name: {name}\n")
        .replace("quant_policy: 0}", "quant_policy: 0, enable_prefix_caching: true}"))
    monkeypatch.setenv("LAUNCH_PRESETS_DIR", str(tmp_path))
    plan = build_plan(PlanRequest(model=name))  # dynamic x2, a session of 65,536 over 32,768 positions
    assert plan.engine.config.enable_prefix_caching is False and plan.defaults_from["enable_prefix_caching"] == "preset"
    assert any("prefix caching is left off" in w for w in plan.warnings)
    within = build_plan(PlanRequest(model=name, context="16k"))
    assert within.engine.config.enable_prefix_caching is True and not within.warnings
    off = build_plan(PlanRequest(model=name, context="16k", enable_prefix_caching=False))  # --no-prefix-caching
    assert off.engine.config.enable_prefix_caching is False and off.defaults_from["enable_prefix_caching"] == "flag"
    with pytest.raises(PrefixCachingUnsafe):  # asked for by the user: refused, not dropped
        build_plan(PlanRequest(model=name, enable_prefix_caching=True))


def test_recipe_engine_values_are_defaults_only_where_the_recipe_is_used():
    plan = build_plan(PlanRequest(model="internlm2_5-7b-chat-1m", gpu_memory_gib="80"))
    assert (plan.settings.tp, plan.settings.max_batch_size, plan.settings.cache_max_entry_count) == (4, 1, 0.7)
    assert plan.defaults_from["tp"] == "recipe" and plan.defaults_from["backend"] == "preset"
    assert plan.recipe is not None and "OpenCompass" in plan.recipe.source and not plan.warnings
    flagged = build_plan(PlanRequest(model="internlm2_5-7b-chat-1m", tp="8", gpu_memory_gib="80"))
    assert flagged.settings.tp == 8 and flagged.defaults_from["tp"] == "flag"
    other = build_plan(PlanRequest(model="internlm2_5-7b-chat-1m", factor="3", gpu_memory_gib="80"))
    assert other.recipe is None and other.settings.tp == 1 and other.defaults_from["tp"] == "preset"
    assert other.decision.session_len == 3 * 262144


def test_a_recipe_whose_tp_does_not_divide_the_heads_is_refused_naming_its_key(tmp_path, monkeypatch):
    name = user_preset(tmp_path, monkeypatch, "llama-2-7b-chat", "badrecipe",
                       "recipe:\n  source: x\n  session_len: 16384\n  engine: {tp: 3}\n")
    with pytest.raises(InvalidPreset) as info:
        build_plan(PlanRequest(model=name))
    assert "recipe.engine.tp" in str(info.value)


def test_the_memory_advice_names_context_when_context_was_asked():
    plan = build_plan(PlanRequest(model="internlm2_5-7b-chat", context="1m", gpu_memory_gib="24"))
    assert plan.memory is not None and not plan.memory.fits
    assert any(tip.startswith("--context ") for tip in plan.memory.advice), plan.memory.advice
    assert not any(tip.startswith(("--session-len", "--factor")) for tip in plan.memory.advice)
