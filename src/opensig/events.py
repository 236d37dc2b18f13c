"""Prefect events that close the loop: what opensig tells Prefect, and how it is sent.

`review import` emits `DATA_ADDED` (the retrain deployment's trigger starts a retrain on it);
the monitor flow emits `MONITOR_ALERT`. Each event's resource is the project
(`project_resource(folder)`), so a server shared by several projects retrains the right one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL

DATA_ADDED = "opensig.data.added"
MONITOR_ALERT = "opensig.monitor.alert"
RESOURCE_PREFIX = "opensig.project."

log = logging.getLogger(__name__)


class EventNotSent(RuntimeError):
    """A Prefect API is configured but the event could not be handed to it."""


def project_resource(project: Path | str) -> str:
    """The resource id of a project folder (absolute), as triggers match it."""
    return f"{RESOURCE_PREFIX}{Path(project).resolve()}"


def api_url() -> str | None:
    """The configured Prefect API, or None: without one there is nobody to tell."""
    return PREFECT_API_URL.value() or None


def emit(event: str, payload: dict, resource_id: str) -> bool:
    """Send ``event`` to the Prefect API and wait until it has been handed over.

    Returns False, sending nothing, when PREFECT_API_URL is unset (Prefect would otherwise
    start a throwaway ephemeral server that no trigger listens to). Prefect sends events from
    a background worker; a short-lived command would exit before it ran, so the worker is
    drained here (its websocket closed after the event went out). Raises `EventNotSent`,
    naming the API, when the server cannot be reached.
    """
    url = api_url()
    if url is None:
        return False
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise EventNotSent(f"event {event} not sent: Prefect API {url} unreachable: {failure}")
    sent = emit_event(event, resource={"prefect.resource.id": resource_id}, payload=payload)
    if sent is None:
        raise EventNotSent(f"event {event} not sent to {url}: Prefect refused to emit it")
    EventsWorker.drain_all(timeout=60, at_exit=False)
    log.info("sent %s (%s) to %s", event, resource_id, url)
    return True
