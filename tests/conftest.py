"""Shared fixtures: a small digits project in a temp folder with a shrunk params file.

Like lightning-hydra-template's conftest: the real params.yaml, with only the knobs that
make a run fast overridden, so the tests exercise the configuration users get.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use their own SQLite store
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="opensig-prefect-")  # never ~/.prefect
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls offline
# `mlflow server` would start a job runner with seven worker processes the tests never use
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """One compute thread per core: with ``-n N`` workers, each (and every process it starts)
    gets cores / N torch threads. At torch's default every worker starts a thread per core,
    and on 2 cores two workers' threads wait on each other (bench/README.md: test suite).
    Runs in the main process (whose environment the workers inherit) before any test module
    imports torch; an OMP_NUM_THREADS already set is kept."""
    cores = os.cpu_count() or 1
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers is None:
        requested = getattr(config.option, "numprocesses", None)  # "auto": one per core
        workers = requested if isinstance(requested, int) and requested > 0 else 1
        workers = cores if requested in ("auto", "logical") else workers
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))


# The metrics.json keys the core-pipeline issue promises users.
METRIC_KEYS = frozenset(
    {"known_accuracy", "known_ccr", "unknown_recall", "macro_f1", "auroc", "fpr95", "oscr", "ece"}
)

# Small and quick on 2 CPU cores, still a real convolutional net on real images.
FAST_OVERRIDES = {
    "model": {"backbone": "resnet10t", "image_size": 16},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.003, "device": "cpu"},
}


def merge_params(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge_params(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_params(folder: Path, overrides: dict | None = None) -> Path:
    """The repo's params.yaml with the fast overrides (and any others) applied."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = merge_params(merge_params(params, FAST_OVERRIDES), overrides or {})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo data set, written once per session."""
    from opensig.data.demo import write_digits

    root = tmp_path_factory.mktemp("digits") / "data"
    write_digits(root)
    return root


@pytest.fixture
def project(tmp_path: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder (data + shrunk params.yaml) that is also the working directory."""
    shutil.copytree(digits_data, tmp_path / "data")
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def params_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory: a temp folder holding only the shrunk params.yaml (for the
    commands that write their own data, as the benchmarks do)."""
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real resnet10t bundle (classes 0, 1, 2; 16 px; thresholds 0.5), untrained: enough
    for tests of predict's plumbing, which do not need a good model."""
    from opensig.decision import THRESHOLDS_FILE, write_thresholds
    from opensig.model import build_spec, create_model, model_digest, save_model_dir

    folder = tmp_path_factory.mktemp("bundle")
    classes = ["0", "1", "2"]
    net = create_model("resnet10t", len(classes), 3)
    save_model_dir(folder, net, build_spec(net, "resnet10t", classes, "sigmoid_bce", 3, 16, 3))
    write_thresholds(
        folder / THRESHOLDS_FILE,
        classes,
        [0.5] * 3,
        "fixed",
        {"value": 0.5},
        model_sha256=model_digest(folder),
    )
    return folder


def register_bundle(model_dir: Path, thresholds: Path, root: Path, name: str) -> str:
    """``model_dir`` with ``thresholds`` registered as version 1 of ``name`` (@champion) in a
    SQLite store in ``root``, as the register stage logs it; the store's URI."""
    from mlflow import MlflowClient

    from opensig.config import Config
    from opensig.tracking.promotion import ModelRegistry, log_and_register
    from opensig.tracking.runs import RunSpec

    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = Config.model_validate(
        {"mlflow": {"tracking_uri": uri, "experiment": name, "registered_model": name}}
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's SQLite store puts its artifacts below the working directory
        registry = ModelRegistry(uri, name, name)
        _, version = log_and_register(registry, RunSpec.of(cfg), {}, model_dir, thresholds, [])
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias(name, "champion", version)
    return uri


TOOLS_ENV = {  # the venv's tools (dvc, opensig) first on PATH, DVC quiet
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    "DVC_NO_ANALYTICS": "1",
}


def tool(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """A command (dvc, git, opensig) in ``cwd``, its output captured."""
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, env=TOOLS_ENV, timeout=timeout
    )


def dvc_project(root: Path, data: Path, overrides: dict | None = None) -> Path:
    """A git + DVC repository at ``root``: the repo's pipeline and code, shrunk params and
    ``data`` tracked by DVC, committed."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root)
    shutil.copytree(REPO / "src", root / "src")
    write_params(root, overrides)
    if data != root / "data":
        shutil.copytree(data, root / "data")
    for args in (
        ("git", "init", "-q"),
        ("dvc", "init", "-q"),
        ("dvc", "add", "-q", "data"),
        ("git", "add", "-A"),
        ("git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "x"),
    ):
        done = tool(*args, cwd=root)
        assert done.returncode == 0, (args, done.stderr)
    return root


def free_port() -> int:
    """A loopback port free right now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group ``proc`` leads; SIGKILL whatever is left after ``timeout``.

    Waiting for ``proc`` alone is not enough: a server's workers (uvicorn, gunicorn) may
    outlive it.
    """
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, so an empty group reads as gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def answers(url: str) -> Callable[[], bool]:
    """A readiness check: ``url`` answers 200."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    return check


@contextmanager
def background(
    command: list[str],
    log: Path,
    ready: Callable[[], bool] | None = None,
    timeout: float = 120,
    **popen: Any,
) -> Iterator[subprocess.Popen]:
    """A real server (or other long-lived process) for a test: started in a process group of
    its own with its output in ``log``, waited for until ``ready()`` (failing with the end of
    its log if it exits or takes over ``timeout`` s), and stopped with all its children."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
    try:
        deadline = time.monotonic() + timeout
        while ready is not None and not ready():
            assert proc.poll() is None, f"{command[0]} exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"{command[0]} not ready in {timeout} s:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.5)
        yield proc
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite, proxied artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--artifacts-destination", str(root / "artifacts")),
        *("--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"),
    ]
    with background(command, root / "server.log", answers(f"{url}/health")):
        yield url


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server (its own PREFECT_HOME, no UI) on a free loopback port: its API URL."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # it is the API
    env.update(PREFECT_HOME=str(root / "home"), PREFECT_UI_ENABLED="false")
    api = f"http://127.0.0.1:{port}/api"
    command = [
        *(str(Path(sys.executable).parent / "prefect"), "server", "start"),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]
    with background(command, root / "server.log", answers(f"{api}/health"), env=env):
        yield api
