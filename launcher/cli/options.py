"""Option types shared by several commands, declared once.

Values that need checking (factor, type) arrive as text and are parsed by the library, so that a
bad value gets the same one-line error everywhere.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..proxy_start import DEFAULT_ROUTING, ROUTINGS


def optional(kind: type, *names: str, help: str, **more: Any) -> Any:
    """An option that may be left out (None, no default shown): ``Annotated[kind | None, ...]``."""
    return Annotated[kind | None, typer.Option(*names, help=help, show_default=False, **more)]


ModelArg = Annotated[
    str,
    typer.Argument(help="A preset name (see `launch presets`), a Hub repo id (org/name) or a local model "
                   "directory.", show_default=False),
]
FactorOpt = optional(str, "--factor", "-f", help="Context multiplier F > 1: serve N x F tokens. Default: the preset's.")
TypeOpt = optional(str, "--type", "-t", help="RoPE scaling type: dynamic, linear, yarn or llama3. "
                   "Default: the preset's, else the config's, else dynamic.")
SessionLenOpt = optional(int, "--session-len", help="Tokens per session. Default: what the scaling covers (N x F).")
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Allow replacing another scaling type, shrinking the context, or a "
                 "session past what the scaling covers."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
# as typed: Path('') would silently become the current directory
OutOpt = optional(str, "--out", "-o", help="Where to write the overlay. Default: launch's cache directory.")
BackendOpt = optional(str, "--backend", help="turbomind or pytorch. Default: the preset's, else turbomind.")
TpOpt = optional(int, "--tp", help="Tensor parallel GPUs.")
MaxBatchOpt = optional(int, "--max-batch-size", help="Concurrent sequences.")
CacheRatioOpt = optional(float, "--cache-max-entry-count", help="Share of free GPU memory (after weights) for the KV "
                         "cache, 0 < r < 1.")
QuantOpt = optional(int, "--quant-policy", help="KV cache: 0 fp16, 8 int8, 4 int4.")
GpuMemoryOpt = optional(float, "--gpu-memory", help="Free memory per GPU in GiB, to plan on a machine without one "
                        "(default: read through NVML).")
RevisionOpt = optional(str, "--revision", help="Branch, tag or commit sha on the Hub. Default: the preset's pin, else main.")
TrustOpt = optional(bool, "--trust-remote-code/--no-trust-remote-code",
                    help="Use (and download) the repo's own Python code. Default: only when the preset says so.")
HostOpt = Annotated[str, typer.Option("--host", help="Address to bind. Only this machine by default.")]
PortOpt = Annotated[str, typer.Option("--port", help="Port of the OpenAI API (of the proxy with --replicas).")]
ReplicasOpt = Annotated[
    str,
    typer.Option("--replicas", metavar="N", help="N engines on this machine, tp GPUs each, behind lmdeploy's proxy on --port; "
                 "the replicas listen on loopback ports after it."),
]
NnodesOpt = Annotated[
    str,
    typer.Option("--nnodes", metavar="N", help="One engine across N nodes (TurboMind): --tp is the TOTAL, tp/N GPUs per node."),
]
NodeRankOpt = optional(str, "--node-rank", metavar="R", help="This node's rank with --nnodes, 0 to N-1; rank 0 serves HTTP.")
DistInitAddrOpt = optional(str, "--dist-init-addr", metavar="HOST:PORT",
                           help="Node 0's rendezvous HOST:PORT with --nnodes, the same on every node.")
RoutingOpt = optional(str, "--routing", metavar="|".join(ROUTINGS),
                      help=f"How lmdeploy's proxy picks a replica (default {DEFAULT_ROUTING}): min_expected_latency "
                      "sends each request to the replica with the fewest in flight, so faster replicas get more; "
                      "random picks one uniformly, whatever its load; min_observed_latency is refused. serve and "
                      "plan: with --replicas.")
