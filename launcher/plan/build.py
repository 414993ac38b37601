"""The plan: everything ``serve`` will do, computed first, shown by ``plan``, then executed.

``build_plan`` takes the one request (``launcher.plan.request``: checked once, by the parser or by
``check_request``, and never again here), applies the RoPE rules to a config, sizes the KV cache and fills in the typed engine settings and the
equivalent lmdeploy command line. It writes nothing and loads no engine. ``with_files`` gets the
files a planned model needs and keeps the plan when the downloaded config is the one planned with.
Showing a plan is ``launcher.plan.render``'s job.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from launcher import __version__
from launcher.engine.parallel import check_parallel
from launcher.engine.spec import (
    DEFAULTS,
    SESSION_LEN_MAX,
    EngineSettings,
    EngineSpec,
    api_server_argv,
    architecture_of,
    engine_config,
    turbomind_supports,
)
from launcher.model.overlay import Overlay, build_overlay, config_bytes, default_overlay_path
from launcher.model.source import ModelSource, resolve
from launcher.plan.request import PlanRequest, check_request
from launcher.rules.checks import BadOption
from launcher.rules.configcheck import BadConfig
from launcher.rules.context import Recipe, ask
from launcher.rules.kvcache import (
    GiB,
    KvCost,
    MemoryPlan,
    ModelShape,
    kv_costs,
    plan_memory,
    tp_split,
    weights_bytes_estimate,
)
from launcher.rules.prefixcache import check_prefix_caching, prefix_caching_safe
from launcher.rules.rope import RopeDecision, apply, decide, read_rope

OVERLAY_PLACEHOLDER = "<overlay: made after download>"
ENGINE_FIELDS = tuple(f.name for f in fields(EngineSettings))
__all__ = ["OVERLAY_PLACEHOLDER", "Plan", "PlanRequest", "build_plan", "check_request", "make_overlay",
           "overlay_digest", "with_files"]


@dataclass(frozen=True)
class Plan:
    request: PlanRequest  # checked
    source: ModelSource
    decision: RopeDecision
    patched_config: dict
    section: dict  # the language model's section of ``patched_config`` (the whole of it, mostly)
    shape: ModelShape
    kv: dict[int, KvCost]
    kv_heads_per_gpu: int  # the tp rule's answer (``kvcache.tp_split``), for the layouts
    memory: MemoryPlan | None
    memory_note: str
    gpu_bytes: int | None
    gpu_source: str
    gpu_count: int | None
    settings: EngineSettings
    engine: EngineSpec
    overlay_path: Path | None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    context_how: str | None = None  # how --context became a factor (rules/context.py); None without it
    recipe: Recipe | None = None  # the published recipe whose values are defaults here
    defaults_from: dict = field(default_factory=dict)  # engine field -> flag / recipe / preset / launch

    @property
    def gpus_here(self) -> int:
        """GPUs the engine takes on this machine: tp, or its share across nodes."""
        return local_gpus(self.engine.config.tp, self.request.nnodes)

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


def local_gpus(tp: int, nnodes: int) -> int:
    """GPUs one node gives an engine of ``tp`` across ``nnodes`` (tp / nnodes when it divides; a tp that
    does not is lmdeploy's to refuse, and counts whole here)."""
    return tp // nnodes if tp % nnodes == 0 else tp


def _engine_settings(request: PlanRequest, source: ModelSource, recipe: Recipe | None) -> tuple[EngineSettings, dict]:
    """Flags over the published recipe's values (when it is used) over the preset's engine defaults over
    launch's (``engine.DEFAULTS``); and where each value came from: ``flag``, ``recipe``, ``preset`` or
    ``launch``."""
    preset = source.preset.engine if source.preset else None
    values: dict = {}
    origin: dict[str, str] = {}
    for name in ENGINE_FIELDS:
        for where, value in (("flag", getattr(request, name)), ("recipe", (recipe.engine if recipe else {}).get(name)),
                             ("preset", getattr(preset, name, None)), ("launch", getattr(DEFAULTS, name))):
            if value is not None:
                values[name], origin[name] = value, where
                break
    values["cache_max_entry_count"] = float(values["cache_max_entry_count"])
    return EngineSettings(**values), origin


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


def gpu_shortage(tp: int, nnodes: int, gpu_count: int | None) -> str | None:
    """Why ``--tp tp`` would stop serve for want of GPUs here (``gpu_count``: ``gpu.count``), or None: the
    words after the flag, for plan's warning and serve's refusal alike."""
    local = local_gpus(tp, nnodes)
    if gpu_count is None or local <= gpu_count:
        return None
    need = f"over {nnodes} nodes: each node needs {local} GPUs" if nnodes > 1 else f"needs {local} GPUs"
    return f"{need}; this machine has {gpu_count} as CUDA sees them"


def _gpu_memory(request: PlanRequest) -> tuple[int | None, str, int | None]:
    """(bytes a GPU has, where that came from, the GPUs here: ``gpu.count``, --gpu-memory or not)."""
    from launcher.runtime.gpu import count, free_memory

    free = free_memory()
    if request.gpu_memory_gib is not None:
        return int(request.gpu_memory_gib * GiB), "--gpu-memory", count(free)
    if not free:
        return None, "none", count(free)
    return min(free), "nvml", len(free)


def _memory(shape: ModelShape, decision: RopeDecision, settings: EngineSettings, source: ModelSource,
            gpu_bytes: int | None, gpu_source: str, gpu_count: int | None,
            length_flag: str = "--session-len") -> tuple[MemoryPlan | None, str]:
    weights, weights_source = weights_size(source)
    if gpu_bytes is None:
        return None, "no GPU found: give --gpu-memory GiB to check that a session fits"
    if weights is None:
        return None, "the weights' size is unknown (no safetensors files, no preset)"
    return plan_memory(
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
        cp=settings.cp,
        length_flag=length_flag,
    ), ""


def _overlay_path(request: PlanRequest, source: ModelSource, patched: dict) -> Path | None:
    if request.out is not None:
        return Path(request.out).expanduser()
    if source.path is not None:
        return default_overlay_path(source.name, source.path, config_bytes(patched))
    return None


def build_plan(request: PlanRequest, source: ModelSource | None = None, *,
               api_keys: tuple[str, ...] = ()) -> Plan:
    """Compute everything serve would do from ``source``'s config (resolved from the request when
    not given). Writes nothing. ``api_keys``: what the server will require (serve)."""
    request = check_request(request)  # a checked request (the parser's, serve's) is taken as it is
    if source is None:
        source = resolve(request.model, need_files=request.need_files, fetching=request.fetching)
    preset = source.preset  # its values were read by the same limits when it was loaded
    config = source.config
    backend = request.backend or (preset.engine.backend if preset else DEFAULTS.backend)
    asked = ask(read_rope(config, source.config_origin), context=request.context, factor=request.factor,
                rope_type=request.rope_type, session_len=request.session_len,
                preset_type=preset.rope.type if preset else None, preset_factor=preset.rope.factor if preset else None,
                recipe=preset.published if preset else None, force=request.force, engine=backend)
    settings, defaults_from = _engine_settings(request, source, asked.recipe)
    decision = decide(config, asked.rope, source=source.config_origin)
    if decision.session_len > SESSION_LEN_MAX:
        raise BadConfig(source.config_origin, f"a session of {decision.session_len:,} tokens "
                        f"({decision.rope_type} x{decision.factor:g} over {decision.native_context:,}) is past "
                        f"lmdeploy's limit of {SESSION_LEN_MAX:,}: use a smaller --factor or --session-len")
    patched = apply(config, decision)
    section = functools.reduce(operator.getitem, decision.section, patched)
    shape = ModelShape.from_config(section, source.config_origin)
    warnings = list(decision.warnings)
    if settings.cp > 1:
        if settings.backend != "turbomind":
            raise BadOption("--cp", str(settings.cp), "context parallelism is TurboMind's (the PyTorch engine has "
                            "none): use --backend turbomind, or leave --cp out")
        check_parallel(settings.tp, nnodes=request.nnodes, cp=settings.cp)
    # the tp rule: heads over tp / cp, hidden size over tp, split evenly
    kv_heads = tp_split(section, settings.tp, source.config_origin, settings.cp)
    if settings.enable_prefix_caching and not prefix_caching_safe(decision.rope_type, decision.session_len,
                                                                  decision.max_position_embeddings):
        if request.enable_prefix_caching:  # asked for: refused, saying why and what instead
            check_prefix_caching(decision.rope_type, decision.factor, decision.session_len,
                                 decision.max_position_embeddings)
        settings = replace(settings, enable_prefix_caching=False)
        warnings.append(f"the preset's prefix caching is left off: under dynamic NTK a session past "
                        f"{decision.max_position_embeddings:,} tokens rotates cached keys under another base")
    remote = decision.remote_class  # the whole config's own class first (InternVL's), then its language model's
    if remote is not None and not source.trust_remote_code:
        warnings.append(
            f"the config's own class {remote.name} ({remote.code}) needs trust_remote_code, which "
            "is off: lmdeploy will load the overlay through its generic fallback, which checks nothing, and "
            "transformers cannot load it. Add --trust-remote-code if you trust the checkpoint's code"
        )
    if settings.backend == "turbomind" and not turbomind_supports(patched):
        warnings.append(
            f"TurboMind does not serve {architecture_of(patched)}: serve will stop; use --backend pytorch"
        )

    gpu_bytes, gpu_source, gpu_count = _gpu_memory(request)
    if shortage := gpu_shortage(settings.tp, request.nnodes, gpu_count):
        warnings.append(f"--tp {settings.tp} {shortage}: serve will stop")
    length_flag = "--context" if request.context is not None else "--session-len"
    memory, memory_note = _memory(shape, decision, settings, source, gpu_bytes, gpu_source, gpu_count, length_flag)

    engine = EngineSpec(
        backend=settings.backend,
        config=engine_config(settings, decision.session_len),
        model_name=request.model_name or source.name,
        trust_remote_code=source.trust_remote_code,
        chat_template=preset.chat_template.as_dict() if preset and preset.chat_template else None,
        host=request.host,
        port=request.port,
        api_keys=tuple(api_keys),
    )
    return Plan(
        request=request,
        source=source,
        decision=decision,
        patched_config=patched,
        section=section,
        shape=shape,
        kv=kv_costs(shape, decision.session_len, settings.tp, settings.cp),
        memory=memory,
        memory_note=memory_note,
        gpu_bytes=gpu_bytes,
        gpu_source=gpu_source,
        gpu_count=gpu_count,
        settings=settings,
        engine=engine,
        overlay_path=_overlay_path(request, source, patched),
        warnings=tuple(warnings),
        kv_heads_per_gpu=kv_heads,
        context_how=asked.how,
        recipe=asked.recipe,
        defaults_from=defaults_from,
    )


def with_files(plan: Plan) -> tuple[Plan, str | None]:
    """``plan`` for the model's files, downloading them when they come from the Hub.

    The plan was made from a config alone. When the downloaded config.json is that config, the
    plan stands: it only learns where the files are (the overlay's place) and the weights' real
    size (the memory check). When it differs (a preset's stored facts, or a branch that moved),
    the plan is made again from the downloaded config, and the second value says so in one line.
    """
    from launcher.model.source import with_files as files_of

    source = files_of(plan.source, plan.request.fetching)
    if source is plan.source:
        return plan, None
    if source.config == plan.source.config:
        memory, memory_note = _memory(plan.shape, plan.decision, plan.settings, source, plan.gpu_bytes,
                                      plan.gpu_source, plan.gpu_count,
                                      "--context" if plan.request.context is not None else "--session-len")
        return replace(plan, source=source, memory=memory, memory_note=memory_note,
                       overlay_path=_overlay_path(plan.request, source, plan.patched_config)), None
    again = build_plan(plan.request, source, api_keys=plan.engine.api_keys)
    before, after = plan.decision, again.decision
    outcome = (
        "the plan is the same" if (before.settings, before.session_len) == (after.settings, after.session_len)
        else f"session_len {before.session_len} -> {after.session_len}, {before.rope_type} x{before.factor:g} -> "
             f"{after.rope_type} x{after.factor:g}"
    )
    return again, (f"note: planned with {plan.source.config_origin}; the downloaded {source.config_origin} "
                   f"differs, so launch re-planned from it ({outcome})")


def overlay_digest(plan: Plan) -> str:
    """The overlay's content hash, ``sha256:<hex>``: of the patched config.json, launch's provenance
    record and the chat template file, as launch writes them (the machine-specific source path and
    file manifest left out). The same model and settings give the same hash on every node, so nodes can be
    compared before they load anything."""
    import hashlib

    digest = hashlib.sha256()
    parts = [config_bytes(plan.patched_config), config_bytes(plan.provenance)]
    if plan.engine.chat_template:
        parts.append(config_bytes(plan.engine.chat_template))
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return "sha256:" + digest.hexdigest()


def make_overlay(plan: Plan) -> Overlay:
    """Write (or reuse) the plan's overlay. The source directory is never written."""
    if plan.source.path is None or plan.overlay_path is None:
        raise BadOption("MODEL", plan.source.label, "needs a downloaded model directory to patch")
    return build_overlay(plan.source.path, plan.patched_config, plan.provenance, plan.overlay_path,
                         chat_template=plan.engine.chat_template)
