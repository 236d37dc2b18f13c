"""`opensig bench compare`: two bench results paired by class split and seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from opensig.bench.compare import COMPARED, compare, compare_runs, load_results
from opensig.cli import app

SPLIT = {"known": ["a", "b"], "unknown": ["c"], "novel": ["d"]}


def _meta(**changes: object) -> dict:
    meta = {
        "dataset": "fashion-mnist",
        "class_splits": [SPLIT],
        "random_splits": False,
        "near": False,
        "per_class": 1000,
        "test_per_class": None,
        "epochs": 8,
        "train_defaults": {"lr": 0.002, "augment": {"rotate": 10.0}},
        "date": "2026-12-06T00:00:00+00:00",
    }
    return meta | changes


def _runs(values: dict[int, float], score: str = "mahalanobis") -> list[dict]:
    """One run per seed; every compared figure is ``value`` (FPR95: 1 - value)."""
    return [
        {"split": 0, "seed": seed, "method": "sigmoid_bce", "feature_score": score}
        | {key: (1 - value if key == "novel.fpr95" else value) for key in COMPARED}
        for seed, value in values.items()
    ]


def _write(path: Path, meta: dict, runs: list[dict]) -> Path:
    path.write_text(json.dumps({"meta": meta, "runs": runs}))
    return path


def test_differences_are_paired_by_seed_with_scipys_interval(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.json", _meta(), _runs({0: 0.90, 1: 0.80, 2: 0.85}))
    cand_runs = _runs({0: 0.91, 1: 0.83, 2: 0.86, 3: 0.99})  # seed 3: no partner, not counted
    cand = _write(tmp_path / "cand.json", _meta(epochs=16), cand_runs)
    paired = compare_runs(load_results(base)[1], load_results(cand)[1])
    row = paired.loc[("sigmoid_bce", "mahalanobis")]
    diffs = np.array([0.01, 0.03, 0.01])
    half = stats.t.ppf(0.975, 2) * stats.sem(diffs)
    assert row["pairs"] == 3
    assert row["known_accuracy"] == pytest.approx(diffs.mean())
    assert row["known_accuracy_lo"] == pytest.approx(diffs.mean() - half)
    assert row["known_accuracy_hi"] == pytest.approx(diffs.mean() + half)
    assert row["novel.fpr95"] == pytest.approx(-diffs.mean())  # the sign is candidate - base
    table = compare(base, cand)
    assert "- `epochs`: 8 -> 16" in table
    assert "`date`" not in table  # the environment is not a setting
    assert f"| sigmoid_bce | mahalanobis | 3 | +{diffs.mean():.3f} [" in table


def test_one_pair_has_no_interval(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.json", _meta(), _runs({0: 0.90}))
    cand = _write(tmp_path / "cand.json", _meta(), _runs({0: 0.92}))
    table = compare(base, cand)
    assert "| sigmoid_bce | mahalanobis | 1 | +0.020 | +0.020 |" in table
    assert "- none" in table  # nothing differs


def test_refuses_another_protocol_no_shared_run_and_foreign_files(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.json", _meta(), _runs({0: 0.9}))
    near = _write(tmp_path / "near.json", _meta(near=True), _runs({0: 0.9}))
    with pytest.raises(ValueError, match=r"near is True.*compare runs of one protocol"):
        compare(base, near)
    other = _write(tmp_path / "other.json", _meta(), _runs({5: 0.9}, score="knn"))
    with pytest.raises(ValueError, match=r"share no .* run"):
        compare(base, other)
    foreign = tmp_path / "metrics.json"
    foreign.write_text(json.dumps({"macro_f1": 0.8}))
    with pytest.raises(ValueError, match=r"metrics\.json: not an `opensig bench openset` result"):
        compare(base, foreign)
    with pytest.raises(FileNotFoundError, match=r"missing\.json: not found"):
        compare(base, tmp_path / "missing.json")


def test_command_prints_the_table_or_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = _write(tmp_path / "base.json", _meta(), _runs({0: 0.90, 1: 0.80}))
    cand = _write(tmp_path / "cand.json", _meta(), _runs({0: 0.91, 1: 0.82}))
    result = CliRunner().invoke(app, ["bench", "compare", str(base), str(cand)])
    assert result.exit_code == 0, result.output
    assert "| sigmoid_bce | mahalanobis | 2 | +0.015 [" in result.output
    result = CliRunner().invoke(app, ["bench", "compare", str(base), str(tmp_path / "x.json")])
    assert result.exit_code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("bench failed: ")
    assert "x.json: not found" in errors[0] and "Traceback" not in result.output


def test_says_where_each_ran_and_when_the_pairs_share_little(tmp_path: Path) -> None:
    here = {"machine": "EPYC", "cpu_capability": "AVX2", "threads": 2}
    base = _write(tmp_path / "base.json", _meta(**here), _runs({0: 0.90, 1: 0.80}))
    same = _write(tmp_path / "same.json", _meta(**here), _runs({0: 0.91, 1: 0.82}))
    text = compare(base, same)
    assert "Ran on: base EPYC, AVX2, 2 threads; candidate EPYC, AVX2, 2 threads." in text
    assert "share little" not in text  # one path: nothing to warn about
    parts = [here | {"file": "a.json"}, here | {"file": "b.json", "cpu_capability": "AVX512"}]
    merged = _write(tmp_path / "merged.json", _meta(merged_from=parts), _runs({0: 0.9, 1: 0.8}))
    text = compare(base, merged)
    assert "candidate EPYC, AVX2, 2 threads; EPYC, AVX512, 2 threads." in text
    assert "a pair shares little" in text
    old = _write(tmp_path / "old.json", _meta(machine="EPYC"), _runs({0: 0.9, 1: 0.8}))
    text = compare(old, same)
    assert "base EPYC, kernels and threads not recorded" in text and "shares little" in text
