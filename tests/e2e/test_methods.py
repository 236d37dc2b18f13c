"""Every training method: one short real run on the digits demo, through the same stages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from opensig.config import load_config
from opensig.methods import METHODS
from opensig.stages import Layout, evaluate, ingest, train, tune
from tests.conftest import write_params

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> Path:
    root = tmp_path_factory.mktemp("methods")
    shutil.copytree(digits_data, root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        ingest(load_config(write_params(root)))
    return root


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_scores_sanely(
    method: str, ingested: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ingested)  # manifest paths are relative to the project folder
    cfg = load_config(write_params(tmp_path, {"train": {"method": method, "epochs": 2}}))
    at = Layout.under(tmp_path)
    at.manifest.parent.mkdir(parents=True)
    shutil.copy(Layout.under(ingested).manifest, at.manifest)

    train(cfg, at)
    tune(cfg, at)
    metrics = evaluate(cfg, at)

    assert metrics["known_accuracy"] > 0.6, metrics  # chance: 1/6
    assert 0.0 <= metrics["unknown_recall"] <= 1.0
    assert metrics["novel"]["auroc"] > 0.5, metrics
    assert metrics["macro_f1"] > 0.3, metrics
