"""What a person compares in the MLflow UI, checked through MLflow's REST API on a real
tracking server: two pipeline runs with different params are two runs of a model-training
experiment, each with its own readable name, provenance tags, the params and metrics a
person compares (counts as tags), and its pictures where the UI puts runs side by side."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from tests.conftest import write_params
from tests.e2e.test_pipeline import run_cli

pytestmark = pytest.mark.e2e

DVC_EXPERIMENT = "quiet-wren"  # what `dvc exp run` would set as $DVC_EXP_NAME
COMPARED = {"data", "model", "train", "tune"}  # param sections a person compares
PICTURES = {"confusion.png", "roc.png", "oscr.png", "loss.png"}


@pytest.fixture(scope="module")
def pipeline_runs(
    mlflow_server: str, tmp_path_factory: pytest.TempPathFactory, digits_data: Path
) -> dict:
    """One project (a git repo) run twice against the server: seed 0, then seed 1 as a DVC
    experiment; returns the git commit and the experiment's runs, oldest first."""
    root = tmp_path_factory.mktemp("ui-project")
    shutil.copytree(digits_data, root / "data")
    mlflow = {"tracking_uri": mlflow_server}
    write_params(root, {"train": {"epochs": 1}, "mlflow": mlflow})
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    for args in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "params"]):
        subprocess.run([*git, *args], cwd=root, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("DVC_EXP_NAME", raising=False)
        for stage in ("ingest", "train", "tune", "evaluate", "register"):
            run_cli(stage)
        write_params(root, {"train": {"epochs": 1, "seed": 1}, "mlflow": mlflow})
        mp.setenv("DVC_EXP_NAME", DVC_EXPERIMENT)
        for stage in ("train", "tune", "evaluate", "register"):
            run_cli(stage)
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": "opensig"}, timeout=30
    ).json()["experiment"]
    runs = requests.post(
        f"{api}/runs/search",
        json={"experiment_ids": [experiment["experiment_id"]], "order_by": ["start_time ASC"]},
        timeout=30,
    ).json()["runs"]
    return {"api": api, "commit": commit, "experiment": experiment, "runs": runs}


def _pairs(entries: list[dict]) -> dict[str, str]:
    return {entry["key"]: entry["value"] for entry in entries}


def _files(api: str, run_id: str, path: str = "") -> set[str]:
    listing = requests.get(
        f"{api}/artifacts/list", params={"run_id": run_id, "path": path}, timeout=30
    ).json()
    return {f["path"] for f in listing.get("files", []) if not f["is_dir"]}


def test_experiment_opens_as_model_training(pipeline_runs: dict) -> None:
    tags = _pairs(pipeline_runs["experiment"]["tags"])
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_each_pipeline_run_is_one_named_run_with_provenance(pipeline_runs: dict) -> None:
    first, second = pipeline_runs["runs"]  # train and register share a run: two in all
    names = [run["info"]["run_name"] for run in (first, second)]
    assert names[0] != names[1]
    # what tells runs apart first (the UI cuts names off at the end)
    assert re.fullmatch(r"[0-9a-f]{7} sigmoid_bce resnet10t 16px", names[0]), names[0]
    assert re.fullmatch(rf"{DVC_EXPERIMENT} [0-9a-f]{{7}} sigmoid_bce resnet10t 16px", names[1])
    for run in (first, second):
        tags = _pairs(run["data"]["tags"])
        assert tags["git_commit"] == tags["mlflow.source.git.commit"] == pipeline_runs["commit"]
        for count in ("n_known", "n_unknown", "novel.n_novel"):
            assert int(tags[count]) > 0, count
    assert "dvc_experiment" not in _pairs(first["data"]["tags"])
    assert _pairs(second["data"]["tags"])["dvc_experiment"] == DVC_EXPERIMENT


def test_runs_carry_the_params_and_metrics_a_person_compares(pipeline_runs: dict) -> None:
    seeds = []
    for run in pipeline_runs["runs"]:
        params = _pairs(run["data"]["params"])
        assert {key.split(".")[0] for key in params} == COMPARED  # no mlflow.*, promote.*, ...
        seeds.append(params["train.seed"])
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"macro_f1", "known_accuracy", "train_loss", "val_loss"} <= metrics
        assert {"openset/auroc", "openset/fpr95", "novel/auroc", "novel/fpr95"} <= metrics
        assert not [key for key in metrics if key.rsplit("/", 1)[-1].startswith("n_")]
    assert seeds == ["0", "1"]


def test_pictures_are_where_the_ui_compares_runs(pipeline_runs: dict) -> None:
    api, runs = pipeline_runs["api"], pipeline_runs["runs"]
    # The Compare page lists the files at the top of the artifacts common to every run.
    common = set.intersection(*(_files(api, run["info"]["run_id"]) for run in runs))
    assert common >= PICTURES
    for run in runs:
        run_id, tags = run["info"]["run_id"], _pairs(run["data"]["tags"])
        assert tags["mlflow.loggedImages"].lower() == "true"  # the chart view's image cards
        images = _files(api, run_id, "images")
        assert any(path.startswith("images/pictures~roc+step+0+") for path in images)
        tables = {entry["path"] for entry in json.loads(tags["mlflow.loggedArtifacts"])}
        expected = {"roc_seen_unknown", "roc_novel_unknown", "oscr_novel_unknown", "confusion"}
        assert {f"tables/{name}.json" for name in expected} <= tables
        assert tables <= _files(api, run_id, "tables")
