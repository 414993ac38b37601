"""Reads launch's overlays the way the INSTALLED lmdeploy's engines do and prints what they read.

Run by tests/contract/test_lmdeploy_contract.py in a separate process, because reaching TurboMind's
pure-Python RoPE parser (``lmdeploy.turbomind.models.utils.parse_rope_param``) on a machine without
CUDA needs a STAND-IN for TurboMind's CUDA extension module in ``sys.modules``; that must never
leak into a process that serves or into other tests. The stand-in only satisfies module-level
attribute lookups made at import time; nothing called here calls into it.

Each case is a checkpoint directory (its ``config.json`` and, for families whose config class ships
with the checkpoint, that class's code from tests/support/remote_code/, named by ``auto_map``). launch plans
and writes its overlay; then, as serving does:

1. ``lmdeploy.archs.get_model_arch(overlay, trust_remote_code)``: transformers' ``AutoConfig`` (the
   model's own class), or lmdeploy's generic fallback when that raises; which one is recorded;
2. ``AutoConfig.from_pretrained`` alone: does the model's own class accept the overlay;
3. the text config TurboMind's model class takes (``source_model_config``, then the architecture's own
   choice: ``text_config`` for qwen2_vl, ``llm_config`` before ``text_config`` for InternVL);
4. ``parse_rope_param`` on it (TurboMind) and ``build_rotary_params`` / ``get_rope_theta`` (PyTorch).

Usage: python tests/contract/lmdeploy_contract.py WORKDIR  -> one JSON object on stdout.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REMOTE_CODE = HERE.parent / "support" / "remote_code"
# The config classes that come with checkpoints (tests/support/remote_code/), by model_type.
AUTO_MAP = {
    "internlm2": "configuration_internlm2.InternLM2Config",
    "internlm3": "configuration_internlm3.InternLM3Config",
    "internvl_chat": "configuration_internvl_chat.InternVLChatConfig",
}


class _StandIn:
    """Stand-in for attributes of lmdeploy.turbomind._turbomind (the CUDA extension)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, key: str) -> _StandIn:
        if key.startswith("__"):
            raise AttributeError(key)
        return _StandIn(f"{self._name}.{key}")

    def __call__(self, *args, **kwargs) -> _StandIn:
        return _StandIn(f"{self._name}()")

    def __hash__(self) -> int:
        return hash(self._name)

    def __eq__(self, other) -> bool:
        return isinstance(other, _StandIn) and other._name == self._name

    def __mro_entries__(self, bases):  # lmdeploy subclasses some extension classes at import
        return (object,)


def install_standin() -> None:
    import torch  # noqa: F401  (lmdeploy imports it first too; must not see the stand-in)

    module = types.ModuleType("lmdeploy.turbomind._turbomind")

    def module_getattr(key: str):
        if key.startswith("__"):
            raise AttributeError(key)
        return _StandIn(key)

    module.__getattr__ = module_getattr  # type: ignore[attr-defined]
    module.__file__ = "<stand-in for the TurboMind CUDA extension>"
    sys.modules["lmdeploy.turbomind._turbomind"] = module


# --- the cases ----------------------------------------------------------------------------------


def _llama(max_pos=4096, rope_scaling=None, **extra) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": max_pos,
              "rope_theta": 10000.0, "rope_scaling": rope_scaling, "num_hidden_layers": 2, "hidden_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "torch_dtype": "bfloat16"}
    config.update(extra)
    return config


def _internlm2(rope_scaling) -> dict:
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "max_position_embeddings": 32768,
            "rope_theta": 1000000, "rope_scaling": rope_scaling, "num_hidden_layers": 2, "hidden_size": 256,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "torch_dtype": "bfloat16"}


def _qwen2_vl_flat(rope_scaling) -> dict:
    """Qwen2-VL's config as published (one level; ``"type": "mrope"``)."""
    return {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_scaling": rope_scaling,
            "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "vocab_size": 1000, "vision_config": {"depth": 1}, "torch_dtype": "bfloat16"}


def _qwen2_vl_saved() -> dict:
    """Qwen2-VL's config as transformers 5 saves it (language model under text_config,
    ``rope_parameters`` with ``rope_type`` default and the mrope section)."""
    return {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "vision_config": {"depth": 1}, "torch_dtype": "bfloat16",
            "text_config": {"model_type": "qwen2_vl_text", "max_position_embeddings": 32768, "hidden_size": 256,
                            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
                            "vocab_size": 1000,
                            "rope_parameters": {"mrope_section": [16, 24, 24], "rope_theta": 1000000.0,
                                                "rope_type": "default", "type": "mrope"}}}


def _internvl() -> dict:
    """InternVL-Chat: InternLM2 as llm_config (shipped without scaling) and a text_config beside it."""
    llm = _internlm2(None)
    llm["auto_map"] = {"AutoConfig": AUTO_MAP["internlm2"]}
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "llm_config": llm,
            "text_config": _llama(4096), "vision_config": {"hidden_size": 64}, "torch_dtype": "bfloat16"}


def extra_cases() -> list[dict]:
    """Cases beyond the presets: the shapes a careful hostile user found (issue 15)."""
    both = _llama(4096, {"type": "linear", "factor": 2.0})
    del both["rope_theta"]
    both["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                               "rope_theta": 500000.0}
    theta_inside = _llama(4096, {"type": "dynamic", "factor": 2.0, "rope_theta": 250000.0})
    del theta_inside["rope_theta"]
    return [
        {"name": "internlm2-null-seed", "config": _internlm2(None), "factor": 2.0},
        {"name": "internlm2-dynamic2-to-3", "config": _internlm2({"type": "dynamic", "factor": 2.0}), "factor": 3.0},
        {"name": "internlm2-yarn", "config": _internlm2(None), "factor": 4.0, "rope_type": "yarn", "force": True},
        {"name": "internlm2-llama3", "config": _internlm2({"type": "dynamic", "factor": 2.0}), "factor": 4.0,
         "rope_type": "llama3", "force": True},
        {"name": "qwen2-vl-mrope-dynamic", "config": _qwen2_vl_flat({"type": "mrope", "mrope_section": [16, 24, 24]}),
         "factor": 2.0},
        {"name": "qwen2-vl-mrope-yarn", "config": _qwen2_vl_flat({"type": "mrope", "mrope_section": [16, 24, 24]}),
         "factor": 4.0, "rope_type": "yarn"},
        {"name": "qwen2-vl-saved-dynamic", "config": _qwen2_vl_saved(), "factor": 2.0},
        {"name": "llama-both-keys", "config": both, "factor": 4.0},
        {"name": "llama-both-keys-force-yarn", "config": both, "factor": 4.0, "rope_type": "yarn", "force": True},
        {"name": "llama-theta-inside-force-linear", "config": theta_inside, "factor": 2.0, "rope_type": "linear",
         "force": True},
        {"name": "llama-theta-3.58e9", "config": _llama(8192, None, rope_theta=3.58e9), "factor": 2.0},
        {"name": "llama-yarn-odd-native", "config": _llama(4097), "factor": 1.5, "rope_type": "yarn"},
        {"name": "internvl-llm-config", "config": _internvl(), "factor": 2.0},
    ]


def preset_cases() -> list[dict]:
    from launcher.model.presets import all_presets
    from launcher.rules.rope import WRITABLE_TYPES

    cases = []
    for _entry, preset in all_presets():
        for rope_type in WRITABLE_TYPES:
            factor = preset.rope.factor if rope_type == preset.rope.type else 2.0
            cases.append({"name": preset.name, "preset": preset.name, "config": preset.stub_config(),
                          "factor": factor, "rope_type": rope_type, "force": True,
                          "backend": "turbomind", "trust": preset.trust_remote_code})
    return cases


def context_cases() -> list[dict]:
    """``--context`` on every preset's own checkpoint (its recipe and type): within the native context (no
    scaling written), twice it (the preset's type, or what the config ships), and a published recipe's
    session (its scaling, past N x F)."""
    from launcher.model.presets import all_presets

    cases = []
    for _entry, preset in all_presets():
        contexts = {preset.native_context // 2, preset.native_context * 2}
        if preset.recipe is not None:
            contexts.add(preset.recipe.session_len)
        for context in sorted(contexts):
            cases.append({"name": f"{preset.name}@{context}", "context_of": preset.name, "context": context,
                          "config": preset.stub_config(), "trust": preset.trust_remote_code})
    return cases


# --- building a checkpoint and its overlay ------------------------------------------------------------


def _remote_types(config: dict) -> set[str]:
    found = {config.get("model_type")}
    for value in config.values():
        if isinstance(value, dict):
            found |= _remote_types(value)
    return found & set(AUTO_MAP)


def checkpoint(workdir: Path, case: dict) -> Path:
    """A model directory as a real checkpoint has it: config.json, with ``auto_map`` and the class's
    code for a family whose config class ships with the checkpoint."""
    src = workdir / "src" / case["name"]
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    config = copy.deepcopy(case["config"])
    for model_type in _remote_types(config):
        module = AUTO_MAP[model_type].split(".")[0]
        shutil.copy(REMOTE_CODE / f"{module}.py", src / f"{module}.py")
        if module == "configuration_internvl_chat":  # it imports InternLM2's class
            shutil.copy(REMOTE_CODE / "configuration_internlm2.py", src / "configuration_internlm2.py")
    if config.get("model_type") in AUTO_MAP:
        config["auto_map"] = {"AutoConfig": AUTO_MAP[config["model_type"]]}
    (src / "config.json").write_text(json.dumps(config))
    return src


def _expected_base(section: dict) -> float:
    """The model's RoPE base as shipped (what every reader must still read after the patch)."""
    for key in ("rope_scaling", "rope_parameters"):
        value = section.get(key)
        if isinstance(value, dict) and value.get("rope_theta") is not None:
            return float(value["rope_theta"])
    return float(section.get("rope_theta", 10000.0))


def _shipped_section(config: dict, written_section: list[str]) -> dict:
    return config[written_section[0]] if written_section else config


# --- the readers --------------------------------------------------------------------------------


def own_class_accepts(overlay: Path, trust: bool) -> dict:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(overlay), trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001 - recorded: the test asserts on it
        return {"accepted": False, "error": f"{type(err).__name__}: {err}"[:300]}
    return {"accepted": True, "class": type(config).__name__}


def turbomind_text_config(arch: str, cfg):
    """The config object TurboMind's model class reads its attention settings from."""
    from lmdeploy.turbomind.models.internvl import _cfg_get
    from lmdeploy.turbomind.models.utils import source_model_config
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

    registered = SUPPORTED_ARCHS.get(arch)
    cfg = source_model_config(cfg)
    if registered == "internvl":  # InternVLModel.__init__: llm_config, then text_config
        llm = _cfg_get(cfg, "llm_config")
        return llm if llm is not None else _cfg_get(cfg, "text_config")
    if registered == "qwen2_vl":  # Qwen2VLModel.__init__
        return getattr(cfg, "text_config", cfg)
    return cfg


def pytorch_text_config(arch: str, cfg):
    """The config object the PyTorch engine builds its rotary embedding from."""
    if getattr(cfg, "llm_config", None) is not None:  # configurations/builder.py: llm_config first
        return cfg.llm_config
    return getattr(cfg, "text_config", None) or cfg


def turbomind_reads(cfg, head_dim: int) -> dict:
    from lmdeploy.turbomind.models.utils import parse_rope_param

    param, max_pos = parse_rope_param(cfg, head_dim)
    if param.type == "yarn":
        threshold = param.max_position_embeddings
    elif param.type == "llama3":
        threshold = param.original_max_position_embeddings
    else:
        threshold = param.max_position_embeddings if param.type == "dynamic" else None
    section = list(param.mrope_section) if param.mrope_section is not None else None
    return {"type": param.type, "factor": float(param.factor), "threshold": threshold, "base": float(param.base),
            "max_position_embeddings": max_pos, "mrope_section": section}


def pytorch_reads(cfg) -> dict:
    from lmdeploy.pytorch.nn.rotary_embedding import build_rotary_params, get_rope_theta

    params = build_rotary_params(cfg)
    emb = params["emb_type"].name
    names = {"DynamicNTKScaling": "dynamic", "LinearScaling": "linear", "Yarn": "yarn", "Llama3": "llama3",
             "Default": "default"}
    rope_type = names.get(emb, emb)
    if rope_type == "yarn":
        threshold = params.get("max_position_embeddings", cfg.max_position_embeddings)
    elif rope_type == "llama3":
        threshold = params["llama3_params"].original_max_position_embeddings
    else:
        threshold = cfg.max_position_embeddings if rope_type == "dynamic" else None
    mrope = params.get("mrope_params")
    return {"type": rope_type, "factor": float(params.get("scaling_factor", 1.0)), "threshold": threshold,
            "base": float(get_rope_theta(cfg)), "mrope_section": list(mrope.mrope_section) if mrope else None}


def read_case(workdir: Path, case: dict) -> dict:
    from launcher.errors import LaunchError
    from launcher.plan.build import PlanRequest, build_plan, make_overlay

    src = checkpoint(workdir, case)
    trust = case.get("trust", True)
    record = {"name": case["name"], "preset": case.get("preset"), "rope_type": case.get("rope_type"),
              "factor": case.get("factor"), "context": case.get("context"), "context_of": case.get("context_of")}
    before = {p.name for p in (workdir / "overlays").glob("*")} if (workdir / "overlays").exists() else set()
    try:
        request = PlanRequest(model=str(src), factor=case.get("factor"), rope_type=case.get("rope_type"),
                              context=case.get("context"), force=case.get("force", False), need_files=True,
                              backend=case.get("backend"), trust_remote_code=trust,
                              out=workdir / "overlays" / case["name"] / (case.get("rope_type") or ""))
        source = None
        if case.get("context_of"):  # the preset's own rules (type, recipe) on its checkpoint's files
            from launcher.model.presets import get_preset
            from launcher.model.source import from_dir

            source = from_dir(src, preset=get_preset(case["context_of"]), trust_remote_code=trust)
        plan = build_plan(request, source)
        overlay = make_overlay(plan).path
    except LaunchError as err:
        after = {p.name for p in (workdir / "overlays").glob("*")} if (workdir / "overlays").exists() else set()
        record.update(refused=type(err).__name__, message=str(err), wrote=sorted(after - before))
        return record
    d = plan.decision
    shipped = _shipped_section(case["config"], list(d.section))
    record["reader"] = d.reader.as_dict()
    record["section"] = list(d.section)
    record["written"] = json.loads((overlay / "config.json").read_text())
    record["session_len"] = d.session_len
    record["unchanged"] = d.unchanged
    record["native"] = d.native_context
    record["rope_written"] = any(c.path[-1] in ("rope_scaling", "rope_parameters", "max_position_embeddings")
                                 for c in d.changes)
    record["plan_warnings"] = list(plan.warnings)
    record["intended"] = {
        "type": d.rope_type, "factor": d.factor, "base": _expected_base(shipped),
        "threshold": None if d.rope_type in ("linear", "default") else d.native_context,
        "mrope_section": (d.before.settings or {}).get("mrope_section") if d.before else None,
    }
    record["own_class"] = own_class_accepts(overlay, trust)
    try:
        record.update(engines_read(overlay, trust, plan.shape.head_dim, bool(case.get("preset"))))
    except Exception as err:  # noqa: BLE001 - recorded: the test fails on it, naming the case
        record["read_error"] = f"{type(err).__name__}: {err}"[:300]
    return record


def engines_read(overlay: Path, trust: bool, head_dim: int, ask_support: bool) -> dict:
    from lmdeploy.archs import get_model_arch
    from transformers import PretrainedConfig

    record: dict = {}

    arch, cfg = get_model_arch(str(overlay), trust_remote_code=trust)
    record["arch"] = arch
    record["loaded_class"] = type(cfg).__name__
    record["fallback"] = type(cfg) is PretrainedConfig  # lmdeploy's generic fallback took it
    tm_cfg = turbomind_text_config(arch, cfg)
    record["turbomind_text_class"] = type(tm_cfg).__name__
    record["turbomind"] = turbomind_reads(tm_cfg, head_dim)
    record["pytorch"] = pytorch_reads(pytorch_text_config(arch, cfg))
    if ask_support:
        from lmdeploy.turbomind.supported_models import is_supported

        record["turbomind_is_supported"] = is_supported(str(overlay), trust_remote_code=trust)
    return record


def main() -> None:
    workdir = Path(sys.argv[1])
    install_standin()
    import inspect

    import lmdeploy.turbomind as tm
    from lmdeploy.turbomind.models import internvl as tm_internvl
    from lmdeploy.turbomind.models import qwen2_vl as tm_qwen2_vl
    from lmdeploy.turbomind.models import utils as tm_utils
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

    from launcher.engine.spec import TURBOMIND_ARCHS
    from launcher.rules.rope import ENGINE_TYPES

    records = [read_case(workdir, case) for case in preset_cases() + extra_cases() + context_cases()]
    # The Qwen2.5 card's recipe as written by hand (not by launch): what TurboMind makes of it.
    recipe = {"max_position_embeddings": 32768, "rope_theta": 1e6,
              "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    recipe_param, _ = tm_utils.parse_rope_param(recipe, 128)
    out = {
        "qwen_card_recipe_turbomind_factor": float(recipe_param.factor),
        "turbomind_archs": sorted(SUPPORTED_ARCHS),
        "launch_turbomind_archs": sorted(TURBOMIND_ARCHS),
        "turbomind_rope_types": sorted(tm_utils._ROPE_TYPE_MAP),
        "launch_turbomind_rope_types": sorted(ENGINE_TYPES["turbomind"]),
        "standin_in_use": tm.is_available(),
        # the text-config choices turbomind_text_config mirrors, as the installed source has them
        "internvl_source": inspect.getsource(tm_internvl.InternVLModel.__init__),
        "qwen2_vl_source": inspect.getsource(tm_qwen2_vl.Qwen2VLModel.__init__),
        "source_model_config_source": inspect.getsource(tm_utils.source_model_config),
        "records": records,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
