"""The one request of ``plan``, ``serve`` and ``patch``: what the user asked for, each value typed and
checked once, where it enters.

A flag enters through the parser: ``cli/options.py`` gives every request flag its reader from
``FLAGS`` (below), so the command gets typed values (an int, a float, a canonical host) and builds
``PlanRequest.from_flags(...)``. Code enters with ``PlanRequest(...)``, its values as given (text or
numbers), and ``check_request`` reads them with the same ``FLAGS``. Either way ``check_request``
then applies, once, the rules that join several flags (``--context`` alone, without ``--factor`` or
``--session-len``; one layout at most, ``--routing`` only with replicas, ``--node-rank`` and ``--dist-init-addr`` only across nodes, ``--out``), and returns the
request *checked*: ``build_plan``, the layouts and ``serve`` read its values as they are and check
none of them again. A request changed with ``dataclasses.replace`` starts again as given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.engine.routing import DEFAULT_ROUTER, check_router, check_routing
from launcher.engine.spec import BACKENDS, DEFAULT_HOST, DEFAULT_PORT
from launcher.rules import checks, limits
from launcher.rules.checks import BadOption
from launcher.rules.kvcache import QUANT_POLICIES
from launcher.rules.limits import Limit
from launcher.runtime.address import check_host, is_wildcard, validate_host, validate_port

if TYPE_CHECKING:
    from launcher.model.source import Fetching

GIVEN, PARSED, CHECKED = "as given", "typed by the parser", "checked"


@dataclass(frozen=True)
class Flag:
    """A request flag: its name, and ``read``: the value as given -> typed, or a one-line refusal
    (``BadOption``; ``UnknownRopeType`` for ``--type``). ``limit``: a number's entry in the table of
    limits (its help states the range)."""

    option: str
    read: Callable[[Any], Any]
    limit: Limit | None = None

    def __call__(self, value: Any) -> Any:
        return None if value is None else self.read(value)


def _number(option: str, limit: Limit) -> Flag:
    return Flag(option, lambda value: checks.limited(option, value, limit), limit)


def _rope_type(value: Any) -> str:
    from launcher.rules.rope import parse_rope_type  # the RoPE rules load with a plan, not with every command

    return parse_rope_type(value)


# Each request value's flag and reader, written once: the parser reads flags with it, check_request
# reads code's values with it, in this order.
FLAGS: dict[str, Flag] = {
    "factor": _number("--factor", limits.FACTOR),
    "rope_type": Flag("--type", _rope_type),
    "session_len": _number("--session-len", limits.SESSION_LEN),
    "context": _number("--context", limits.CONTEXT_ASKED),
    "cp": _number("--cp", limits.CP),
    "enable_prefix_caching": Flag("--enable-prefix-caching", lambda value: checks.boolean("--enable-prefix-caching", value)),
    "backend": Flag("--backend", lambda value: checks.one_of("--backend", value, BACKENDS)),
    "tp": _number("--tp", limits.TP),
    "max_batch_size": _number("--max-batch-size", limits.MAX_BATCH_SIZE),
    "cache_max_entry_count": _number("--cache-max-entry-count", limits.CACHE_MAX_ENTRY_COUNT),
    "quant_policy": Flag("--quant-policy", lambda value: checks.choice("--quant-policy", value, QUANT_POLICIES)),
    "gpu_memory_gib": _number("--gpu-memory", limits.GPU_MEMORY),
    "host": Flag("--host", validate_host),
    "port": _number("--port", limits.PORT),
    "model_name": Flag("--model-name", lambda value: checks.word("--model-name", value, "a name")),
    "revision": Flag("--revision", lambda value: checks.revision("--revision", value)),
    "replicas": _number("--replicas", limits.REPLICAS),
    "nnodes": _number("--nnodes", limits.NNODES),
    "node_rank": _number("--node-rank", limits.NODE_RANK),
    "router": Flag("--router", check_router),
}


@dataclass(frozen=True)
class Entered:
    """A request that knows how far its values were checked: ``stage`` is ``GIVEN`` (made in code),
    ``PARSED`` (``from_flags``: every value typed by the parser) or ``CHECKED`` (by its check
    function). It is no argument: ``dataclasses.replace`` makes a request that starts as given."""

    stage: str = field(default=GIVEN, init=False, repr=False, compare=False)

    @classmethod
    def from_flags(cls, **values: Any):
        """The request of a command's flags, each already read by the parser (``FLAGS``)."""
        return cls(**values).entered(PARSED)

    def entered(self, stage: str):
        object.__setattr__(self, "stage", stage)
        return self


@dataclass(frozen=True)
class PlanRequest(Entered):
    """What the user asked for; ``None`` means the preset's (or lmdeploy's) default. Checked
    (``check_request``), every value is typed and in range and the flags agree with each other."""

    model: str
    factor: float | str | None = None
    rope_type: str | None = None
    session_len: int | str | None = None
    context: int | str | None = None  # the session asked for; the factor follows (rules/context.py)
    force: bool = False
    backend: str | None = None
    tp: int | str | None = None
    max_batch_size: int | str | None = None
    cache_max_entry_count: float | str | None = None
    quant_policy: int | str | None = None
    cp: int | str | None = None
    enable_prefix_caching: bool | None = None  # None: the preset's (off unless it says so)
    gpu_memory_gib: float | str | None = None
    host: str = DEFAULT_HOST
    port: int | str = DEFAULT_PORT
    model_name: str | None = None
    out: Path | str | None = None
    need_files: bool = False
    revision: str | None = None
    trust_remote_code: bool | None = None
    quiet: bool = False
    hub_timeout_s: float | str | None = None
    # scale-out: N replicas on this machine behind lmdeploy's proxy, or one engine across N nodes
    # (tp is then the TOTAL over them; GPUs here: tp / nnodes)
    replicas: int | str = 1
    nnodes: int | str = 1
    node_rank: int | str | None = None  # serve: this node's rank; plan: all ranks are shown
    dist_init_addr: str | None = None  # HOST:PORT of node 0's rendezvous, canonical once checked
    routing: str | None = None  # lmdeploy's proxy's, with replicas and --router lmdeploy (None: its default)
    # in front of the replicas: vllm or lmdeploy; None as given means the default, which the check resolves
    # (with replicas; without, it stays None)
    router: str | None = None

    @property
    def scale_out(self) -> str | None:
        """``"replicas"``, ``"nodes"`` or ``None`` (one engine on one machine)."""
        return "replicas" if self.replicas > 1 else "nodes" if self.nnodes > 1 else None

    @property
    def fetching(self) -> Fetching:
        from launcher.model.source import Fetching

        return Fetching(revision=self.revision, quiet=self.quiet, timeout_s=self.hub_timeout_s,
                        trust_remote_code=self.trust_remote_code)


def check_request(request: PlanRequest) -> PlanRequest:
    """``request`` checked: values given in code read by ``FLAGS`` (a parsed request's were read by
    the parser), then the rules that join flags (``joined``). A one-line ``BadOption`` (or
    ``UnknownRopeType``, ``RoutingRefused``, ``OverlayConflict``) otherwise. Reads no config and
    makes no request: it runs before anything is downloaded or written. A checked request is
    returned as it is."""
    if request.stage == CHECKED:
        return request
    typed = request
    if request.stage != PARSED:
        typed = replace(request, **{name: flag(getattr(request, name)) for name, flag in FLAGS.items()})
    return replace(typed, **joined(typed)).entered(CHECKED)


def joined(r: PlanRequest) -> dict[str, Any]:
    """The rules between flags of a typed request (the values it changes: ``out``, ``routing`` and
    ``dist_init_addr`` in their checked form)."""
    for option, value in (("--factor", r.factor), ("--session-len", r.session_len)):
        if r.context is not None and value is not None:
            raise BadOption(option, f"{value:g}" if isinstance(value, float) else str(value), f"--context {r.context} already sets the session and the factor "
                            "follows from it: give --context alone, or --factor / --session-len without it")
    out = r.out
    if out is not None:
        from launcher.model.overlay import check_target

        local = Path(r.model).expanduser()
        out = check_target(out, local if local.is_dir() else None)
    if r.replicas > 1 and r.nnodes > 1:
        raise BadOption("--replicas", str(r.replicas), "replicas of a multi-node engine are not laid out by launch; "
                        "give --replicas (one machine) or --nnodes (one engine across nodes)")
    routing = r.routing
    if r.router is not None and r.replicas < 2:
        raise BadOption("--router", str(r.router), "picks the router in front of --replicas N (2 or more); without "
                        "replicas there is none (for your own, `launch proxy start --router`)")
    router = (r.router or DEFAULT_ROUTER) if r.replicas > 1 else None  # the default, resolved here once
    if routing is not None:
        if r.replicas < 2:
            raise BadOption("--routing", str(routing), "picks a replica behind the proxy that --replicas N (2 or "
                            "more) runs; without replicas there is no proxy (for your own, `launch proxy start "
                            "--routing`)")
        if router != "lmdeploy":
            raise BadOption("--routing", str(routing), "is a strategy of lmdeploy's proxy: add --router lmdeploy "
                            "(the default router, vllm-router, routes by load and retries on another replica)")
        routing = check_routing(routing)
    if r.nnodes == 1:
        for option, value in (("--node-rank", r.node_rank), ("--dist-init-addr", r.dist_init_addr)):
            if value is not None:
                raise BadOption(option, str(value), "is for one engine across nodes: give --nnodes N (2 or more) too")
        return {"out": out, "routing": routing, "router": router}
    if r.dist_init_addr is None:
        raise BadOption("--dist-init-addr", "", "one engine across nodes needs node 0's rendezvous address, "
                        "the same on every node, e.g. --dist-init-addr 10.0.0.1:29500")
    host, port = parse_dist_init_addr(r.dist_init_addr)
    if r.node_rank is not None and r.node_rank >= r.nnodes:  # its range is the parser's; its bound is --nnodes
        raise checks.refusal("--node-rank", str(r.node_rank), Limit(True, 0, r.nnodes - 1, example=0))
    return {"out": out, "routing": routing, "router": router, "dist_init_addr": f"{host}:{port}"}


def parse_dist_init_addr(value: str) -> tuple[str, int]:
    """``HOST:PORT`` of node 0's rendezvous, as TurboMind splits it (one ``:``; no IPv6 literal);
    the host by the one host rule (``address.check_host``), the port by the one port rule."""
    text = (value or "").strip()
    host, sep, port = text.partition(":")
    advice = ("give node 0's address and a free port, HOST:PORT, e.g. 10.0.0.1:29500 (TurboMind splits it at its "
              "one ':')")
    try:
        number = validate_port(port) if sep and host and ":" not in port else None
        host = check_host(host, "--dist-init-addr", advice) if number is not None else host
    except BadOption:
        number = None
    if number is None:
        raise BadOption("--dist-init-addr", value, advice)
    if host == "*" or is_wildcard(host):
        raise BadOption("--dist-init-addr", value, "the other nodes connect there: give node 0's real address")
    return host, number


# The request's values that are `launch serve` switches: (the switch when True, the switch when False).
_SWITCHES = {"force": ("--force", None),
             "enable_prefix_caching": ("--enable-prefix-caching", "--no-prefix-caching"),
             "trust_remote_code": ("--trust-remote-code", "--no-trust-remote-code")}
# Request values with a `launch serve` flag that FLAGS does not read (check_request reads them by rule).
_JOINED_OPTIONS = {"dist_init_addr": "--dist-init-addr", "routing": "--routing"}


def serve_argv(request: PlanRequest, *, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The ``launch serve`` flags (MODEL not included) that reproduce the checked ``request``: each
    value that differs from the request's default, under its option from ``FLAGS`` (and
    ``--dist-init-addr``, ``--routing``), as its reader reads it back (a float in full, ``2.0`` as
    ``2``); a switch as its switch. A value that starts with '-' is written ``--option=VALUE``.
    ``leave_out``: request fields the caller sets itself. What is no flag of serve (``out``,
    ``need_files``, ``quiet``, ``hub_timeout_s``) is left out."""
    from dataclasses import MISSING, fields

    if request.stage != CHECKED:
        raise ValueError("serve_argv takes a checked request (check_request)")
    options = {**{name: flag.option for name, flag in FLAGS.items()}, **_JOINED_OPTIONS}
    argv: list[str] = []
    for spec in fields(request):
        name, value = spec.name, getattr(request, spec.name)
        if not spec.init or name in leave_out or spec.default is MISSING or value == spec.default:
            continue  # ``model`` has no default: it is serve's argument, not a flag
        if name in _SWITCHES:
            switch = _SWITCHES[name][0 if value else 1]
            argv += [switch] if switch is not None else []
        elif name in options:
            text = str(value)
            if isinstance(value, float):  # as the reader reads it back: whole as whole, else in full
                text = str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
            argv += [f"{options[name]}={text}"] if text.startswith("-") else [options[name], text]
    return argv
