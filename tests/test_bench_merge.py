"""`opensig bench merge`: results of one protocol and recipe, run apart, joined."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from opensig.bench.compare import load_results
from opensig.bench.merge import merge
from opensig.bench.openset import COLUMNS
from opensig.cli import app

SPLIT = {"known": ["a", "b"], "unknown": ["c"], "novel": ["d"]}


def _meta(seeds: list[int], **changes: object) -> dict:
    meta = {
        "dataset": "fashion-mnist",
        "seeds": seeds,
        "class_splits": [SPLIT],
        "random_splits": False,
        "near": True,
        "feature_scores": ["mahalanobis"],
        "per_class": 1000,
        "test_per_class": None,
        "epochs": 16,
        "train_defaults": {"method": "sigmoid_bce", "lr": 0.004},
        "tune_defaults": {"feature_score": "mahalanobis"},
        "torch": "2.14.1",
        "machine": "one machine",
        "cpu_capability": "AVX2",
        "threads": 2,
        "date": "2026-12-06T00:00:00+00:00",
    }
    return meta | changes


def _runs(method: str, values: dict[int, float]) -> list[dict]:
    """One run per seed; every figure is ``value``."""
    return [
        {"split": 0, "seed": seed, "method": method, "feature_score": "mahalanobis"}
        | {key: value for key in COLUMNS}
        for seed, value in values.items()
    ]


def _write(path: Path, meta: dict, runs: list[dict], checks: list[dict] | None = None) -> Path:
    path.write_text(json.dumps({"meta": meta, "runs": runs, "cross_check": checks or []}))
    return path


def test_heads_run_apart_give_the_table_of_one_run(tmp_path: Path) -> None:
    ours = _write(tmp_path / "a.json", _meta([0, 1]), _runs("sigmoid_bce", {0: 0.80, 1: 0.90}))
    check = {"split": 0, "seed": 0, "method": "softmax_kplus1", "detector": "Energy"}
    theirs = _write(
        tmp_path / "b.json",
        _meta(
            [0, 1],
            machine="another",
            cpu_capability="AVX512",  # other kernels: another network per seed, same recipe
            threads=8,
            date="2026-12-07T00:00:00+00:00",
        ),
        _runs("softmax_kplus1", {0: 0.70, 1: 0.90}),
        [check | {"val_auroc": 0.9, "auroc": 0.8, "fpr95": 0.5, "oscr": 0.7}],
    )
    table = merge([ours, theirs], tmp_path / "out")
    written = tmp_path / "out" / "openset_fashion-mnist_near.json"
    meta, runs = load_results(written)
    assert len(runs) == 4 and meta["seeds"] == [0, 1] and meta["near"] is True
    assert [m["machine"] for m in meta["merged_from"]] == ["one machine", "another"]
    assert [(m["cpu_capability"], m["threads"]) for m in meta["merged_from"]] == [
        ("AVX2", 2),
        ("AVX512", 8),
    ]
    assert not {"machine", "cpu_capability", "threads", "date"} & meta.keys()  # per file
    saved = json.loads(written.read_text())
    paired = saved["paired"][0]
    assert (paired["method"], paired["pairs"]) == ("softmax_kplus1", 2)
    assert paired["novel.auroc"] == pytest.approx(np.mean([0.70 - 0.80, 0.90 - 0.90]))
    assert len(saved["cross_check"]) == 1
    assert "| **sigmoid_bce** (opensig default) | mahalanobis | 0.850 ± 0.050" in table
    assert "| softmax_kplus1 | mahalanobis | 2 | -0.050 [" in table
    assert "Class splits" in table
    assert (tmp_path / "out" / "openset_fashion-mnist_near.md").read_text() == table
    eos = _write(tmp_path / "c.json", _meta([0, 1]), _runs("softmax_eos", {0: 0.6, 1: 0.7}))
    merge([written, eos], tmp_path / "again")  # a merged file merges again, its parts kept
    meta, runs = load_results(tmp_path / "again" / "openset_fashion-mnist_near.json")
    assert len(runs) == 6
    assert [Path(m["file"]).name for m in meta["merged_from"]] == ["a.json", "b.json", "c.json"]


def test_refuses_another_protocol_another_recipe_and_a_run_twice(tmp_path: Path) -> None:
    base = _write(tmp_path / "a.json", _meta([0]), _runs("sigmoid_bce", {0: 0.8}))
    fixed = _write(tmp_path / "f.json", _meta([0], near=False), _runs("softmax_eos", {0: 0.8}))
    with pytest.raises(ValueError, match=r"f\.json: near is False.*merge runs of one protocol"):
        merge([base, fixed], tmp_path)
    recipe = _write(tmp_path / "r.json", _meta([0], epochs=8), _runs("softmax_eos", {0: 0.8}))
    with pytest.raises(ValueError, match=r"r\.json: `epochs` is 8, .* has 16; merge runs of one"):
        merge([base, recipe], tmp_path)
    again = _write(tmp_path / "again.json", _meta([0, 1]), _runs("sigmoid_bce", {0: 0.7, 1: 0.9}))
    with pytest.raises(
        ValueError, match=r"split 0, seed 0, sigmoid_bce \+ mahalanobis is in .*a\.json and .*again"
    ):
        merge([base, again], tmp_path)
    assert not list(tmp_path.glob("openset_*"))  # nothing written by a refused merge
    with pytest.raises(ValueError, match="two or more"):
        merge([base], tmp_path)


def test_command_prints_the_table_or_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = _write(tmp_path / "a.json", _meta([0]), _runs("sigmoid_bce", {0: 0.8}))
    b = _write(tmp_path / "b.json", _meta([1]), _runs("sigmoid_bce", {1: 0.9}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench", "merge", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| **sigmoid_bce** (opensig default) | mahalanobis | 0.850 ± 0.050" in result.output
    missing = CliRunner().invoke(app, ["bench", "merge", str(a), str(tmp_path / "x.json")])
    failures = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert (missing.exit_code, len(failures)) == (2, 1)
    assert failures[0].startswith("bench failed: ") and "x.json: not found" in failures[0]
