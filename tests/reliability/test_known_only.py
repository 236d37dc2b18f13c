"""A data folder with no unknown images: the pipeline trains known-only and says so."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opensig.cli import app
from tests.conftest import write_params

pytestmark = pytest.mark.e2e


def test_no_unknown_images_trains_known_only_and_warns(project: Path, caplog) -> None:
    shutil.rmtree(project / "data" / "unknown")
    write_params(project, {"data": {"holdout_unknown": []}})
    with caplog.at_level(logging.WARNING):
        for stage in ("ingest", "train", "tune", "evaluate"):
            result = CliRunner().invoke(app, [stage])
            assert result.exit_code == 0, f"{stage}: {result.output}"

    report = json.loads(Path("reports/ingest.json").read_text())
    assert any("no unknown images" in w for w in report["warnings"])
    assert "no unknown images" in caplog.text
    metrics = json.loads(Path("reports/metrics.json").read_text())
    assert metrics["known_accuracy"] > 0.8
    assert metrics["auroc"] is None  # undefined without unknowns, written as null, not a guess
