"""`launch serve`: resolve -> plan -> checks -> fetch -> overlay -> supervised lmdeploy api_server.

Everything that can fail cheaply fails before anything slow: flags, the RoPE rules, the KV-cache
fit, the engine's availability and architecture support, and the port are all checked before a
weight is downloaded or loaded.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from .engine import (
    DEFAULT_HEALTH_TIMEOUT_S,
    TURBOMIND_ARCHS,
    architecture_of,
    spec_to_json,
    turbomind_problem,
)
from .errors import BadOption, EngineUnavailable, NoSessionFits, RunDirNotWritable
from .kvcache import GiB
from .overlay import check_overlay, slug
from .paths import cache_dir
from .plan import Plan, PlanRequest, build_plan, make_overlay, plan_json, render_plan

SPEC_NAME = "spec.json"
LOG_NAME = "server.log"


@dataclass(frozen=True)
class ServeRequest:
    plan: PlanRequest
    api_keys: tuple[str, ...] = ()  # as given by --api-key flags
    api_key_file: Path | None = None
    dry_run: bool = False
    as_json: bool = False
    probe: bool = False
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S
    ppl_text: Path | None = None  # with probe: also `launch ppl` on this text at the probe's lengths


def _check_engine(plan: Plan) -> None:
    """No silent fallback: the chosen engine must exist here and take the (patched) architecture."""
    if plan.engine.backend != "turbomind":
        return
    arch = architecture_of(plan.patched_config)
    if arch not in TURBOMIND_ARCHS:
        raise EngineUnavailable("turbomind", f"TurboMind does not support the {arch} architecture")
    problem = turbomind_problem()
    if problem:
        raise EngineUnavailable("turbomind", problem)


def _check_gpus(plan: Plan) -> None:
    tp = plan.engine.config["tp"]
    if plan.gpu_count is not None and tp > plan.gpu_count:
        raise BadOption("--tp", str(tp), f"this machine has {plan.gpu_count} GPU(s); tp must not exceed that")


def _check_memory(plan: Plan) -> None:
    m = plan.memory
    if m is not None and not m.fits:
        raise NoSessionFits(plan.decision.session_len, m.bytes_per_session / GiB, m.budget_bytes / GiB, m.advice)


def engine_call(plan: Plan, model_path: str) -> str:
    """The in-process lmdeploy call, as text: what the serving process will run."""
    cfg = ", ".join(f"{k}={v!r}" for k, v in plan.engine.config.items())
    template = "ChatTemplateConfig(...)" if plan.engine.chat_template else "None"
    return (
        "lmdeploy.serve.openai.api_server.serve(\n"
        f"    {model_path!r},\n"
        f"    model_name={plan.engine.model_name!r},\n"
        f"    backend={plan.engine.backend!r},\n"
        f"    backend_config={plan.engine.config_class}({cfg}),\n"
        f"    chat_template_config={template},\n"
        f"    server_name={plan.engine.host!r}, server_port={plan.engine.port},\n"
        f"    api_keys={'[...]' if plan.engine.api_keys else None}, "
        f"trust_remote_code={plan.engine.trust_remote_code})"
    )


def prepare(request: ServeRequest) -> Plan:
    """The plan serve would run, from the config alone (no weights downloaded)."""
    from .apikeys import resolve_api_keys
    from .supervise import validate_host, validate_port

    timeout = request.health_timeout_s
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise BadOption("--health-timeout", str(timeout), "must be a number of seconds greater than 0, e.g. 1800")
    host = validate_host(request.plan.host)
    port = validate_port(request.plan.port)
    keys = resolve_api_keys(list(request.api_keys), key_file=request.api_key_file) or []
    plan = build_plan(replace(request.plan, host=host, port=port, need_files=False))
    return replace(plan, engine=replace(plan.engine, api_keys=tuple(keys)))


def _write_spec(plan: Plan, model_path: Path) -> tuple[Path, Path]:
    run_dir = cache_dir() / "runs" / slug(f"{plan.engine.model_name}-{plan.engine.port}")
    spec_path = run_dir / SPEC_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{SPEC_NAME}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold API keys
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(spec_to_json(plan.engine, str(model_path)), handle, indent=2)
        os.replace(tmp, spec_path)
    except OSError as err:
        raise RunDirNotWritable(str(run_dir), err.strerror or str(err)) from None
    return spec_path, run_dir / LOG_NAME


ENGINE_SERVER = ("-m", "launcher.engine_server")
PROBE_TRIALS = 1


def probe_lengths(native: int, session_len: int) -> tuple[int, ...]:
    """0.5x, 1x, 1.5x and 2x the native context, capped to fit the session; and the longest prompt
    the session takes when that is longer still (Llama 3.1: native 8k, served 128k)."""
    from .probe.settings import default_lengths, longest_prompt

    return tuple(sorted(set(default_lengths(native, session_len)) | {longest_prompt(session_len)}))


def _probe_hook(plan: Plan, run_dir: Path, out: TextIO, ppl_text: Path | None = None) -> Callable:
    """``serve --probe``: once ready, a passkey sweep (see ``probe_lengths``), then with ``ppl_text``
    the long-context loss of that text at the same lengths (``launch ppl``); a Ctrl-C cuts them short,
    and their tables and files are still written before serve hands over. A ppl measurement that
    cannot run (a text shorter than the windows, a server without /get_ppl) is one warning line:
    the server keeps serving."""

    def run(info) -> Callable[[], None]:
        from datetime import datetime

        from .errors import LaunchError
        from .probe import ProbeSettings, publish, sweep

        d = plan.decision
        lengths = probe_lengths(d.native_context, d.session_len)
        settings = ProbeSettings(
            lengths=lengths, url=info.root_url, model=info.model_name,
            api_key=info.api_key, native_context=d.native_context, trials=PROBE_TRIALS,
        )
        stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
        result = sweep(settings)
        ppl_result, ppl_error = None, None
        if ppl_text is not None and not result.interrupted:
            from .ppl import PplSettings, measure

            try:
                ppl_result = measure(PplSettings(
                    lengths=lengths, texts=(ppl_text,), span=min(512, min(lengths) // 2), url=info.root_url,
                    api_key=info.api_key, native_context=d.native_context))
            except LaunchError as err:
                ppl_error = err

        def finish() -> None:
            publish(result, run_dir / f"probe-{stamp}", out)
            if ppl_result is not None:
                from .ppl import publish as publish_ppl

                publish_ppl(ppl_result, run_dir / f"ppl-{stamp}", out)
            if ppl_error is not None:
                print(f"launch: warning: no ppl measurement: {ppl_error}", file=out)

        return finish

    return run


def serve(request: ServeRequest, out: TextIO | None = None,
          server_argv: tuple[str, ...] | None = None) -> int:
    """Run serve end to end. Returns the exit code (0 after a clean stop).

    ``server_argv`` is the serving process's command before the spec path (default: this Python
    running ``launcher.engine_server``); the tests pass a stand-in for the GPU engine there."""
    out = out or sys.stdout
    plan = prepare(request)
    if request.dry_run:
        if request.as_json:
            data = plan_json(plan)
            data["engine_call"] = engine_call(plan, str(plan.overlay_path or "<overlay>"))
            print(json.dumps(data, indent=2, ensure_ascii=False), file=out)
        else:
            print(render_plan(plan), file=out)
            print("\nengine call (in the serving process):", file=out)
            print(engine_call(plan, str(plan.overlay_path or "<overlay: made after download>")), file=out)
        return 0

    from .supervise import check_port_free, run_supervised

    _check_gpus(plan)
    _check_memory(plan)
    _check_engine(plan)
    check_port_free(plan.engine.host, plan.engine.port)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if plan.memory is None:
        print(f"warning: the KV-cache fit is not checked: {plan.memory_note}", file=sys.stderr)

    # Now the slow part: the files, then a plan from the real config and weights.
    full = build_plan(replace(request.plan, host=plan.engine.host, port=plan.engine.port, need_files=True))
    full = replace(full, engine=replace(full.engine, api_keys=plan.engine.api_keys))
    _check_memory(full)
    _check_engine(full)
    overlay = make_overlay(full)
    check_overlay(overlay.path)
    print(f"overlay: {overlay.path} ({'reused' if overlay.reused else 'written'})", file=sys.stderr)
    spec_path, log_path = _write_spec(full, overlay.path)

    def on_ready(info) -> None:
        for line in info.summary_lines():
            print(line, file=out)
        out.flush()

    argv = list(server_argv or (sys.executable, *ENGINE_SERVER)) + [str(spec_path)]
    return run_supervised(
        argv,
        host=full.engine.host,
        port=full.engine.port,
        log_path=log_path,
        model_name=full.engine.model_name,
        api_keys=list(full.engine.api_keys) or None,
        health_timeout_s=request.health_timeout_s,
        on_ready=on_ready,
        probe=_probe_hook(full, spec_path.parent, out, request.ppl_text) if request.probe else None,
        check_port=True,
    )
