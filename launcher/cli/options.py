"""Option types shared by several commands, declared once.

Every value is checked where it enters, here in the parser, so that a bad value gets the same
one-line error everywhere and the command gets it typed. A flag of the one request (``plan``,
``serve``, ``patch``) is declared with ``request_flag``: its reader is the request's own
(``launcher.plan.request.FLAGS``), so ``check_request`` never reads it again. Any other number
flag is declared with ``number``: text in the parser (click's INT and FLOAT would take "２" and
"1_000", and answer in their own voice), read by its entry in the one table of limits
(``launcher/rules/limits.py``) through ``checks.limited``. A number's help states the range from
that entry.

A set of flags that several commands take is declared once, as ``inspect.Parameter``s (``flag``):
Typer reads options from a function's signature, so ``takes`` puts the set's parameters into the
command's signature and hands the body their values as one typed object. The request's flags
(``REQUEST_FLAGS``) reach ``plan``, ``serve``, ``patch`` and ``k8s`` as one ``PlanRequest``
(``request_command``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from launcher.engine.routing import DEFAULT_ROUTING, ROUTINGS
from launcher.engine.spec import DEFAULT_HOST, DEFAULT_PORT, DEFAULTS
from launcher.plan.request import FLAGS, PlanRequest
from launcher.rules import checks, limits
from launcher.runtime.supervise import DEFAULT_HEALTH_TIMEOUT_S
from launcher.scaleout.proxy import DEFAULT_PROXY_PORT, DEFAULT_START_TIMEOUT_S

Command = TypeVar("Command", bound=Callable[..., Any])


def flag(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    """The parameter ``name: annotation = default`` of a command's signature, for a set of flags
    (``inspect.Parameter.empty``: no default, a required argument)."""
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation, default=default)


def takes(into: str, build: Callable[..., Any], *flags: inspect.Parameter) -> Callable[[Command], Command]:
    """A command that takes ``flags``: they stand in its signature (what Typer reads) where its
    parameter ``into`` stands, in the order given, and its body gets ``build(**their values)`` as
    ``into``. The body's other parameters are its own flags, as Typer reads them."""

    def decorate(body: Command) -> Command:
        own = inspect.signature(body, eval_str=True)  # Typer wants the annotations themselves
        params = list(own.parameters.values())
        at = list(own.parameters).index(into)

        def command(**values):  # no annotations: Typer would read them in the body's module
            taken = {p.name: values.pop(p.name) for p in flags}
            return body(**values, **{into: build(**taken)})

        functools.update_wrapper(command, body, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
        command.__signature__ = own.replace(parameters=[*params[:at], *flags, *params[at + 1:]])  # type: ignore[attr-defined]
        return command  # type: ignore[return-value]

    return decorate


def optional(kind: type, *names: str, help: str, **more: Any) -> Any:
    """An option that may be left out (None, no default shown): ``Annotated[kind | None, ...]``."""
    return Annotated[kind | None, typer.Option(*names, help=help, show_default=False, **more)]


def _ranged(help: str, limit: limits.Limit | None, default: object) -> str:
    """``help`` ended by the range of ``limit`` and by ``default`` (a value held elsewhere, shown as it is)."""
    tail = f" {limit.rule[0].upper()}{limit.rule[1:]}." if limit is not None else ""
    if default is not None:
        tail += f" Default: {default:g}." if isinstance(default, float) else f" Default: {default}."
    return help + tail


def number(limit: limits.Limit, *names: str, help: str, default: object = None, example: object = None,
           **more: Any) -> Any:
    """A number flag: text in the parser, read by ``checks.limited(names[0], text, limit)`` as it is
    parsed, so the command gets an int or float in range (or None when the flag is left out) and a
    bad value is one ``BadOption`` line, whatever the command. Its range (from ``limit``) and
    ``default`` end the help; ``example`` replaces the limit's own in a refusal ("e.g.
    --health-timeout 1800").

    Usage, one line per flag: ``seconds: number(limits.SECONDS, "--timeout", help="...") = None``."""
    if example is not None:
        limit = replace(limit, example=example)

    def checked(value: str | None) -> int | float | None:
        return None if value is None else checks.limited(names[0], value, limit)

    more.setdefault("metavar", "N" if limit.whole else "X")
    return optional(str, *names, help=_ranged(help, limit, default), callback=checked, **more)


def request_flag(name: str, *aliases: str, help: str, default: object = None, **more: Any) -> Any:
    """The flag of the request's value ``name`` (a field of ``PlanRequest``): its option and its
    reader from ``FLAGS``, run as it is parsed, so the command gets the value typed (None when the
    flag is left out). A number's range ends the help, then ``default``."""
    flag = FLAGS[name]
    if flag.limit is not None:
        more.setdefault("metavar", "N" if flag.limit.whole else "X")
    return optional(str, flag.option, *aliases, help=_ranged(help, flag.limit, default),
                    callback=lambda value: flag(value), **more)


ModelArg = Annotated[
    str,
    typer.Argument(help="A preset name (see `launch presets`), a Hub repo id (org/name) or a local model "
                   "directory.", show_default=False),
]
FactorOpt = request_flag("factor", "-f", metavar="F", help="Context multiplier: serve N x F tokens.",
                   default="the preset's")
TypeOpt = request_flag("rope_type", "-t", help="RoPE scaling type: dynamic, linear, yarn or llama3. "
                   "Default: the preset's, else the config's, else dynamic.")
SessionLenOpt = request_flag("session_len", metavar="TOKENS", help="Tokens per session.",
                       default="what the scaling covers (N x F)")
ContextOpt = request_flag("context", "-c", metavar="TOKENS", help="The session you want (64k = 65,536; 1m = "
                         "1,048,576); the factor follows: none when the config covers it, the published recipe's "
                         "when one does, else TOKENS / native with the preset's type. Not with --factor or "
                         "--session-len.")
CpOpt = request_flag("cp", help="TurboMind context parallelism: of the --tp GPUs, cp split every sequence's "
                     "tokens (tp must be a multiple of cp; 2, 4, 8...).", default=f"the preset's, else {DEFAULTS.cp}")
PrefixCachingOpt = optional(bool, "--enable-prefix-caching/--no-prefix-caching",
                            help="Reuse the KV cache of a repeated prompt prefix (lmdeploy's). Refused where a "
                            "session can pass the dynamic-NTK threshold (cached keys would be rotated under "
                            "another base). Default: the preset's, else off.")
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Allow replacing another scaling type, shrinking the context, or a "
                 "session past what the scaling covers."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
# as typed: Path('') would silently become the current directory
OutOpt = optional(str, "--out", "-o", help="Where to write the overlay. Default: launch's cache directory.")
BackendOpt = request_flag("backend", help="turbomind or pytorch. Default: the preset's, else turbomind.")
TpOpt = request_flag("tp", help="Tensor parallel GPUs.", default=f"the preset's, else {DEFAULTS.tp}")
MaxBatchOpt = request_flag("max_batch_size", help="Concurrent sequences.",
                     default=f"the preset's, else {DEFAULTS.max_batch_size}")
CacheRatioOpt = request_flag("cache_max_entry_count", metavar="RATIO",
                       help="Share of free GPU memory (after weights) for the KV cache.",
                       default=f"the preset's, else {DEFAULTS.cache_max_entry_count:g}")
QuantOpt = request_flag("quant_policy", metavar="0|8|4", help="KV cache: 0 fp16, 8 int8, 4 int4. "
                    f"Default: the preset's, else {DEFAULTS.quant_policy}.")
GpuMemoryOpt = request_flag("gpu_memory_gib", metavar="GIB",
                      help="Free memory per GPU in GiB, to plan on a machine without one.", default="read through NVML")
ModelNameOpt = request_flag("model_name", help="Served model name. Default: the preset or directory name.")
RevisionOpt = request_flag("revision", help="Branch, tag or commit sha on the Hub. Default: the preset's pin, else main.")
TrustOpt = optional(bool, "--trust-remote-code/--no-trust-remote-code",
                    help="Use (and download) the repo's own Python code. Default: only when the preset says so.")
HostOpt = Annotated[str, typer.Option(FLAGS["host"].option, help="Address to bind. Only this machine by default.",
                                      callback=lambda value: FLAGS["host"](value))]
PortOpt = request_flag("port", metavar="PORT", help="Port of the OpenAI API (of the proxy with --replicas).",
                 default=DEFAULT_PORT)
ReplicasOpt = request_flag("replicas", help="N engines on this machine, tp GPUs each, behind lmdeploy's "
                     "proxy on --port; the replicas listen on loopback ports after it.", default=1)
NnodesOpt = request_flag("nnodes", help="One engine across N nodes (TurboMind): --tp is the TOTAL, tp/N "
                   "GPUs per node.", default=1)
NodeRankOpt = request_flag("node_rank", metavar="R", help="This node's rank with --nnodes, 0 to N-1; rank 0 "
                     "serves HTTP.")
DistInitAddrOpt = optional(str, "--dist-init-addr", metavar="HOST:PORT",
                           help="Node 0's rendezvous HOST:PORT with --nnodes, the same on every node.")
RoutingOpt = optional(str, "--routing", metavar="|".join(ROUTINGS),
                      help=f"With --router lmdeploy: how lmdeploy's proxy picks a replica (default {DEFAULT_ROUTING}): min_expected_latency "
                      "sends each request to the replica with the fewest in flight, so faster replicas get more; "
                      "random picks one uniformly, whatever its load; min_observed_latency is refused. serve and "
                      "plan: with --replicas.")
RouterOpt = optional(str, "--router", metavar="vllm|lmdeploy",
                     help="The router in front of the replicas: vllm (the default: vllm-router behind launch's "
                     "front, which retries a failed request on another replica and routes by load) or lmdeploy "
                     "(lmdeploy's proxy, with launch's watchdog).", callback=lambda value: FLAGS["router"](value))
HealthTimeoutOpt = number(limits.SECONDS, "--health-timeout", metavar="SECONDS", example=1800,
                          help="Seconds to wait for the engine to load and answer /health.",
                          default=DEFAULT_HEALTH_TIMEOUT_S)
ProxyPortOpt = number(limits.PORT, "--port", metavar="PORT", help="Port of the proxy (OpenAI API and node API).",
                      default=DEFAULT_PROXY_PORT, example=DEFAULT_PROXY_PORT)
StartTimeoutOpt = number(limits.SECONDS, "--start-timeout", metavar="SECONDS", example=120,
                         help="Seconds to wait for the proxy to answer.", default=DEFAULT_START_TIMEOUT_S)
ApiKeyFileOpt = optional(Path, "--api-key-file", help="File with one API key per line.")


def api_keys_option(help: str) -> Any:
    """``--api-key``, repeated for several keys (serve and proxy start; each its own help)."""
    return optional(list[str], "--api-key", help=help)


# Every flag of the one request, declared once, in the order a command's help lists them; a command
# takes sets of them (below) with ``request_command``. ``gpu_memory`` (the parameter's name in click, which
# tests read) is the request's ``gpu_memory_gib``.
REQUEST_FLAGS: dict[str, inspect.Parameter] = {p.name: p for p in (
    flag("model", ModelArg, inspect.Parameter.empty),
    flag("factor", FactorOpt),
    flag("rope_type", TypeOpt),
    flag("session_len", SessionLenOpt),
    flag("context", ContextOpt),
    flag("force", ForceOpt, False),
    flag("backend", BackendOpt),
    flag("tp", TpOpt),
    flag("max_batch_size", MaxBatchOpt),
    flag("cache_max_entry_count", CacheRatioOpt),
    flag("quant_policy", QuantOpt),
    flag("cp", CpOpt),
    flag("enable_prefix_caching", PrefixCachingOpt),
    flag("gpu_memory", GpuMemoryOpt),
    flag("model_name", ModelNameOpt),
    flag("revision", RevisionOpt),
    flag("trust_remote_code", TrustOpt),
    flag("out", OutOpt),
    flag("host", HostOpt, DEFAULT_HOST),
    flag("port", PortOpt, str(DEFAULT_PORT)),
    flag("replicas", ReplicasOpt, "1"),
    flag("nnodes", NnodesOpt, "1"),
    flag("node_rank", NodeRankOpt),
    flag("dist_init_addr", DistInitAddrOpt),
    flag("routing", RoutingOpt),
    flag("router", RouterOpt),
)}


def _set(names: str) -> tuple[inspect.Parameter, ...]:
    return tuple(REQUEST_FLAGS[name] for name in names.split())


MODEL_FLAGS = _set("model factor rope_type session_len context force")  # patch, plan, serve, k8s
ENGINE_FLAGS = _set("backend tp max_batch_size cache_max_entry_count quant_policy cp enable_prefix_caching "
                    "gpu_memory")  # plan, serve, k8s
SERVER_FLAGS = _set("host port replicas nnodes node_rank dist_init_addr")  # plan, serve
ROUTER_FLAGS = _set("routing router")  # plan, serve, k8s


def _plan_request(gpu_memory: float | None = None, **values: Any) -> PlanRequest:
    return PlanRequest.from_flags(gpu_memory_gib=gpu_memory, **values)


def request_command(*flags: str | tuple[inspect.Parameter, ...]) -> Callable[[Command], Command]:
    """``takes`` for a command of the one request: ``flags`` are sets (``MODEL_FLAGS``..., or a
    command's own wording of request flags, as k8s's ``POD_FLAGS``) and names in ``REQUEST_FLAGS``,
    in the order of its help; the body gets their ``PlanRequest`` as ``request``, each value already
    read by the parser."""
    params = [p for item in flags for p in ((REQUEST_FLAGS[item],) if isinstance(item, str) else item)]
    return takes("request", _plan_request, *params)
