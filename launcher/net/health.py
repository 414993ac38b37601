"""Is the server up? The supervisor's names for the health part of the one client of lmdeploy's
endpoints, ``launcher.net.lmdeploy``, where they are defined (import them from there)."""

from __future__ import annotations

from launcher.net.lmdeploy import POLL_S, health_status, health_url_for, served_models, wait_healthy

__all__ = ["POLL_S", "health_status", "health_url_for", "served_models", "wait_healthy"]
