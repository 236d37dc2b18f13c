"""The open-set benchmark: tables from results, and one tiny real run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from opensig.bench import speed
from opensig.bench.common import summary
from opensig.bench.openset import (
    COLUMNS,
    NEAR_PROTOCOL,
    PROTOCOL,
    checked,
    class_splits,
    paired_differences,
    summarise,
    to_markdown,
)
from opensig.bench.options import BenchOptions, SpeedOptions
from opensig.cli import app
from opensig.data.demo import FASHION_DIR
from opensig.methods import METHODS
from opensig.posthoc import FEATURE_SCORES
from tests.conftest import write_params


def _results() -> pd.DataFrame:
    rows = []
    for method, base in [("sigmoid_bce", 0.9), ("softmax_msp", 0.7)]:
        for score, shift in [("mahalanobis", 0.05), ("none", 0.0)]:
            for seed, delta in [(0, -0.02), (1, 0.02)]:
                values = {k: base + shift + delta for k in COLUMNS}
                rows.append({"method": method, "feature_score": score, "seed": seed, **values})
    return pd.DataFrame(rows)


def test_summary_is_mean_and_spread_over_seeds_in_run_order() -> None:
    summary = summarise(_results())
    assert list(summary.index) == [
        ("sigmoid_bce", "mahalanobis"),
        ("sigmoid_bce", "none"),
        ("softmax_msp", "mahalanobis"),
        ("softmax_msp", "none"),
    ]
    assert summary.loc[("sigmoid_bce", "none"), "novel.auroc"] == pytest.approx(0.9)
    assert summary.loc[("softmax_msp", "mahalanobis"), "novel.auroc"] == pytest.approx(0.75)
    assert summary.loc[("softmax_msp", "none"), "novel.auroc_std"] == pytest.approx(0.02)
    table = to_markdown(summary, 2, default=("sigmoid_bce", "mahalanobis"))
    assert "| **sigmoid_bce** (opensig default) | mahalanobis | 0.950 ± 0.020 |" in table
    assert "| sigmoid_bce | none | 0.900 ± 0.020 |" in table
    assert table.splitlines()[0].count("|") == len(COLUMNS) + 3


def test_paired_differences_are_per_split_and_seed_with_a_t_interval() -> None:
    results = _results().assign(split=0)
    results.loc[results["seed"] == 1, "macro_f1"] += np.where(
        results.loc[results["seed"] == 1, "method"] == "softmax_msp", 0.03, 0.0
    )
    paired = paired_differences(results, ("sigmoid_bce", "mahalanobis"))
    assert ("sigmoid_bce", "mahalanobis") not in paired.index
    none = paired.loc[("sigmoid_bce", "none")]  # -0.05 on both seeds: no spread
    assert none["pairs"] == 2 and none["novel.auroc"] == pytest.approx(-0.05)
    assert none["novel.auroc_lo"] == pytest.approx(-0.05)
    msp = paired.loc[("softmax_msp", "mahalanobis")]  # -0.2 and -0.17
    diffs = np.array([-0.2, -0.17])
    half = stats.t.ppf(0.975, 1) * stats.sem(diffs)
    assert msp["macro_f1"] == pytest.approx(diffs.mean())
    assert msp["macro_f1_hi"] == pytest.approx(diffs.mean() + half)


def test_class_splits_are_seeded_disjoint_six_two_two() -> None:
    classes = tuple("abcdefghij")
    splits = class_splits(classes, 3)
    assert splits == class_splits(classes, 3) and splits[:2] == class_splits(classes, 2)
    assert len(set(splits)) == 3
    for split in splits:
        assert (len(split.known), len(split.unknown), len(split.novel)) == (6, 2, 2)
        assert sorted(split.known + split.unknown + split.novel) == list(classes)


def test_the_near_protocol_holds_the_far_classes_for_training_and_the_near_for_test() -> None:
    near, fixed = NEAR_PROTOCOL["fashion-mnist"], PROTOCOL["fashion-mnist"]
    assert near.known == fixed.known  # the same known classes, the other four swapped
    assert (near.unknown, near.novel) == (("ankle_boot", "bag"), ("shirt", "sneaker"))


def test_bench_options_are_checked_before_anything_runs(tmp_path: Path) -> None:
    for bad, message in [
        ({"dataset": "cifar"}, "--dataset"),
        ({"methods": ["softmax"]}, "--method"),
        ({"feature_scores": ["cosine"]}, "--feature-score"),
        ({"splits": -1}, "--splits"),
        ({"first_seed": -1}, "--first-seed"),
        ({"near": True, "splits": 2}, "--near: one fixed split"),
        ({"near": True, "dataset": "digits"}, "--near: one fixed split, of \\['fashion-mnist'\\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            checked(BenchOptions(work=tmp_path, **bad))


@pytest.mark.usefixtures("params_here")
def test_bench_on_two_random_class_splits_of_digits(tmp_path: Path) -> None:
    """The open-set protocol on random class splits, tiny: every split trains and is scored
    with each feature score, and the novel images are the split's novel classes."""
    args = ["bench", "openset", "--dataset", "digits", "--splits", "2", "--epochs", "1"]
    args += ["--backbone", "resnet10t", "--image-size", "16", "--batch-size", "64"]
    args += ["--device", "cpu", "--method", "sigmoid_bce", "--first-seed", "3"]
    args += ["--feature-score", "mahalanobis", "--feature-score", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads(Path("bench/results/openset_digits_splits.json").read_text())
    assert saved["meta"]["seeds"] == [3] and {r["seed"] for r in saved["runs"]} == {3}
    splits = saved["meta"]["class_splits"]
    assert len(splits) == 2 and len(saved["runs"]) == 2 * 2
    assert [(r["method"], r["feature_score"]) for r in saved["summary"]] == [
        ("sigmoid_bce", "mahalanobis"),
        ("sigmoid_bce", "none"),
    ]
    for index, split in enumerate(splits):
        manifest = pd.read_parquet(f"bench/work/split{index}/manifest.parquet")
        assert set(manifest[manifest["novel"]]["source"]) == set(split["novel"])
        assert set(manifest[manifest["label"] != "unknown"]["label"]) == set(split["known"])
        runs = [r for r in saved["runs"] if r["split"] == index]
        assert sorted(r["feature_score"] for r in runs) == ["mahalanobis", "none"]
        assert all(0.0 <= r["novel.auroc"] <= 1.0 for r in runs)
    for row in saved["summary"]:  # each row: the mean over the splits of its runs
        runs = [r for r in saved["runs"] if r["feature_score"] == row["feature_score"]]
        mean = sum(r["novel.auroc"] for r in runs) / len(runs)
        assert row["novel.auroc"] == pytest.approx(mean)
    table = Path("bench/results/openset_digits_splits.md").read_text()
    assert "| **sigmoid_bce** (opensig default) | mahalanobis |" in table
    # pictures by default, one set per feature score
    for score in ("mahalanobis", "none"):
        plots = Path(f"bench/work/split0/runs/sigmoid_bce-seed3/score-{score}/plots")
        assert (plots / "confusion.png").is_file() and (plots / "roc.png").is_file()
    assert f"| 0 | {', '.join(splits[0]['known'])} |" in table


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.usefixtures("params_here")
def test_bench_command_runs_every_method_on_a_tiny_sample(tmp_path: Path) -> None:
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
            "--no-pictures",  # drawing 36 evaluations' pictures was three quarters of this test
        ],
    )
    assert result.exit_code == 0, result.output
    assert not list(Path("bench/work/runs").glob("*/score-*/plots/*.png"))
    saved = json.loads(Path("bench/results/openset_fashion-mnist.json").read_text())
    rows = [(row["method"], row["feature_score"]) for row in saved["summary"]]
    assert rows == [(m, s) for m in METHODS for s in FEATURE_SCORES]
    assert all(0.0 <= run["novel.auroc"] <= 1.0 for run in saved["runs"])
    assert saved["meta"]["per_class"] == 12
    table = Path("bench/results/openset_fashion-mnist.md").read_text()
    assert "| softmax_eos | none |" in table
    # paired against the default on the same seed, and pytorch-ood on the same networks
    assert len(saved["paired"]) == len(METHODS) * len(FEATURE_SCORES) - 1
    assert {r["detector"] for r in saved["cross_check"]} == {
        "Mahalanobis",
        "RMD",
        "KNN",
        "ViM",
        "Energy",
        "MaxLogit",
        "GEN",
        "fDBD",
    }
    assert len(saved["cross_check"]) == 8 * len(METHODS)
    assert "| sigmoid_bce | pytorch-ood " in table and "(best on val)" in table
    assert all(0.0 <= run["val_auroc"] <= 1.0 for run in saved["runs"])
    runs = pd.read_parquet("bench/work/manifest.parquet")
    assert set(runs[runs["novel"]]["source"]) == {"bag", "ankle_boot"}
    assert set(runs[runs["split"] != "test"]["source"]).isdisjoint({"bag", "ankle_boot"})


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.usefixtures("params_here")
def test_speed_bench_measures_every_figure_against_its_limit(tmp_path: Path) -> None:
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
    cached = figures["cached"]
    assert [cached[f"cached_{pct}"] for pct in (0, 50, 100)] == [
        0.0,
        pytest.approx(0.5, abs=0.02),
        1.0,
    ]
    assert min(cached[f"images_per_s_{pct}"] for pct in (0, 50, 100)) > 0
    assert "| train stage, 50% of its images in the decode cache |" in result.output
    assert {r["limit_layout"] for r in train["rounds"]} <= set(speed.LAYOUTS)
    assert {r["reference_layout"] for r in train["rounds"]} == {"contiguous"}  # 1 channel
    low, high = train["spread"]["ratio_to_limit"]
    assert low <= train["ratio_to_limit"] <= high
    table = (tmp_path / "bench/results/speed_cpu_16px.md").read_text()
    assert table in result.output
    assert "| 2 |" in table.split("Train, every round:")[1].split("Predict")[0]


def test_speed_bench_refuses_a_bad_option_before_any_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for bad, option in [
        ({"ingest_images": 0}, "--ingest-images"),
        ({"rounds": 0}, "--rounds"),
        ({"epochs": 0}, "--epochs"),
        ({"per_class": -1}, "--per-class"),
        ({"batch_size": 0}, "--batch-size"),
        ({"image_size": 4}, "--image-size"),
        ({"in_chans": 2}, "--in-chans"),
        ({"device": "tpu"}, "--device"),
        ({"backbone": "resnet1"}, "--backbone"),
    ]:
        with pytest.raises(ValueError, match=option):
            speed.check(SpeedOptions(work=tmp_path, **bad))
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    result = CliRunner().invoke(app, ["bench", "speed", "--ingest-images", "0"])
    assert result.exit_code == 2
    assert not (tmp_path / "bench").exists()  # refused before any data or round


def test_speed_table_shows_the_spread_and_every_round() -> None:
    def train_round(stage: float, layout: str) -> dict:
        limit, reference = 100.0, 80.0
        return {
            "stage_images_per_s": stage,
            "limit_images_per_s": limit,
            "reference_images_per_s": reference,
            "ratio_to_limit": stage / limit,
            "reference_ratio_to_limit": reference / limit,
            "stage_layout": "channels_last",
            "limit_layout": layout,
            "reference_layout": "contiguous",
        }

    train = [
        train_round(90, "channels_last"),
        train_round(96, "contiguous"),
        train_round(93, "channels_last"),
    ]
    predict = [
        {"predict_images_per_s": r, "forward_images_per_s": 100.0, "ratio_to_limit": r / 100}
        for r in (70.0, 90.0, 80.0)
    ]
    ingest = {"files": 100, "first_files_per_s": 1000.0, "rerun_files_per_s": 5000.0}
    cached = [
        {"cached_0": 0.0, "cached_50": 0.5, "cached_100": 1.0}
        | {"images_per_s_0": 60.0, "images_per_s_50": 80.0, "images_per_s_100": 100.0}
    ]
    results = {
        "train": {**summary(train), "rounds": train},
        "cached": {**summary(cached), "rounds": cached},
        "predict": {**summary(predict), "rounds": predict},
        "ingest": ingest,
    }
    table = speed.to_markdown(results)
    assert "| train stage | 93 | 90-96 | 100 | 100-100 | 0.93 | 0.90-0.96 |" in table
    assert "| reference loop (ImageFolder + DataLoader, contiguous) | 80 | 80-80 |" in table
    assert "| predict (folder of PNGs) | 80 | 70-90 | 100 | 100-100 | 0.80 | 0.70-0.90 |" in table
    assert "| 2 | 96 | channels_last | 100 | contiguous | 0.96 | 80 | contiguous | 0.80 |" in table
    assert "| 3 | 80 | 100 | 0.80 |" in table
    assert "| train stage, 50% of its images in the decode cache | 80 | 80-80 | 100 (all" in table
    assert "| train stage, 0% of its images in the decode cache | 60 | 60-60 |" in table


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.usefixtures("params_here")
def test_cache_bench_fills_grows_and_reads_within_its_limit(tmp_path: Path) -> None:
    args = ["bench", "cache", "--images", "40", "--added", "4", "--image-size", "32"]
    result = CliRunner().invoke(app, [*args, "--memory-limit-gb", "2"])
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "bench/results/cache_32px.json").read_text())
    fill, grown, read = (figures["phases"][p] for p in ("fill", "incremental", "read"))
    assert (fill["images"], grown["images"], read["images"]) == (40, 4, 44)  # only the new 4
    image = 32 * 32 * 3
    assert 4 * image <= grown["cache_bytes"] - fill["cache_bytes"] < 4 * image + 4096
    assert 0 < fill["rss_after_imports_bytes"] <= fill["peak_rss_bytes"]
    assert "| incremental | 4 |" in result.output
