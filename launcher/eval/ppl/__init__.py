"""``launch ppl``: the long-context loss curve through lmdeploy's ``POST /get_ppl``, before and after.

Library entry points (``launch ppl`` and ``launch serve --probe --ppl-text`` call exactly these)::

    settings = PplSettings(lengths=(4096, 8192), url="http://127.0.0.1:23333", native_context=4096)
    result = measure(settings)                    # run_ppl with progress lines on stderr
    paths = publish(result, out_dir, sys.stdout)  # results.json, ppl.png, then the table
    compare([run_dir_a, run_dir_b], out_dir, sys.stdout)  # several runs on one chart

Importing this package does not import matplotlib or transformers.
"""

from launcher.eval.ppl.progress import PplProgress
from launcher.eval.ppl.report import compare, format_table, load_run, publish, results_dict, write_outputs
from launcher.eval.ppl.runner import Point, PplResult, run_ppl, score
from launcher.eval.ppl.settings import PplSettings, default_lengths, settings_from_flags
from launcher.eval.ppl.windows import plan_windows, span_loss


def measure(settings: PplSettings, stream=None) -> PplResult:
    """``run_ppl`` with progress lines on stderr."""
    import sys

    return run_ppl(settings, progress=PplProgress(stream or sys.stderr))


__all__ = [
    "Point",
    "PplProgress",
    "PplResult",
    "PplSettings",
    "compare",
    "default_lengths",
    "format_table",
    "load_run",
    "measure",
    "plan_windows",
    "publish",
    "results_dict",
    "run_ppl",
    "score",
    "settings_from_flags",
    "span_loss",
    "write_outputs",
]
