"""The Prefect settings opensig's flows need on every run, applied where they are defined,
and the one-line answer to Prefect's own database being held by another process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# Prefect's ephemeral server waits up to 60 s for a lock on its SQLite database (its busy
# timeout); its client gave up after 20 s, with a traceback, while another Prefect process
# wrote. Waiting longer than the lock can last turns that into a pause.
STARTUP_TIMEOUT_S = 90


def configure() -> None:
    """No anonymous usage telemetry from the Prefect server a flow run starts (offline it
    logs an ERROR line on every run, which pages someone on a schedule), and time for that
    server to start while another Prefect process holds the database. A value the user set
    wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(STARTUP_TIMEOUT_S)
    )


@contextmanager
def database_busy_explained() -> Iterator[None]:
    """Prefect's "Timed out while attempting to connect to ephemeral Prefect API server" as
    one line saying why and what to do."""
    try:
        yield
    except RuntimeError as err:
        if "ephemeral Prefect API server" not in str(err):
            raise
        home = os.environ.get("PREFECT_HOME", "~/.prefect")
        waited = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "?")
        raise RuntimeError(
            f"Prefect's local server did not start within {waited} s: another Prefect process "
            f"holds its database ({home}/prefect.db). Rerun when it has finished, or run one "
            "Prefect server for all flows (make prefect-server, then PREFECT_API_URL)"
        ) from None
