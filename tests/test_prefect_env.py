"""opensig's flows switch Prefect's telemetry off themselves (issue 26): a scheduled run on a
machine without internet must not log an ERROR line about it every time; and Prefect's own
database held by another process is one line saying what to do, not a traceback."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, write_params

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


def test_prefects_database_held_by_another_process_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    first = subprocess.run(  # a flow run creates Prefect's database
        [sys.executable, "-c", FLOW], env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stdout + first.stderr
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "5"  # the default waits 90 s
    write_params(tmp_path)
    holder = sqlite3.connect(tmp_path / "prefect" / "prefect.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another Prefect process writing, for longer than 5 s
    try:
        run = subprocess.run(
            [sys.executable, "-m", "opensig", "monitor-flow", "--project", str(tmp_path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.execute("ROLLBACK")
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    assert "another Prefect process holds its database" in output
    assert "make prefect-server" in output and "Traceback" not in output
