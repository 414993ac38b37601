"""Option types shared by several commands, declared once.

Values that need checking (factor, type) arrive as text and are parsed by the library, so that a
bad value gets the same one-line error everywhere.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..proxy_start import DEFAULT_ROUTING, ROUTINGS

ModelArg = Annotated[
    str,
    typer.Argument(help="A preset name (see `launch presets`), a Hub repo id (org/name) or a local model "
                   "directory.", show_default=False),
]
FactorOpt = Annotated[
    str | None,
    typer.Option("--factor", "-f", help="Context multiplier F > 1: serve N x F tokens. Default: the preset's.",
                 show_default=False),
]
TypeOpt = Annotated[
    str | None,
    typer.Option("--type", "-t", help="RoPE scaling type: dynamic, linear, yarn or llama3. "
                 "Default: the preset's, else the config's, else dynamic.", show_default=False),
]
SessionLenOpt = Annotated[
    int | None,
    typer.Option("--session-len", help="Tokens per session. Default: what the scaling covers (N x F).",
                 show_default=False),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Allow replacing another scaling type, shrinking the context, or a "
                 "session past what the scaling covers."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
OutOpt = Annotated[
    str | None,  # as typed: Path('') would silently become the current directory
    typer.Option("--out", "-o", help="Where to write the overlay. Default: launch's cache directory.",
                 show_default=False),
]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", help="turbomind or pytorch. Default: the preset's, else turbomind.",
                 show_default=False),
]
TpOpt = Annotated[int | None, typer.Option("--tp", help="Tensor parallel GPUs.", show_default=False)]
MaxBatchOpt = Annotated[
    int | None, typer.Option("--max-batch-size", help="Concurrent sequences.", show_default=False)
]
CacheRatioOpt = Annotated[
    float | None,
    typer.Option("--cache-max-entry-count", help="Share of free GPU memory (after weights) for the KV "
                 "cache, 0 < r < 1.", show_default=False),
]
QuantOpt = Annotated[
    int | None,
    typer.Option("--quant-policy", help="KV cache: 0 fp16, 8 int8, 4 int4.", show_default=False),
]
GpuMemoryOpt = Annotated[
    float | None,
    typer.Option("--gpu-memory", help="Free memory per GPU in GiB, to plan on a machine without one "
                 "(default: read through NVML).", show_default=False),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", help="Branch, tag or commit sha on the Hub. Default: the preset's pin, else main.",
                 show_default=False),
]
TrustOpt = Annotated[
    bool | None,
    typer.Option("--trust-remote-code/--no-trust-remote-code",
                 help="Use (and download) the repo's own Python code. Default: only when the preset says so.",
                 show_default=False),
]
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
NodeRankOpt = Annotated[
    str | None,
    typer.Option("--node-rank", metavar="R", help="This node's rank with --nnodes, 0 to N-1; rank 0 serves HTTP.",
                 show_default=False),
]
DistInitAddrOpt = Annotated[
    str | None,
    typer.Option("--dist-init-addr", metavar="HOST:PORT", help="Node 0's rendezvous HOST:PORT with --nnodes, the same on every node.",
                 show_default=False),
]
RoutingOpt = Annotated[
    str | None,
    typer.Option("--routing", metavar="|".join(ROUTINGS), show_default=False,
                 help=f"How lmdeploy's proxy picks a replica (default {DEFAULT_ROUTING}): min_expected_latency spreads "
                 "evenly, random weighs by speed; min_observed_latency is refused. serve and plan: with --replicas."),
]
