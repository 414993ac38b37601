"""Passkey retrieval sweep: does the model still find a number hidden at any depth of a long prompt?

Library entry points (``launch probe`` and ``launch serve --probe`` call exactly these)::

    settings = ProbeSettings(lengths=(4096, 8192), url="http://127.0.0.1:23333", native_context=4096)
    result = sweep(settings)                      # run_probe with a progress display on stderr
    paths = publish(result, out_dir, sys.stdout)  # results.json, heatmap.png, then the table

Importing this package does not import matplotlib or transformers.
"""

from launcher.eval.probe.progress import TerminalProgress
from launcher.eval.probe.report import (
    format_table,
    publish,
    results_dict,
    write_outputs,
)
from launcher.eval.probe.runner import Cell, ProbeResult, ProgressEvent, Trial, run_probe
from launcher.eval.probe.settings import ProbeSettings, default_lengths, settings_from_flags
from launcher.eval.results import OutputPaths, default_out_dir
from launcher.eval.runfiles import check_out_dir


def sweep(settings: ProbeSettings, stream=None) -> ProbeResult:
    """``run_probe`` with the terminal progress display (``probe`` and ``serve --probe``)."""
    import sys

    progress = TerminalProgress(stream or sys.stderr, trials=settings.trials)
    try:
        return run_probe(settings, progress=progress)
    finally:
        progress.close()


__all__ = [
    "Cell",
    "OutputPaths",
    "ProbeResult",
    "ProbeSettings",
    "ProgressEvent",
    "TerminalProgress",
    "Trial",
    "check_out_dir",
    "default_lengths",
    "default_out_dir",
    "format_table",
    "publish",
    "results_dict",
    "run_probe",
    "settings_from_flags",
    "sweep",
    "write_outputs",
]
