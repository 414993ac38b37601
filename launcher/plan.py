"""The plan: everything ``serve`` will do, computed first, shown by ``plan``, then executed.

``build_plan`` resolves the model, applies the RoPE rules, sizes the KV cache and fills in the
engine config and the equivalent lmdeploy command line. It writes nothing and loads no engine.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .engine import (
    BACKENDS,
    DEFAULT_HOST,
    DEFAULT_PORT,
    EngineSettings,
    EngineSpec,
    api_server_argv,
    architecture_of,
    command_line,
    engine_config,
    turbomind_supports,
)
from .errors import BadOption
from .kvcache import (
    GiB,
    KvCost,
    MemoryPlan,
    ModelShape,
    kv_costs,
    plan_memory,
    weights_bytes_estimate,
)
from .overlay import Overlay, build_overlay, config_bytes, default_overlay_path
from .resolve import ModelSource, resolve
from .rope import RopeDecision, RopeRequest, apply, decide, parse_factor, parse_rope_type

OVERLAY_PLACEHOLDER = "<overlay: made after download>"


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for; ``None`` means the preset's (or lmdeploy's) default."""

    model: str
    factor: str | float | None = None
    rope_type: str | None = None
    session_len: int | None = None
    force: bool = False
    backend: str | None = None
    tp: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float | None = None
    quant_policy: int | None = None
    gpu_memory_gib: float | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model_name: str | None = None
    out: Path | None = None
    need_files: bool = False
    revision: str | None = None
    trust_remote_code: bool | None = None
    quiet: bool = False
    hub_timeout_s: float | str | None = None

    @property
    def fetching(self):
        from .resolve import Fetching

        return Fetching(revision=self.revision, quiet=self.quiet, timeout_s=self.hub_timeout_s,
                        trust_remote_code=self.trust_remote_code)


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    source: ModelSource
    decision: RopeDecision
    patched_config: dict
    shape: ModelShape
    kv: dict[int, KvCost]
    memory: MemoryPlan | None
    memory_note: str
    gpu_count: int | None
    engine: EngineSpec
    overlay_path: Path | None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def command(self) -> list[str]:
        return api_server_argv(str(self.overlay_path or OVERLAY_PLACEHOLDER), self.engine)

    @property
    def architecture(self) -> str | None:
        return architecture_of(self.patched_config)

    @property
    def provenance(self) -> dict:
        d = self.decision
        return {
            "tool": "launch",
            "version": __version__,
            "model": self.source.label,
            "repo_id": self.source.repo_id,
            "revision": self.source.revision,
            "rope": {
                "type": d.rope_type,
                "factor": d.factor,
                "native_context": d.native_context,
                "session_len": d.session_len,
                "key": ".".join(d.section + (d.key,)),
                "original": d.before.settings if d.before else None,
                "written": d.settings,
                "max_position_embeddings": {
                    "original": d.before.max_position_embeddings if d.before else None,
                    "written": d.max_position_embeddings,
                },
            },
            "changes": [
                {"key": c.dotted, "old": c.old, "new": None if c.removed else c.new, "removed": c.removed}
                for c in d.changes
            ],
        }


def _check_int(option: str, value: int | None, low: int, high: int | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadOption(option, str(value), f"must be a whole number {bound}")


def _engine_settings(request: PlanRequest, source: ModelSource) -> EngineSettings:
    base = source.preset.engine if source.preset else None
    backend = request.backend or (base.backend if base else "turbomind")
    if backend not in BACKENDS:
        raise BadOption("--backend", backend, f"choose one of {', '.join(BACKENDS)}")
    _check_int("--tp", request.tp, 1, 64)
    _check_int("--max-batch-size", request.max_batch_size, 1)
    ratio = request.cache_max_entry_count
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
        raise BadOption("--cache-max-entry-count", str(ratio), "must be strictly between 0 and 1, e.g. 0.8")
    if request.quant_policy is not None and request.quant_policy not in (0, 4, 8):
        raise BadOption("--quant-policy", str(request.quant_policy), "choose 0 (fp16), 8 (int8) or 4 (int4)")

    def pick(value, default_field, fallback):
        if value is not None:
            return value
        return getattr(base, default_field) if base else fallback

    return EngineSettings(
        backend=backend,
        tp=pick(request.tp, "tp", 1),
        max_batch_size=pick(request.max_batch_size, "max_batch_size", 64),
        cache_max_entry_count=float(pick(request.cache_max_entry_count, "cache_max_entry_count", 0.8)),
        quant_policy=pick(request.quant_policy, "quant_policy", 0),
    )


def weights_size(source: ModelSource) -> tuple[int | None, str]:
    """Bytes of the weights: the safetensors files when present, else the preset's estimate."""
    if source.path is not None:
        total = 0
        for entry in Path(source.path).rglob("*.safetensors"):
            try:
                total += entry.stat().st_size
            except OSError:
                continue
        if total:
            return total, "safetensors files"
    if source.preset is not None:
        dtype = source.preset.config.torch_dtype
        return weights_bytes_estimate(source.preset.parameters, dtype), f"preset ({source.preset.parameters:.3g} parameters)"
    return None, "unknown"


def _gpu_memory(request: PlanRequest) -> tuple[int | None, str, int | None]:
    if request.gpu_memory_gib is not None:
        value = request.gpu_memory_gib
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise BadOption("--gpu-memory", str(value), "must be a positive number of GiB, e.g. 80")
        return int(value * GiB), "--gpu-memory", None
    from .gpu import free_memory

    free = free_memory()
    if not free:
        return None, "none", None
    return min(free), "nvml", len(free)


def _check_tp(shape: ModelShape, tp: int) -> None:
    if shape.heads % tp:
        raise BadOption("--tp", str(tp), f"the model's {shape.heads} attention heads must divide evenly by it")


def build_plan(request: PlanRequest, source: ModelSource | None = None) -> Plan:
    """Compute everything serve would do. Writes nothing."""
    if source is None:
        source = resolve(request.model, need_files=request.need_files, fetching=request.fetching)
    preset = source.preset
    factor = request.factor if request.factor is not None else (preset.rope.factor if preset else None)
    rope_type = request.rope_type if request.rope_type is not None else (preset.rope.type if preset else None)
    settings = _engine_settings(request, source)
    rope_request = RopeRequest(
        factor=parse_factor(factor) if factor is not None else None,
        rope_type=parse_rope_type(rope_type) if rope_type is not None else None,
        session_len=request.session_len,
        force=request.force,
        engine=settings.backend,
    )
    decision = decide(source.config, rope_request, source=source.config_origin)
    patched = apply(source.config, decision)
    section = patched
    for key in decision.section:
        section = section[key]
    shape = ModelShape.from_config(section, source.config_origin)
    _check_tp(shape, settings.tp)
    warnings = list(decision.warnings)

    if settings.backend == "turbomind" and not turbomind_supports(patched):
        warnings.append(
            f"TurboMind does not serve {architecture_of(patched)}: serve will stop; use --backend pytorch"
        )

    weights, weights_source = weights_size(source)
    gpu_bytes, gpu_source, gpu_count = _gpu_memory(request)
    if gpu_count is not None and settings.tp > gpu_count:
        warnings.append(f"--tp {settings.tp} needs {settings.tp} GPUs; this machine has {gpu_count}: serve will stop")
    memory, memory_note = None, ""
    if gpu_bytes is None:
        memory_note = "no GPU found: give --gpu-memory GiB to check that a session fits"
    elif weights is None:
        memory_note = "the weights' size is unknown (no safetensors files, no preset)"
    else:
        memory = plan_memory(
            shape,
            session_len=decision.session_len,
            gpu_bytes=gpu_bytes,
            weights_bytes=weights,
            tp=settings.tp,
            cache_max_entry_count=settings.cache_max_entry_count,
            quant_policy=settings.quant_policy,
            native_context=decision.native_context,
            gpu_source=gpu_source,
            weights_source=weights_source,
            gpu_count=gpu_count,
        )

    name = request.model_name or source.name
    engine = EngineSpec(
        backend=settings.backend,
        config=engine_config(settings, decision.session_len),
        model_name=name,
        trust_remote_code=source.trust_remote_code,
        chat_template=preset.chat_template.as_dict() if preset and preset.chat_template else None,
        host=request.host,
        port=request.port,
    )

    overlay_path = None
    if request.out is not None:
        overlay_path = Path(request.out).expanduser()
    elif source.path is not None:
        overlay_path = default_overlay_path(source.name, source.path, config_bytes(patched))

    return Plan(
        request=request,
        source=source,
        decision=decision,
        patched_config=patched,
        shape=shape,
        kv=kv_costs(shape, decision.session_len, settings.tp),
        memory=memory,
        memory_note=memory_note,
        gpu_count=gpu_count,
        engine=engine,
        overlay_path=overlay_path,
        warnings=tuple(warnings),
    )


def make_overlay(plan: Plan) -> Overlay:
    """Write (or reuse) the plan's overlay. The source directory is never written."""
    if plan.source.path is None or plan.overlay_path is None:
        raise BadOption("MODEL", plan.source.label, "needs a downloaded model directory to patch")
    return build_overlay(plan.source.path, plan.patched_config, plan.provenance, plan.overlay_path,
                         chat_template=plan.engine.chat_template)


# --- showing it -------------------------------------------------------------------------------


def config_diff(plan: Plan) -> str:
    before = config_bytes(plan.source.config).decode().splitlines()
    after = config_bytes(plan.patched_config).decode().splitlines()
    lines = difflib.unified_diff(before, after, "config.json", "config.json (overlay)", n=1, lineterm="")
    return "\n".join(lines)


def _memory_json(memory: MemoryPlan | None) -> dict | None:
    if memory is None:
        return None
    return {
        "gpu_bytes": memory.gpu_bytes,
        "gpu_source": memory.gpu_source,
        "weights_bytes": memory.weights_bytes,
        "weights_source": memory.weights_source,
        "cache_budget_bytes": memory.budget_bytes,
        "bytes_per_session": memory.bytes_per_session,
        "sessions_that_fit": memory.sessions,
        "fits": memory.fits,
        "largest_session_len": memory.largest_session_len,
        "advice": list(memory.advice),
    }


def plan_json(plan: Plan) -> dict:
    d = plan.decision
    section = plan.patched_config
    for key in d.section:
        section = section[key]
    kv0 = plan.kv[plan.engine.config["quant_policy"]]
    return {
        "model": plan.source.label,
        "name": plan.engine.model_name,
        "preset": plan.source.preset.name if plan.source.preset else None,
        "repo_id": plan.source.repo_id,
        "revision": plan.source.revision,
        "config_source": plan.source.config_origin,
        "architecture": plan.architecture,
        "attention_bias": section.get("attention_bias"),
        "turbomind_supported": turbomind_supports(plan.patched_config),
        "native_context": d.native_context,
        "factor": d.factor,
        "rope_type": d.rope_type,
        "rope_key": ".".join(d.section + (d.key,)),
        "session_len": d.session_len,
        "covered_context": d.covered_context,
        "rope_scaling": d.settings,
        "max_position_embeddings": d.max_position_embeddings,
        "config_unchanged": d.unchanged,
        "config_changes": [
            {"key": c.dotted, "old": c.old, "new": None if c.removed else c.new, "removed": c.removed}
            for c in d.changes
        ],
        "kv_cache": {
            "tp": plan.engine.config["tp"],
            "quant_policy": plan.engine.config["quant_policy"],
            "bytes_per_token": kv0.bytes_per_token,
            "bytes_per_session": kv0.bytes_per_session,
            "by_quant_policy": {
                cost.name: {"quant_policy": q, "bytes_per_token": cost.bytes_per_token,
                            "bytes_per_session": cost.bytes_per_session}
                for q, cost in plan.kv.items()
            },
        },
        "memory": _memory_json(plan.memory),
        "memory_note": plan.memory_note or None,
        "engine": {
            "backend": plan.engine.backend,
            "class": plan.engine.config_class,
            "config": plan.engine.config,
            "model_name": plan.engine.model_name,
            "trust_remote_code": plan.engine.trust_remote_code,
            "chat_template": plan.engine.chat_template,
            "server_name": plan.engine.host,
            "server_port": plan.engine.port,
        },
        "overlay": str(plan.overlay_path) if plan.overlay_path else None,
        "command": plan.command,
        "command_line": command_line(plan.command),
        "warnings": list(plan.warnings),
    }


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"


def render_plan(plan: Plan) -> str:
    d = plan.decision
    out: list[str] = []
    src = plan.source
    where = src.repo_id or (str(src.path) if src.path else src.label)
    out.append(f"model          {src.name}  ({where})")
    out.append(f"config from    {src.config_origin}")
    before_arch = architecture_of(src.config)
    arch = plan.architecture
    arch_line = arch if arch == before_arch else f"{before_arch} -> {arch}"
    section = plan.patched_config
    for key in d.section:
        section = section[key]
    if section.get("attention_bias"):
        arch_line += " (attention bias)"
    out.append(f"architecture   {arch_line}")
    out.append(
        f"RoPE           {d.rope_type} x{d.factor:g} over a native {d.native_context:,} tokens "
        f"({'.'.join(d.section + (d.key,))}), covers {d.covered_context:,}"
    )
    out.append(f"session_len    {d.session_len:,} tokens")
    out.append("")
    if d.unchanged:
        out.append("config.json    unchanged (it already carries these settings)")
    else:
        out.append("config.json changes (written to the overlay; the source is never touched):")
        out.extend("  " + line for line in config_diff(plan).splitlines())
    out.append("")
    tp = plan.engine.config["tp"]
    out.append(f"KV cache per GPU (tp {tp}), {d.session_len:,}-token session:")
    for q, cost in plan.kv.items():
        mark = "  <- --quant-policy" if q == plan.engine.config["quant_policy"] else ""
        out.append(
            f"  {cost.name:<5} {cost.bytes_per_token:>12,} B/token   {_gib(cost.bytes_per_session):>14} per session{mark}"
        )
    m = plan.memory
    if m is not None:
        out.append(
            f"memory         GPU {_gib(m.gpu_bytes)} free ({m.gpu_source}), weights {_gib(m.weights_bytes)} "
            f"({m.weights_source}), cache budget {_gib(m.budget_bytes)} per GPU"
        )
        if m.fits:
            out.append(f"               {m.sessions} full-length session(s) fit at once")
        else:
            out.append("               NOT ONE full-length session fits. Would fit: " + "; ".join(m.advice))
    else:
        out.append(f"memory         {plan.memory_note}")
    out.append("")
    cfg = ", ".join(f"{k}={v!r}" for k, v in plan.engine.config.items())
    out.append(f"engine         {plan.engine.config_class}({cfg})")
    out.append(f"overlay        {plan.overlay_path or OVERLAY_PLACEHOLDER}")
    out.append("command        " + command_line(plan.command))
    out.append("               (the same engine call; API keys left out. Unlike launch serve, lmdeploy's own CLI"
               " falls back to the PyTorch engine silently when TurboMind cannot take the model.)")
    for warning in plan.warnings:
        out.append(f"warning: {warning}")
    return "\n".join(out)
