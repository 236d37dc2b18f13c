"""`torchrun -m opensig train` with 2 CPU processes (gloo): one model, one report, one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from opensig.config import load_config
from opensig.stages import HERE, Layout, train

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def test_two_process_training_matches_single_process_shapes(project: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(BIN / "opensig"), "ingest"], check=True, env=env, cwd=project)
    result = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "opensig", "train"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(HERE.train_report.read_text())
    assert report["world_size"] == 2
    assert report["n_train"] > 0 and len(report["classes"]) == 6
    history = (HERE.train_plots / "train_history.csv").read_text().splitlines()
    assert len(history) == 1 + load_config().train.epochs  # written once, by rank 0

    cfg = load_config()
    single = Layout.under(project / "single")
    single.manifest.parent.mkdir(parents=True)
    single.manifest.write_bytes(HERE.manifest.read_bytes())
    train(cfg, single)
    ddp_weights = load_file(str(HERE.model_dir / "weights.safetensors"))
    single_weights = load_file(str(single.model_dir / "weights.safetensors"))
    assert {k: v.shape for k, v in ddp_weights.items()} == {
        k: v.shape for k, v in single_weights.items()
    }

    # The rest of the pipeline takes the DDP model like any other: one MLflow run, one version.
    # (In subprocesses: MLflow caches its store per URI, and "sqlite:///mlflow.db" is relative.)
    for stage in ("tune", "evaluate", "register"):
        subprocess.run([str(BIN / "opensig"), stage], check=True, env=env, cwd=project)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = {run.info.run_id for run in client.search_runs([experiment.experiment_id])}
    ddp_run = json.loads(HERE.train_report.read_text())["mlflow_run_id"]
    single_run = json.loads(single.train_report.read_text())["mlflow_run_id"]
    # rank 0's training run, completed by register; no run of rank 1 (the in-process single
    # training logs wherever MLflow's per-process store cache points, maybe here)
    assert runs - {single_run} == {ddp_run}
    assert json.loads(HERE.registered.read_text())["run_id"] == ddp_run
    steps = [m.step for m in client.get_metric_history(ddp_run, "train_loss")]
    assert sorted(steps) == list(range(1, cfg.train.epochs + 1))  # each epoch once
    assert len(client.search_model_versions(f"name='{cfg.mlflow.registered_model}'")) == 1
