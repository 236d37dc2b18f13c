"""The retraining flow's pure parts, its settings and its deployment file.

The flow itself runs end to end in tests/e2e/test_retrain.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint
from prefect.logging import disable_run_logger
from prefect.states import Failed
from typer.testing import CliRunner

from opensig.cli import app
from opensig.config import ConfigError, RetrainConfig, load_config
from opensig.retrain import (
    FLOW_NAME,
    RepoBusy,
    StepFailed,
    _retry_if_busy,
    check_schedule,
    commit,
    describe_changes,
    outputs_in_git,
    promotion_markdown,
)
from tests.conftest import REPO, write_params

# `dvc status --json` as DVC 3 prints it: new data, a changed param section, a changed source
# file, the consequences downstream (deleted deps, missing outs) and a changed command.
STATUS = {
    "data.dvc": [{"changed outs": {"data": "modified"}}],
    "ingest": [{"changed deps": {"data": "modified"}}],
    "train": [
        {"changed deps": {"artifacts/manifest.parquet": "deleted"}},
        {"changed deps": {"params.yaml": {"train": "modified"}}},
        {"changed deps": {"src/opensig/train.py": "modified"}},
        {"changed outs": {"artifacts/model": "deleted"}},
    ],
    "tune": [{"changed deps": {"artifacts/model": "deleted"}}, "changed command"],
    "evaluate": [{"changed outs": {"reports/metrics.json": "deleted"}}],
}


def test_describe_changes_names_the_causes_not_the_consequences() -> None:
    assert describe_changes(STATUS) == [
        "data.dvc: data modified",
        "evaluate: outputs stale",
        "ingest: data modified",
        "train: param train modified, src/opensig/train.py modified",
        "tune: changed command",
    ]
    assert describe_changes({}) == []


REGISTRATION = {
    "name": "opensig",
    "version": "4",
    "run_id": "abc123",
    "aliases": ["challenger"],
    "promoted": False,
    "comparison": {
        "metric": "macro_f1",
        "min_delta": 0.0,
        "challenger_value": 0.81234,
        "reason": "gain -0.0700 <= min_delta 0.0",
        "champion_version": "3",
        "champion_value": 0.88234,
        "gain": -0.07,
        "decision": "kept champion",
    },
}


def test_promotion_markdown_shows_both_metrics_and_the_reason() -> None:
    text = promotion_markdown(REGISTRATION, ["data.dvc: data modified"])
    assert text.startswith("# opensig: kept champion")
    assert "| challenger (new) | 4 | 0.8123 |" in text
    assert "| champion (before) | 3 | 0.8823 |" in text
    assert "Reason: gain -0.0700 <= min_delta 0.0" in text
    assert "- data.dvc: data modified" in text


def test_promotion_markdown_says_when_the_class_sets_differ() -> None:
    assert "class sets differ" not in promotion_markdown(REGISTRATION, [])
    other = {
        **REGISTRATION,
        "comparison": {
            **REGISTRATION["comparison"],
            "class_sets": "differ",
            "champion_lacks": ["circle", "square"],
            "champion_extra": ["0", "1"],
        },
    }
    text = promotion_markdown(other, [])
    assert "champion lacks circle, square, and has 0, 1 that today's data lacks" in text


def test_promotion_markdown_first_version_and_undefined_metric() -> None:
    first = {
        **REGISTRATION,
        "aliases": ["challenger", "champion"],
        "comparison": {
            "metric": "novel.auroc",
            "min_delta": 0.0,
            "challenger_value": None,
            "reason": "no champion yet",
            "decision": "promoted",
        },
    }
    text = promotion_markdown(first, [])
    assert "| challenger (new) | 4 | n/a |" in text
    assert "champion (before)" not in text and "What changed" not in text
    assert "challenger, champion" in text


def test_check_schedule_uses_prefects_cron_parser() -> None:
    check_schedule(RetrainConfig(cron="30 2 * * 1-5", timezone="Europe/Paris"), Path("p.yaml"))
    with pytest.raises(ConfigError, match=r"p.yaml: retrain.cron '61 3 \* \* \*'"):
        check_schedule(RetrainConfig(cron="61 3 * * *"), Path("p.yaml"))


def test_only_a_busy_repository_is_retried() -> None:
    assert _retry_if_busy(None, None, Failed(data=RepoBusy("Unable to acquire lock")))
    assert not _retry_if_busy(None, None, Failed(data=StepFailed("train failed")))


def test_serve_with_a_bad_cron_fails_before_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_params(tmp_path)
    result = CliRunner().invoke(
        app, ["retrain", "--project", str(tmp_path), "--serve", "--cron", "0 25 * * *"]
    )
    assert result.exit_code == 2
    assert "retrain.cron '0 25 * * *'" in caplog.text


def test_prefect_yaml_deploys_this_flow_on_the_params_schedule() -> None:
    deployment = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert flow.name == FLOW_NAME
    settings = load_config(REPO / "params.yaml").retrain
    assert deployment["schedules"] == [{"cron": settings.cron, "timezone": settings.timezone}]


@pytest.mark.parametrize(
    ("entrypoint", "flow_name", "section"),
    [
        ("pipelines/monitor.py:monitor", "opensig-monitor", "monitor"),
        ("pipelines/score.py:batch_score", "opensig-batch-score", "score"),
    ],
)
def test_prefect_yaml_deploys_the_other_flows_on_their_params_schedule(
    entrypoint: str, flow_name: str, section: str
) -> None:
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    (deployment,) = [d for d in deployments if d["entrypoint"] == entrypoint]
    assert load_flow_from_entrypoint(str(REPO / entrypoint)).name == flow_name
    settings = getattr(load_config(REPO / "params.yaml"), section)
    assert deployment["schedules"] == [{"cron": settings.cron, "timezone": "UTC"}]


def git_repo(folder: Path) -> Callable[..., str]:
    """A git repository with one empty commit in ``folder``, and git run there."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=folder, check=True, capture_output=True, text=True
        ).stdout

    git("init", "-q")
    git("config", "user.email", "ci@example.com")
    git("config", "user.name", "ci")
    git("commit", "-q", "--allow-empty", "-m", "the project")
    return git


def test_commit_records_only_the_project_files_given(tmp_path: Path) -> None:
    """data.dvc of a data.root outside the project is not the project's to commit, and a file
    the user staged stays out of the commit."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    git = git_repo(project)
    for path in (project / "dvc.lock", elsewhere / "data.dvc", project / "staged.txt"):
        path.write_text("x\n")
    git("add", "staged.txt")
    files = [project / "../project/dvc.lock", elsewhere / "data.dvc", project / "data.dvc"]
    with disable_run_logger():  # the task's function alone, outside a flow run
        commit.fn(project, files, "opensig retrain: promoted")
    assert git("show", "--name-only", "--format=", "HEAD").split() == ["dvc.lock"]
    assert git("diff", "--cached", "--name-only").split() == ["staged.txt"]


LOCK = """\
schema: '2.0'
stages:
  evaluate:
    cmd: opensig evaluate
    outs:
    - path: reports/metrics.json
    - path: reports/plots
  train:
    cmd: opensig train
    outs:
    - path: artifacts/model
    - path: reports/train.json
"""


def test_commit_takes_the_reports_dvc_repro_changed(tmp_path: Path) -> None:
    """The outputs git keeps (not DVC-cached) that changed go into the commit with dvc.lock;
    the cached ones (git-ignored), unchanged reports, other files and a staged one do not."""
    git = git_repo(tmp_path)
    for name, text in {
        "reports/metrics.json": "{}\n",
        "reports/train.json": "{}\n",
        "reports/plots/roc.csv": "fpr,tpr\n",
        "notes.txt": "mine\n",
        "artifacts/.gitignore": "/model\n",
        "reports/plots/.gitignore": "/roc.png\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git("add", ".")
    git("commit", "-q", "-m", "the reports")
    # what `dvc repro` writes: a changed metric, a new plot CSV, the cached outputs
    (tmp_path / "dvc.lock").write_text(LOCK)
    (tmp_path / "reports/metrics.json").write_text('{"macro_f1": 0.9}\n')
    (tmp_path / "reports/plots/oscr.csv").write_text("fpr,ccr\n")
    (tmp_path / "reports/plots/roc.png").write_bytes(b"png")
    (tmp_path / "artifacts/model").mkdir()
    (tmp_path / "artifacts/model/weights.safetensors").write_bytes(b"w")
    (tmp_path / "notes.txt").write_text("mine, edited\n")  # the user's, not an output
    (tmp_path / "staged.txt").write_text("staged\n")
    git("add", "staged.txt")

    with disable_run_logger():
        files = [tmp_path / "dvc.lock", *outputs_in_git(tmp_path)]
        commit.fn(tmp_path, files, "opensig retrain: promoted")
    stat = git("show", "HEAD", "--stat", "--format=")
    committed = git("show", "--name-only", "--format=", "HEAD").split()
    assert sorted(committed) == ["dvc.lock", "reports/metrics.json", "reports/plots/oscr.csv"]
    assert "reports/metrics.json" in stat and "staged.txt" not in stat
    assert git("diff", "--cached", "--name-only").split() == ["staged.txt"]
    assert git("status", "--porcelain", "--", "notes.txt").startswith(" M")
