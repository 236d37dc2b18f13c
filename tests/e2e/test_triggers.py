"""The loop's Prefect triggers against a real Prefect server: an `opensig.data.added` event
about a project creates a run of that project's retrain deployment, whether served
(`opensig retrain --serve`) or deployed from prefect.yaml to a work pool.

The runs are not left to train: the test asserts that Prefect created them, then stops.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from opensig.events import DATA_ADDED, emit, project_resource
from tests.conftest import REPO, background, write_params

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def wait_for(check: Callable[[], object], what: str, timeout: float = 120) -> object:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)
    return value


def triggered_runs(api: str, flow: str, deployment: str) -> list[dict]:
    """The deployment's runs that its schedule did not create."""
    body = {
        "flows": {"name": {"any_": [flow]}},
        "deployments": {"name": {"any_": [deployment]}},
    }
    runs = httpx.post(f"{api}/flow_runs/filter", json=body).json()
    return [run for run in runs if not run["auto_scheduled"]]


@pytest.fixture(scope="module")
def env(prefect_server: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO / "src"),
        "PREFECT_API_URL": prefect_server,
    }


@pytest.fixture
def served(tmp_path: Path, env: dict[str, str]) -> Iterator[Path]:
    """`pipelines/retrain.py --serve` for a project folder (never due on its cron)."""
    project = tmp_path / "project"
    project.mkdir()
    write_params(project)
    command = [
        *(sys.executable, str(REPO / "pipelines/retrain.py"), "--serve"),
        *("--project", str(project), "--cron", "0 3 1 1 *"),
    ]
    with background(command, tmp_path / "serve.log", env=env):
        yield project


def test_data_added_starts_the_served_retrain(
    prefect_server: str, served: Path, tmp_path: Path
) -> None:
    api = prefect_server

    def automation() -> list[dict]:
        found = httpx.post(f"{api}/automations/filter", json={}).json()
        return [a for a in found if a["name"] == "opensig data added"]

    (auto,) = wait_for(automation, "the served deployment's trigger")
    assert auto["trigger"]["expect"] == [DATA_ADDED]
    assert auto["trigger"]["match"] == {"prefect.resource.id": project_resource(served)}
    with temporary_settings(updates={PREFECT_API_URL: api}):
        assert emit(DATA_ADDED, {"added": {"x": 1}}, project_resource(tmp_path / "another"))
        assert emit(DATA_ADDED, {"added": {"7": 3}}, project_resource(served))
    runs = wait_for(
        lambda: triggered_runs(api, "opensig-retrain", "local-schedule"), "a triggered run"
    )
    time.sleep(3)  # the other project's event, sent first, must have started nothing
    runs = triggered_runs(api, "opensig-retrain", "local-schedule")
    assert len(runs) == 1, runs
    assert runs[0]["created_by"]["type"] == "AUTOMATION"
    assert runs[0]["parameters"] == {"project": str(served)}


def test_prefect_yaml_deploys_the_same_trigger(
    prefect_server: str, env: dict[str, str], tmp_path: Path
) -> None:
    api, project = prefect_server, tmp_path

    def sh(*args: str) -> None:
        done = subprocess.run(
            args, cwd=REPO, env={**env, "OPENSIG_PROJECT": str(project)}, capture_output=True
        )
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()

    sh(str(BIN / "prefect"), "work-pool", "create", "opensig", "--type", "process")
    sh(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
    with temporary_settings(updates={PREFECT_API_URL: api}):
        assert emit(DATA_ADDED, {"added": {"7": 3}}, project_resource(project))
    (run,) = wait_for(
        lambda: triggered_runs(api, "opensig-retrain", "work-pool"), "a run of the work pool"
    )
    assert run["created_by"]["type"] == "AUTOMATION"
    assert run["state"]["type"] == "SCHEDULED"  # no worker here: it waits for one
