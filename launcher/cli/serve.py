"""`launch serve`: resolve -> fetch -> overlay -> plan -> lmdeploy OpenAI server, supervised."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from launcher.cli.app import app
from launcher.cli.options import (
    ENGINE_FLAGS,
    MODEL_FLAGS,
    ROUTER_FLAGS,
    SERVER_FLAGS,
    ApiKeyFileOpt,
    HealthTimeoutOpt,
    JsonOpt,
    api_keys_option,
    request_command,
)
from launcher.plan.request import PlanRequest
from launcher.runtime.supervise import DEFAULT_HEALTH_TIMEOUT_S

ApiKeysOpt = api_keys_option("API key clients must send (repeat for several). Visible to other users in `ps`: "
                             "prefer LAUNCH_API_KEYS=k1,k2 or --api-key-file.")


@app.command(
    epilog=(
        "Examples:  launch serve internlm2_5-7b-chat --context 128k   |   launch serve internlm2_5-7b-chat --factor 2   |   "
        "launch serve qwen2.5-7b-instruct --factor 4 --type yarn --tp 2 --api-key $KEY   |   "
        "launch serve internlm2_5-7b-chat --factor 2 --dry-run --gpu-memory 80   |   "
        "launch serve internlm2_5-7b-chat --factor 4 --tp 2 --replicas 4 --host 0.0.0.0 --port 8000   |   "
        "launch serve MODEL --tp 16 --nnodes 2 --node-rank 0 --dist-init-addr 10.0.0.1:29500"
    )
)
@request_command(MODEL_FLAGS, ENGINE_FLAGS, "model_name", "revision", "trust_remote_code", SERVER_FLAGS, ROUTER_FLAGS)
def serve(
    request: PlanRequest,
    api_key: ApiKeysOpt = None,
    api_key_file: ApiKeyFileOpt = None,
    health_timeout: HealthTimeoutOpt = DEFAULT_HEALTH_TIMEOUT_S,
    probe: Annotated[
        bool, typer.Option("--probe", help="Once ready, run a passkey probe at 0.5x, 1x, 1.5x and 2x native.")
    ] = False,
    proxy_url: Annotated[
        str | None,
        typer.Option("--proxy-url", metavar="URL", help="Register with this lmdeploy proxy once /health answers (e.g. "
                     "http://10.0.0.1:8000); leave it on stop.", show_default=False),
    ] = None,
    advertise_url: Annotated[
        str | None,
        typer.Option("--advertise-url", metavar="URL", help="The URL the proxy reaches this server at. Default: http://HOST:PORT "
                     "(needed with --host 0.0.0.0).", show_default=False),
    ] = None,
    ppl_text: Annotated[Path | None, typer.Option(
        "--ppl-text", metavar="FILE", help="With --probe: also measure the long-context loss of this text at the "
        "probe's lengths (launch ppl).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and the exact engine call; stop.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Serve MODEL with F x its native context through lmdeploy's OpenAI-compatible API.

    MODEL is a preset name (`launch presets`), a Hugging Face repo id ORG/NAME, or a local model
    directory. Everything is checked before anything is downloaded or loaded; --dry-run stops there.
    """
    from launcher.app.serve import ServeRequest
    from launcher.app.serve import serve as run_serve
    from launcher.eval.ppl.text import serve_ppl_text

    # Every value was read by the parser: the request carries them typed, and nothing reads them again.
    request = ServeRequest.from_flags(
        plan=request,
        api_keys=tuple(api_key or ()),
        api_key_file=api_key_file,
        dry_run=dry_run,
        as_json=as_json,
        probe=probe,
        health_timeout_s=health_timeout,
        proxy_url=proxy_url,
        advertise_url=advertise_url,
        ppl_text=serve_ppl_text(ppl_text, probe),
    )
    raise typer.Exit(run_serve(request))
