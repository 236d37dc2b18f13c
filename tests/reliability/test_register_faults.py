"""The register stage under faults, against real components.

A trained bundle is built once (ingest, train, tune, evaluate). Then register meets a dead
tracking server, a real ``mlflow server`` behind a small forwarding proxy that answers 503
on chosen endpoints, and secrets in the environment: it must fail within bounded time with
a clear message, never leave a duplicate version or a champion without metrics, and never
write a secret anywhere.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner, Result

from opensig.cli import app
from opensig.tracking.packaging import bundle_digest
from opensig.tracking.promotion import CHAMPION, DIGEST_TAG
from tests.conftest import free_port, write_params

pytestmark = pytest.mark.e2e

SECRET_PASSWORD, SECRET_TOKEN = "s3cretPW", "tok-s3cret"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


def run_stage(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> Path:
    """A project folder holding everything register reads (one quick epoch)."""
    root = tmp_path_factory.mktemp("bundle")
    shutil.copytree(digits_data, root / "data")
    write_params(root, {"train": {"epochs": 1}})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in ("ingest", "train", "tune", "evaluate"):
            result = run_stage(stage)
            assert result.exit_code == 0, f"{stage} failed:\n{result.output}"
    return root


@pytest.fixture
def in_bundle(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The bundle folder as working directory, with no registration report yet."""
    monkeypatch.chdir(bundle)
    (bundle / "reports/registered.json").unlink(missing_ok=True)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield bundle
    assert os.environ.get("MLFLOW_TRACKING_URI") == before, "register left its store behind"


def register(project: Path, uri: str | None, name: str, **mlflow_params: object) -> Result:
    """`opensig register` with its own experiment and model name (tests share one server)."""
    params = {"tracking_uri": uri, "experiment": name, "registered_model": name, **mlflow_params}
    write_params(project, {"train": {"epochs": 1}, "mlflow": params})
    return run_stage("register")


class FaultProxy(ThreadingHTTPServer):
    """Forwards every request to the server, except those whose path holds a blocked part:
    they get 503 Service Unavailable, as from an overloaded server or gateway."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.blocked: set[str] = set()
        self.refused: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if any(part in self.path for part in self.server.blocked):
            self.server.refused.append(self.path)
            self._reply(503, [("Content-Type", "text/plain")], b"blocked by the test proxy")
            return
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        kept = [
            (k, v)
            for k, v in response.getheaders()
            if k.lower() not in HOP_BY_HOP | {"content-length"}
        ]
        self._reply(response.status, kept, data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # quiet: pytest shows failures anyway
        pass


@pytest.fixture
def proxy(mlflow_server: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(mlflow_server)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def versions(uri: str, name: str) -> list:
    return MlflowClient(uri).search_model_versions(f"name = '{name}'")


def champion_of(uri: str, name: str) -> str | None:
    return MlflowClient(uri).get_registered_model(name).aliases.get(CHAMPION)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (kernel backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.mark.parametrize("fault", ["refused", "silent"])
def test_unreachable_server_fails_fast_naming_the_uri(
    in_bundle: Path, fault: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port() if fault == "refused" else request.getfixturevalue("silent_port")
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    result = register(in_bundle, uri, "unreachable", retries=1, timeout=2)
    elapsed = time.monotonic() - start
    assert result.exit_code == 2, result.output
    assert elapsed < 60
    message = caplog.text
    assert f"cannot reach the MLflow tracking store {uri}" in message
    assert "after 1 retries, 2 s timeout each" in message
    assert "Start the tracking server, or fix mlflow.tracking_uri" in message
    assert not (in_bundle / "reports/registered.json").exists()


def test_rerun_against_a_real_server_registers_one_version(
    in_bundle: Path, mlflow_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="opensig")
    for _ in range(2):
        result = register(in_bundle, mlflow_server, "idempotent")
        assert result.exit_code == 0, caplog.text
    assert "already registered as version 1" in caplog.text
    (version,) = versions(mlflow_server, "idempotent")
    assert champion_of(mlflow_server, "idempotent") == "1"
    registered = json.loads((in_bundle / "reports/registered.json").read_text())
    assert registered["version"] == "1" and "champion" in registered["aliases"]
    # MLflow 3 fills run_id when log_model registers inside a run: what the lookup relies on.
    assert version.run_id == registered["run_id"]
    digest = bundle_digest(in_bundle / "artifacts/model", in_bundle / "artifacts/thresholds.json")
    assert MlflowClient(mlflow_server).get_run(version.run_id).data.tags[DIGEST_TAG] == digest


def test_alias_endpoint_down_leaves_no_champion_and_rerun_promotes_the_same_version(
    in_bundle: Path, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.blocked = {"registered-models/alias"}
    result = register(in_bundle, proxy.url, "alias-down", retries=1, timeout=5)
    assert result.exit_code == 2, result.output
    assert proxy.refused, "the proxy never saw an alias call"
    assert f"MLflow at {proxy.url} failed" in caplog.text
    assert "503" in caplog.text
    (version,) = versions(proxy.url, "alias-down")
    assert version.aliases == []
    assert not (in_bundle / "reports/registered.json").exists()

    proxy.blocked = set()
    result = register(in_bundle, proxy.url, "alias-down", retries=1, timeout=5)
    assert result.exit_code == 0, caplog.text
    assert len(versions(proxy.url, "alias-down")) == 1
    assert champion_of(proxy.url, "alias-down") == version.version


def test_metrics_logging_down_creates_no_version_and_rerun_creates_one(
    in_bundle: Path, proxy: FaultProxy
) -> None:
    proxy.blocked = {"runs/log-batch"}
    result = register(in_bundle, proxy.url, "metrics-down", retries=1, timeout=5)
    assert result.exit_code == 2, result.output
    assert proxy.refused
    assert versions(proxy.url, "metrics-down") == []

    proxy.blocked = set()
    result = register(in_bundle, proxy.url, "metrics-down", retries=1, timeout=5)
    assert result.exit_code == 0, result.output
    (version,) = versions(proxy.url, "metrics-down")
    assert "macro_f1" in MlflowClient(proxy.url).get_run(version.run_id).data.metrics
    assert champion_of(proxy.url, "metrics-down") == version.version


def test_champion_never_moves_to_a_version_without_metrics(
    in_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version of this very bundle whose run has no metrics (made outside this stage):
    register reuses it, and must refuse to make it champion."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    name = "no-metrics"
    experiment = client.create_experiment(name, artifact_location=str(tmp_path / "artifacts"))
    digest = bundle_digest(in_bundle / "artifacts/model", in_bundle / "artifacts/thresholds.json")
    run = client.create_run(experiment, tags={DIGEST_TAG: digest})
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    client.create_model_version(name, str(tmp_path), run_id=run.info.run_id)

    result = register(in_bundle, uri, name)
    assert result.exit_code == 2, result.output
    assert "has no 'macro_f1' metric" in caplog.text
    assert "the alias was not moved" in caplog.text
    assert len(versions(uri, name)) == 1
    assert CHAMPION not in client.get_registered_model(name).aliases
    assert not (in_bundle / "reports/registered.json").exists()


def test_failed_register_output_and_reports_hold_no_secret(in_bundle: Path) -> None:
    """Credentials from the environment, a dead server, verbose logs: no secret comes out."""
    write_params(in_bundle, {"train": {"epochs": 1}, "mlflow": {"retries": 1, "timeout": 2}})
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"http://user:{SECRET_PASSWORD}@127.0.0.1:{port}",
        "MLFLOW_TRACKING_TOKEN": SECRET_TOKEN,
    }
    done = subprocess.run(
        [sys.executable, "-m", "opensig", "--verbose", "register"],
        cwd=in_bundle,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"http://***@127.0.0.1:{port} (from $MLFLOW_TRACKING_URI)" in output
    for secret in (SECRET_PASSWORD, SECRET_TOKEN):
        assert secret not in output
        for path in (in_bundle / "reports").rglob("*"):
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def test_successful_register_logs_no_token_and_no_tracking_uri(
    in_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET_TOKEN)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = register(in_bundle, uri, "token")
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (version,) = versions(uri, "token")
    run = client.get_run(version.run_id)
    assert "mlflow.tracking_uri" not in run.data.params
    assert "train.epochs" in run.data.params  # the params a person compares are logged
    values = [*run.data.params.values(), *run.data.tags.values(), *version.tags.values()]
    assert not [v for v in values if SECRET_TOKEN in v]
    assert SECRET_TOKEN not in (in_bundle / "reports/registered.json").read_text()
