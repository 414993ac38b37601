"""Reads launch's overlays with the INSTALLED lmdeploy's own parsers and prints what they read.

Run by tests/test_lmdeploy_contract.py in a separate process, because reaching TurboMind's
pure-Python RoPE parser (``lmdeploy.turbomind.models.utils.parse_rope_param``) on a machine without
CUDA needs a STAND-IN for TurboMind's CUDA extension module in ``sys.modules``; that must never
leak into a process that serves or into other tests. The stand-in only satisfies module-level
attribute lookups made at import time; parse_rope_param itself is pure Python and never calls it.

Usage: python tests/lmdeploy_contract.py WORKDIR  -> one JSON object on stdout.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path


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


def cases():
    from launcher.presets import all_presets
    from launcher.rope import WRITABLE_TYPES

    for _entry, preset in all_presets():
        for rope_type in WRITABLE_TYPES:
            factor = preset.rope.factor if rope_type == preset.rope.type else 2.0
            yield preset, rope_type, factor


def build(workdir: Path, preset, rope_type: str, factor: float):
    from launcher.plan import PlanRequest, build_plan, make_overlay

    src = workdir / "src" / preset.name
    if not src.exists():
        src.mkdir(parents=True)
        (src / "config.json").write_text(json.dumps(preset.stub_config()))
    plan = build_plan(PlanRequest(model=str(src), factor=factor, rope_type=rope_type, force=True, need_files=True,
                                  backend="turbomind"))
    overlay = make_overlay(plan)
    return plan, overlay.path


def turbomind_reads(overlay: Path, head_dim: int) -> dict:
    from lmdeploy.turbomind.models.utils import parse_rope_param

    config = json.loads((overlay / "config.json").read_text())
    param, max_pos = parse_rope_param(config, head_dim)
    if param.type == "yarn":
        threshold = param.max_position_embeddings
    elif param.type == "llama3":
        threshold = param.original_max_position_embeddings
    else:
        threshold = param.max_position_embeddings if param.type == "dynamic" else None
    return {"type": param.type, "factor": float(param.factor), "threshold": threshold, "base": param.base,
            "max_position_embeddings": max_pos}


def pytorch_reads(overlay: Path) -> dict:
    from lmdeploy.pytorch.nn.rotary_embedding import build_rotary_params, get_rope_theta
    from transformers import AutoConfig, LlamaConfig

    config_dict = json.loads((overlay / "config.json").read_text())
    try:  # the real loader where transformers knows the architecture (no remote code needed)
        config = AutoConfig.from_pretrained(str(overlay), trust_remote_code=False)
        loader = "AutoConfig"
    except (ValueError, KeyError, OSError):
        # InternLM2/3 configs need the repo's own configuration code, which is not here; their
        # config classes read the same keys as Llama's (max_position_embeddings, rope_scaling,
        # rope_theta), so LlamaConfig carries the same values to lmdeploy's parser.
        config = LlamaConfig.from_dict(config_dict)
        loader = "LlamaConfig"
    params = build_rotary_params(config)
    emb = params["emb_type"].name
    names = {"DynamicNTKScaling": "dynamic", "LinearScaling": "linear", "Yarn": "yarn", "Llama3": "llama3",
             "Default": "default"}
    rope_type = names.get(emb, emb)
    if rope_type == "yarn":
        threshold = params.get("max_position_embeddings", config.max_position_embeddings)
    elif rope_type == "llama3":
        threshold = params["llama3_params"].original_max_position_embeddings
    else:
        threshold = config.max_position_embeddings if rope_type == "dynamic" else None
    return {"type": rope_type, "factor": float(params.get("scaling_factor", 1.0)), "threshold": threshold,
            "base": float(get_rope_theta(config)), "loader": loader}


def main() -> None:
    workdir = Path(sys.argv[1])
    install_standin()
    import lmdeploy.turbomind as tm
    from lmdeploy.archs import get_model_arch
    from lmdeploy.turbomind.models import utils as tm_utils
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS, is_supported

    from launcher.engine import TURBOMIND_ARCHS
    from launcher.rope import ENGINE_TYPES

    records = []
    for preset, rope_type, factor in cases():
        plan, overlay = build(workdir, preset, rope_type, factor)
        d = plan.decision
        intended_threshold = None if rope_type == "linear" else d.native_context
        record = {
            "preset": preset.name,
            "rope_type": rope_type,
            "factor": factor,
            "intended": {"type": rope_type, "factor": d.factor, "threshold": intended_threshold},
            "unchanged": d.unchanged,
            "turbomind": turbomind_reads(overlay, plan.shape.head_dim),
            "pytorch": pytorch_reads(overlay),
        }
        if rope_type == preset.rope.type and plan.patched_config.get("model_type") in ("llama", "qwen2", "mistral"):
            # transformers knows these without the repo's code: ask lmdeploy itself.
            arch, _cfg = get_model_arch(str(overlay), trust_remote_code=False)
            record["arch"] = arch
            record["turbomind_is_supported"] = is_supported(str(overlay))
        records.append(record)
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
        "records": records,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
