"""`opensig bench ingest-scale` on a tiny tree: every step runs for real and its figures add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opensig.bench.ingest_scale import check
from opensig.bench.options import IngestScaleOptions
from opensig.cli import app


@pytest.mark.usefixtures("params_here")
def test_ingest_scale_measures_every_step_per_file(tmp_path: Path) -> None:
    args = ["bench", "ingest-scale", "--files", "300", "--added", "8"]
    args += ["--log-rows", "2000", "--log-batch", "100", "--review-max", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "bench/results/ingest-scale.json").read_text())
    steps = figures["steps"]
    assert len(steps) == 13
    for name, step in steps.items():
        assert step["seconds"] > 0 and step["peak_rss_bytes"] > 0, name
        assert step["us_per_item"] == pytest.approx(step["seconds"] / step["items"] * 1e6)
    first, rerun = steps["ingest, first run"], steps["ingest, re-run (unchanged)"]
    assert first["files"] == first["kept"] == 300 and first["reused"] == 0
    assert rerun["reused"] == 300  # the probe cache: no file opened again
    assert steps["ingest, after adding files"]["reused"] == 300
    assert steps["ingest, after adding files"]["kept"] == 308
    assert min(first["manifest_bytes"], first["scan_cache_bytes"]) > 0
    disk = figures["disk"]
    assert disk["data"]["files"] == 308
    assert disk["dvc_cache"]["files"] == disk["remote"]["files"] == 308 + 2  # + 2 .dir files
    assert disk["data"]["disk_bytes"] >= disk["data"]["bytes"] > 0
    assert disk["log"]["files"] == 20
    assert disk["dvc_dir_object"]["bytes"] > 308 * 50  # one entry per file
    for name in ("dvc_site_cache", "dvc_site_cache_clone"):  # DVC's state, outside the repo
        assert disk[name]["bytes"] > 0
        assert not Path(disk[name]["path"]).exists()  # measured, then not left behind
    assert steps["prediction log: read_log"]["rows"] == 2000
    assert steps["opensig monitor (monitor_log)"]["status"] in {"ok", "alert"}
    assert steps["opensig review export (export_from_log)"]["copied"] == 5
    table = (tmp_path / "bench/results/ingest-scale.md").read_text()
    assert table in result.output and "| dvc pull (fresh clone) | 308 |" in table


def test_ingest_scale_refuses_a_bad_option_before_writing_anything(tmp_path: Path) -> None:
    for bad, option in [
        ({"files": 10}, "--files"),
        ({"added": 0}, "--added"),
        ({"log_rows": 10}, "--log-rows"),
        ({"log_batch": 0}, "--log-batch"),
    ]:
        with pytest.raises(ValueError, match=option):
            check(IngestScaleOptions(work=tmp_path / "work", **bad))
    assert not (tmp_path / "work").exists()
