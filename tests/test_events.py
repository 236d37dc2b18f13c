"""opensig's Prefect events, sent to a real Prefect server and read back from its API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from opensig.events import DATA_ADDED, EventNotSent, emit, project_resource
from tests.conftest import REPO, free_port


def events_named(api: str, name: str) -> list[dict]:
    body = {"filter": {"event": {"name": [name]}}, "limit": 50}
    return httpx.post(f"{api}/events/filter", json=body).json()["events"]


def test_no_api_configured_sends_nothing() -> None:
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert emit(DATA_ADDED, {"added": {"cat": 1}}, project_resource(".")) is False


def test_an_unreachable_api_is_an_error_naming_it() -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    with (
        temporary_settings(updates={PREFECT_API_URL: url}),
        pytest.raises(EventNotSent, match=f"{DATA_ADDED} not sent: Prefect API {url}"),
    ):
        emit(DATA_ADDED, {}, project_resource("."))


def test_a_short_lived_process_delivers_its_event(prefect_server: str, tmp_path: Path) -> None:
    """The event reaches the server although the process exits right after emit()."""
    resource = project_resource(tmp_path)
    code = (
        "from opensig.events import DATA_ADDED, emit\n"
        f"assert emit(DATA_ADDED, {{'added': {{'7': 3}}, 'new_classes': ['7']}}, {resource!r})\n"
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    deadline = time.monotonic() + 30  # the server writes events to its store asynchronously
    while not (found := events_named(prefect_server, DATA_ADDED)):
        assert time.monotonic() < deadline, "the event never reached the server"
        time.sleep(0.5)
    (event,) = found
    assert event["resource"]["prefect.resource.id"] == resource == f"opensig.project.{tmp_path}"
    assert event["payload"] == {"added": {"7": 3}, "new_classes": ["7"]}
