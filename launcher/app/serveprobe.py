"""``serve --probe``: once the server is ready, a passkey sweep (and with ``--ppl-text`` the long-context
loss of that text) against it, written into the run's folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from launcher.plan.build import Plan

PROBE_TRIALS = 1


def probe_lengths(native: int, session_len: int) -> tuple[int, ...]:
    """0.5x, 1x, 1.5x and 2x the native context, capped to fit the session; and the longest prompt
    the session takes when that is longer still (Llama 3.1: native 8k, served 128k)."""
    from launcher.eval.probe.settings import default_lengths, longest_prompt

    return tuple(sorted(set(default_lengths(native, session_len)) | {longest_prompt(session_len)}))


def probe_hook(plan: Plan, run_dir: Path, out: TextIO, ppl_text: Path | None = None) -> Callable:
    """``serve --probe``: once ready, a passkey sweep (see ``probe_lengths``), then with ``ppl_text``
    the long-context loss of that text at the same lengths (``launch ppl``); a Ctrl-C cuts them short,
    and their tables and files are still written before serve hands over. A ppl measurement that
    cannot run (a text shorter than the windows, a server without /get_ppl) is one warning line:
    the server keeps serving."""

    def run(info) -> Callable[[], None]:
        from datetime import datetime

        from launcher.errors import LaunchError
        from launcher.eval.probe import ProbeSettings, publish, sweep

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
            from launcher.eval.ppl import PplSettings, measure

            try:
                ppl_result = measure(PplSettings(
                    lengths=lengths, texts=(ppl_text,), span=min(512, min(lengths) // 2), url=info.root_url,
                    api_key=info.api_key, native_context=d.native_context))
            except LaunchError as err:
                ppl_error = err

        def finish() -> None:
            publish(result, run_dir / f"probe-{stamp}", out)
            if ppl_result is not None:
                from launcher.eval.ppl import publish as publish_ppl

                publish_ppl(ppl_result, run_dir / f"ppl-{stamp}", out)
            if ppl_error is not None:
                print(f"launch: warning: no ppl measurement: {ppl_error}", file=out)

        return finish

    return run
