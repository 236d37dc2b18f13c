"""The scheduled-retraining flow on a real git + DVC project holding digits.

One project per module, driven through its life in the order a user lives it: a first run
versions the data and registers a champion; a rerun with no change does nothing; new images
give a new version; a deliberately worse challenger is registered but not promoted; a
failing step fails the flow and leaves the champion alone; a real Prefect server runs the
served flow on its cron schedule. The tests run in file order (pytest's default), each
leaving the project up to date for the next; the worse challenger comes last.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient
from prefect.artifacts import Artifact
from prefect.testing.utilities import prefect_test_harness

from opensig.retrain import ARTIFACT_KEY, StepFailed, retrain
from tests.conftest import REPO, free_port, merge_params, write_params

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent  # dvc, opensig and prefect of this interpreter's venv
MODEL = "opensig"


def sh(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    env = env or {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def registry(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def champion(root: Path) -> str:
    return str(registry(root).get_model_version_by_alias(MODEL, "champion").version)


def n_versions(root: Path) -> int:
    return len(registry(root).search_model_versions(f"name='{MODEL}'"))


@contextmanager
def params_changed(root: Path, overrides: dict) -> Iterator[None]:
    """The project's params.yaml with ``overrides`` merged in, restored afterwards."""
    params = root / "params.yaml"
    original = params.read_text()
    params.write_text(yaml.safe_dump(merge_params(yaml.safe_load(original), overrides)))
    try:
        yield
    finally:
        params.write_text(original)


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, digits_data: Path, harness: None) -> Path:
    """A git repo with the pipeline, a DVC remote, and digits minus a quarter of each class
    (kept aside in incoming/ as the 'new images' of a later run); not yet run."""
    base = tmp_path_factory.mktemp("retrain")
    root = base / "project"
    root.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root)
    shutil.copytree(REPO / "src", root / "src")  # stages depend on the code they run
    write_params(root, {"retrain": {"push": True, "commit": True}})
    shutil.copytree(digits_data, root / "data")
    for folder in sorted((root / "data/known").iterdir()):
        for image in sorted(folder.iterdir())[::4]:
            target = base / "incoming" / image.relative_to(root / "data")
            target.parent.mkdir(parents=True, exist_ok=True)
            image.rename(target)
    sh("git", "init", "-q", cwd=root)
    sh("git", "config", "user.email", "ci@example.com", cwd=root)
    sh("git", "config", "user.name", "ci", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    sh("dvc", "remote", "add", "-d", "local", str(base / "remote"), cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-q", "-m", "pipeline", cwd=root)
    return root


@pytest.fixture(scope="module")
def first(repo: Path) -> dict:
    return retrain(str(repo))


def test_first_run_versions_data_and_registers_a_champion(repo: Path, first: dict) -> None:
    assert first["action"] == "promoted"
    assert first["registration"]["comparison"]["reason"] == "no champion yet"
    assert champion(repo) == first["registration"]["version"] == "1"
    assert (repo / "data.dvc").is_file()  # the flow versioned the data itself
    assert "opensig retrain: promoted" in sh("git", "log", "--oneline", "-1", cwd=repo)
    assert sh("git", "status", "--porcelain", "data.dvc", "dvc.lock", "reports", cwd=repo) == ""
    committed = sh("git", "show", "--name-only", "--format=", "HEAD", cwd=repo).split()
    assert {"reports/metrics.json", "reports/plots/roc_seen_unknown.csv"} <= set(committed)
    assert any((repo.parent / "remote").rglob("*")), "dvc push sent nothing to the remote"
    assert json.loads((repo / "reports/metrics.json").read_text())["known_accuracy"] > 0.5
    artifact = Artifact.get(ARTIFACT_KEY)
    assert (
        artifact is not None and "promoted" in artifact.data and "no champion yet" in artifact.data
    )
    # DVC can show what the pipeline wrote.
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=repo))
    assert {"loss", "confusion", "roc"} <= set(plots["data"]) and not plots.get("errors")


def test_rerun_without_change_does_nothing(repo: Path, first: dict) -> None:
    lock, versions = (repo / "dvc.lock").read_text(), n_versions(repo)
    state = retrain(str(repo), return_state=True)
    assert state.is_completed() and "nothing to do" in state.message
    assert state.result()["action"] == "nothing to do"
    assert (repo / "dvc.lock").read_text() == lock
    assert n_versions(repo) == versions


def test_new_images_trigger_a_retrain_and_a_new_version(repo: Path, first: dict) -> None:
    versions, data_md5 = n_versions(repo), (repo / "data.dvc").read_text()
    images = json.loads((repo / "reports/ingest.json").read_text())["images"]
    before = champion(repo)
    incoming = repo.parent / "incoming"
    shutil.copytree(incoming, repo / "data", dirs_exist_ok=True)
    result = retrain(str(repo))
    assert any(line.startswith("data.dvc: data modified") for line in result["changes"])
    assert (repo / "data.dvc").read_text() != data_md5
    assert n_versions(repo) == versions + 1
    assert result["registration"]["version"] == str(versions + 1)
    comparison = result["registration"]["comparison"]
    assert comparison["champion_version"] == before  # compared against the champion
    assert 0.0 <= comparison["champion_value"] <= 1.0  # measured on today's test split
    assert result["action"] == comparison["decision"] in {"promoted", "kept champion"}
    assert json.loads((repo / "reports/ingest.json").read_text())["images"] > images


def test_failing_step_fails_the_flow_and_keeps_the_champion(repo: Path, first: dict) -> None:
    before, versions, lock = champion(repo), n_versions(repo), (repo / "dvc.lock").read_text()
    with (
        params_changed(repo, {"data": {"holdout_unknown": ["no_such_source"]}}),
        pytest.raises(StepFailed, match=r"dvc repro(.|\n)*holdout_unknown"),
    ):
        retrain(str(repo))
    assert champion(repo) == before
    assert n_versions(repo) == versions
    assert (repo / "dvc.lock").read_text() == lock
    # Back to the good params: DVC's run cache restores the old outputs, no version is added.
    assert retrain(str(repo))["action"] in {"nothing to do", "no new model"}
    assert n_versions(repo) == versions and champion(repo) == before


def _wait_for(check: Callable[[], object], timeout: float, what: str, logs: dict) -> object:
    """Poll ``check`` until truthy; fail early if a process died, with every log's tail."""

    def tails() -> str:
        return "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in logs.values())

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in logs):
            pytest.fail(f"a process exited while waiting for {what}:\n{tails()}")
        try:
            if value := check():
                return value
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{tails()}")


def test_served_flow_runs_on_its_cron_schedule(repo: Path, first: dict, tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    logs: dict[subprocess.Popen, Path] = {}

    def start(name: str, *args: str, server: bool = False) -> None:
        # The server must not point at an API: it is the API.
        env_ = {k: v for k, v in env.items() if not (server and k == "PREFECT_API_URL")}
        log = tmp_path / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(args, env=env_, stdout=out, stderr=subprocess.STDOUT)
        logs[proc] = log

    def completed_runs() -> list[dict]:
        body = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        runs = httpx.post(f"{api}/flow_runs/filter", json=body).json()
        return [r for r in runs if r["auto_scheduled"] and r["deployment_id"]]

    try:
        start("server", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
              "--port", str(port), server=True)  # fmt: skip
        _wait_for(lambda: httpx.get(f"{api}/health").status_code == 200, 90, "the server", logs)
        start("serve", sys.executable, str(REPO / "pipelines/retrain.py"), "--serve",
              "--cron", "* * * * *", "--project", str(repo))  # fmt: skip
        runs = _wait_for(completed_runs, 180, "a scheduled run to complete", logs)
        assert runs[0]["state"]["message"].startswith("nothing to do")
        deployment = httpx.get(f"{api}/deployments/{runs[0]['deployment_id']}").json()
        assert deployment["name"] == "local-schedule"
        assert deployment["schedules"][0]["schedule"]["cron"] == "* * * * *"

        # prefect.yaml, for work pools, deploys to the same server as documented.
        sh(
            str(BIN / "prefect"),
            "work-pool",
            "create",
            "opensig",
            "--type",
            "process",
            cwd=REPO,
            env=env,
        )
        sh(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", cwd=REPO,
           env={**env, "OPENSIG_PROJECT": str(repo)})  # fmt: skip
        body = {
            "flows": {"name": {"any_": ["opensig-retrain"]}},
            "deployments": {"name": {"any_": ["work-pool"]}},
            "work_pools": {"name": {"any_": ["opensig"]}},
        }
        (pooled,) = httpx.post(f"{api}/deployments/filter", json=body).json()
        assert pooled["entrypoint"] == "pipelines/retrain.py:retrain"
        assert pooled["pull_steps"][0]["prefect.deployments.steps.set_working_directory"] == {
            "directory": str(repo)
        }
        assert pooled["global_concurrency_limit"]["limit"] == 1
    finally:
        for proc in logs:
            proc.terminate()
        for proc in logs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_worse_challenger_is_registered_but_not_promoted(repo: Path, first: dict) -> None:
    before, versions = champion(repo), n_versions(repo)
    with params_changed(repo, {"train": {"epochs": 1, "lr": 1e-6}}):
        result = retrain(str(repo))
    assert "train: param train modified" in result["changes"]  # dvc tracks the section
    version = result["registration"]["version"]
    assert n_versions(repo) == versions + 1 and version == str(versions + 1)
    assert result["action"] == "kept champion"
    assert champion(repo) == before
    assert result["registration"]["aliases"] == ["challenger"]
    tags = registry(repo).get_model_version(MODEL, version).tags
    assert tags["promote.decision"] == "kept champion"
    assert float(tags["promote.challenger_value"]) < float(tags["promote.champion_value"])
    assert "kept champion" in Artifact.get(ARTIFACT_KEY).data
