"""opensig's flows switch Prefect's telemetry off themselves (issue 26): a scheduled run on a
machine without internet must not log an ERROR line about it every time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FLOW = """
import os
import opensig.retrain  # what `opensig retrain` and pipelines/retrain.py import
from prefect import flow

@flow(name="quiet-check")
def check() -> str:
    return os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"]

print("setting:", check())
"""


def test_a_flow_run_of_opensig_logs_no_telemetry_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    run = subprocess.run(
        [sys.executable, "-c", FLOW], env=env, capture_output=True, text=True, timeout=300
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "setting: false" in output
    assert "telemetry" not in output.lower() and "ERROR" not in output
