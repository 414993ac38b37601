"""The serving process's last check: lmdeploy reads the overlay as launch planned it.

``launch plan`` decides what to write from the rules in ``launcher/rules/rope.py``, which know the config
classes of the families in ``configs/`` (InternLM2's own class takes only ``{"type", "factor"}``, ...).
A checkpoint's own class that launch has not read may have a rule of its own. So before any weight is
loaded, ``launcher.engine.server`` reads the overlay the way lmdeploy will, with the engine's own loader,
and stops with one line when:

* the config names its own config class (``auto_map``), trust_remote_code is on, and that class refuses
  the overlay: lmdeploy (``hf_configs.config_from_pretrained``) would go on with a generic config that
  checks nothing, and transformers would not load the model at all;
* the RoPE type or factor lmdeploy reads (``lmdeploy.pytorch.nn.rotary_embedding.build_rotary_params``,
  from the language model's section the RoPE rules patched: ``rope.NESTED_TEXT_KEYS``, else the config) is not
  the one in launch's record of the patch (``launch-patch.json``).

Imports transformers and lmdeploy: only the serving process (and tests) call it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from launcher.engine.spec import PROVENANCE
from launcher.rules.rope import NESTED_TEXT_KEYS

_EMB_TYPES = {"Default": "default", "LinearScaling": "linear", "DynamicNTKScaling": "dynamic", "Yarn": "yarn",
              "Llama3": "llama3", "LongRoPEScaling": "longrope"}


def _remote_class(config: dict) -> str | None:
    for section in (config, *(v for v in config.values() if isinstance(v, dict))):
        auto_map = section.get("auto_map")
        if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoConfig"), str):
            return auto_map["AutoConfig"].rpartition(".")[2]
    return None


def _text_config(cfg):
    """The language model's part of a loaded config: where the RoPE rules wrote (``NESTED_TEXT_KEYS``)."""
    for name in NESTED_TEXT_KEYS:
        sub = getattr(cfg, name, None)
        if sub is not None:
            return sub
    return cfg


def _planned(model_path: Path) -> tuple[str, float] | None:
    try:
        rope = json.loads((model_path / PROVENANCE).read_text(encoding="utf-8"))["rope"]
        return str(rope["type"]), float(rope["factor"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not an overlay of launch's: nothing planned to compare with


def _why_refused(path: Path, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - its message is the reason shown
        text = str(err).strip()
        return (text.splitlines()[0] if text else type(err).__name__)[:200]
    return "it loaded on a second try"


def readback_problem(model_path: str | Path, trust_remote_code: bool) -> str | None:
    """Why lmdeploy would not read the overlay at ``model_path`` as planned (None when it would)."""
    from lmdeploy.archs import get_model_arch
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(model_path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    own = _remote_class(config) if trust_remote_code else None
    _arch, cfg = get_model_arch(str(path), trust_remote_code=trust_remote_code)
    # lmdeploy's generic fallback took a config that a real class exists for (the checkpoint's own,
    # trusted, or transformers'): that class refused it
    if type(cfg) is PretrainedConfig and (own or config.get("model_type") in CONFIG_MAPPING):
        who = f"the model's own config class {own}" if own else "transformers' config class"
        return (f"{who} refuses the overlay's config.json ({_why_refused(path, trust_remote_code)}); lmdeploy "
                "would load it through its generic fallback, which checks nothing. Re-plan with a --type that "
                "class takes")
    planned = _planned(path)
    if planned is None:
        return None
    from lmdeploy.pytorch.nn.rotary_embedding import build_rotary_params

    params = build_rotary_params(_text_config(cfg))
    read_type = _EMB_TYPES.get(params["emb_type"].name, params["emb_type"].name)
    read_factor = float(params.get("scaling_factor", 1.0))
    want_type, want_factor = planned
    if read_type != want_type or not math.isclose(read_factor, want_factor, rel_tol=1e-9):
        return (f"lmdeploy reads {read_type} x{read_factor:g} from the overlay, not the planned {want_type} "
                f"x{want_factor:g}; the overlay was changed after launch wrote it: run launch patch again")
    return None
