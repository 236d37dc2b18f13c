"""Safety: no unpickling of untrusted files, and no file read outside its folder."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from opensig.cli import app
from opensig.decision import THRESHOLDS_FILE, write_thresholds
from opensig.model import build_spec, create_model, model_digest, save_model_dir
from opensig.tracking.model_uri import resolve_model_dir

SRC = Path(__file__).resolve().parents[2] / "src" / "opensig"


class _Exploit:
    """Unpickling this runs a command: what a booby-trapped .pth file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_file_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    trap = tmp_path / "weights.pth"
    torch.save({"conv1.weight": _Exploit(marker)}, trap)
    with pytest.raises(ValueError, match=r"model\.pretrained_file: .*not unpickled"):
        create_model("resnet10t", 3, pretrained_file=trap)
    assert not marker.exists()
    torch.load(trap, weights_only=False)  # the unsafe way: the trap is real
    assert marker.exists()


def test_source_never_unpickles() -> None:
    """Every loader in the package is safetensors, JSON, parquet, or torch.load(weights_only)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"\bpickle\.load", r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False"):
            offenders += [f"{path.name}: {pattern}" for _ in re.finditer(pattern, text)]
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path.name}: {call.group(0)}")
    assert offenders == []


@pytest.fixture
def mlflow_model_folder(tmp_path: Path) -> Path:
    """An MLflow model folder laid out like a registered opensig model."""
    folder = tmp_path / "model"
    bundle = folder / "artifacts" / "bundle"
    net = create_model("resnet10t", 2, 3)
    save_model_dir(bundle, net, build_spec(net, "resnet10t", ["a", "b"], "sigmoid_bce", 2, 16, 3))
    write_thresholds(
        bundle / THRESHOLDS_FILE,
        ["a", "b"],
        [0.5, 0.5],
        "fixed",
        {},
        model_sha256=model_digest(bundle),
    )
    (folder / "MLmodel").write_text("flavors: {}\n")
    return folder


def test_model_folder_is_used_when_its_files_stay_inside(mlflow_model_folder: Path) -> None:
    assert resolve_model_dir(str(mlflow_model_folder)) == mlflow_model_folder / "artifacts/bundle"


def test_model_folder_whose_file_links_outside_is_refused(
    mlflow_model_folder: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "s3cret"}')
    spec = mlflow_model_folder / "artifacts" / "bundle" / "config.json"
    spec.unlink()
    os.symlink(secret, spec)
    with pytest.raises(ValueError, match=r"config\.json leads to .*secret\.json, outside"):
        resolve_model_dir(str(mlflow_model_folder))


def test_model_folder_with_a_linked_subfolder_outside_is_refused(
    mlflow_model_folder: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.move(mlflow_model_folder / "artifacts" / "bundle", elsewhere)
    os.symlink(elsewhere, mlflow_model_folder / "artifacts" / "bundle")
    with pytest.raises(ValueError, match="outside the model folder"):
        resolve_model_dir(str(mlflow_model_folder))


@pytest.mark.parametrize("escape", ["data/../secrets/key.png", "/etc/hostname"])
def test_manifest_path_outside_the_data_folder_stops_the_stage(
    project: Path, escape: str, caplog
) -> None:
    assert CliRunner().invoke(app, ["ingest"]).exit_code == 0
    manifest = pd.read_parquet("artifacts/manifest.parquet")
    manifest.loc[0, "path"] = escape
    manifest.to_parquet("artifacts/manifest.parquet", index=False)
    with caplog.at_level(logging.ERROR):
        result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 2
    assert f"outside the data folder data, e.g. '{escape}'" in caplog.text
    assert not Path("artifacts/model").exists()
