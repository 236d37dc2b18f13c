"""The open-set benchmark: tables from results, and one tiny real run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from opensig.bench.openset import COLUMNS, summarise, to_markdown
from opensig.cli import app
from opensig.data.demo import FASHION_DIR
from opensig.methods import METHODS
from tests.conftest import write_params


def _results() -> pd.DataFrame:
    rows = []
    for method, base in [("sigmoid_bce", 0.9), ("softmax_msp", 0.7)]:
        for seed, delta in [(0, -0.02), (1, 0.02)]:
            rows.append({"method": method, "seed": seed, **{k: base + delta for k in COLUMNS}})
    return pd.DataFrame(rows)


def test_summary_is_mean_and_spread_over_seeds_in_run_order() -> None:
    summary = summarise(_results())
    assert list(summary.index) == ["sigmoid_bce", "softmax_msp"]
    assert summary.loc["sigmoid_bce", "novel.auroc"] == pytest.approx(0.9)
    assert summary.loc["softmax_msp", "novel.auroc_std"] == pytest.approx(0.02)
    table = to_markdown(summary, n_seeds=2)
    assert "| sigmoid_bce | 0.900 ± 0.020 |" in table
    assert table.splitlines()[0].count("|") == len(COLUMNS) + 2


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_bench_command_runs_every_method_on_a_tiny_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "openset",
            "--dataset",
            "fashion-mnist",
            "--epochs",
            "1",
            "--per-class",
            "12",
            "--test-per-class",
            "6",
            "--backbone",
            "resnet10t",
            "--image-size",
            "16",
            "--batch-size",
            "32",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(Path("bench/results/openset_fashion-mnist.json").read_text())
    methods = [row["method"] for row in saved["summary"]]
    assert methods == list(METHODS)
    assert saved["runs"][0]["novel.auroc"] is not None
    assert saved["meta"]["per_class"] == 12
    assert "| softmax_eos |" in Path("bench/results/openset_fashion-mnist.md").read_text()
    runs = pd.read_parquet("bench/work/manifest.parquet")
    assert set(runs[runs["novel"]]["source"]) == {"bag", "ankle_boot"}
    assert set(runs[runs["split"] != "test"]["source"]).isdisjoint({"bag", "ankle_boot"})


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_speed_bench_measures_every_figure_against_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    args = ["bench", "speed", "--backbone", "resnet10t", "--image-size", "16"]
    args += ["--per-class", "30", "--epochs", "2", "--rounds", "2", "--ingest-images", "10"]
    args += ["--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "bench/results/speed_cpu_16px.json").read_text())
    train, predict, ingest = figures["train"], figures["predict"], figures["ingest"]
    assert len(train["rounds"]) == len(predict["rounds"]) == 2
    first = train["rounds"][0]
    assert first["ratio_to_limit"] == pytest.approx(
        first["stage_images_per_s"] / first["limit_images_per_s"]
    )
    assert min(train["stage_images_per_s"], train["reference_images_per_s"]) > 0
    assert predict["images"] == 6 * 30 and predict["ratio_to_limit"] > 0
    assert ingest["files"] == 10 * 10 and ingest["rerun_reused"] == ingest["files"]
    assert figures["meta"]["torch"] and "| train stage |" in result.output
