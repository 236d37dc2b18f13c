"""The Prefect setting opensig's flows need on every run, applied where they are defined."""

from __future__ import annotations

import os


def quiet() -> None:
    """No anonymous usage telemetry from the Prefect server a flow run starts: offline it
    logs an ERROR line on every run, which pages someone on a schedule. A value the user
    set (``PREFECT_SERVER_ANALYTICS_ENABLED``) wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
