"""Hub threads left behind past a deadline say nothing more (their huggingface_hub log lines would follow
launch's one-line error on stderr: seen in CI as "Retrying in 2s [Retry 2/5]." after the error)."""

from __future__ import annotations

import logging
import threading

from launcher.model import hubcall


def test_an_abandoned_threads_hub_log_lines_are_dropped_and_others_kept():
    from huggingface_hub.utils import logging as hf_logging

    logger = hf_logging.get_logger("huggingface_hub.utils._http")
    handlers = hf_logging.get_logger().handlers
    assert handlers  # huggingface_hub's own stderr handler
    seen: dict[str, list[bool]] = {}
    release = threading.Event()

    def log_once(key: str) -> None:
        release.wait(5)
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "Retrying in 2s", None, None)
        seen[key] = [handler.filter(record) for handler in handlers]

    left = threading.Thread(target=log_once, args=("abandoned",), daemon=True)
    kept = threading.Thread(target=log_once, args=("running",), daemon=True)
    left.start()
    kept.start()
    hubcall._abandon([left])
    hubcall._abandon([left])  # idempotent: one filter per handler
    release.set()
    left.join(5)
    kept.join(5)
    assert seen == {"abandoned": [False] * len(handlers), "running": [True] * len(handlers)}
    assert all(handler.filters.count(hubcall._drop_abandoned) == 1 for handler in handlers)
