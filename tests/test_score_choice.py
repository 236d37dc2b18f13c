"""Choosing the feature score on a held-out unknown source: the candidates' AUROCs against
hand computations, the ranking, the refusals, and the tool end to end on the digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from opensig.labels import UNKNOWN, UNKNOWN_LABEL
from opensig.score_choice import (
    CANDIDATES,
    HeldOut,
    candidate_auroc,
    held_out_sources,
    rank_candidates,
    without_source,
)


def _held_out(source: str = "far", seed: int = 0) -> HeldOut:
    """Three Gaussian classes in 6-D; the held-out source lies between two of them."""
    rng = np.random.default_rng(seed)
    centres = np.eye(3, 6) * 6.0

    def known(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 3, n)
        return centres[labels] + rng.normal(size=(n, 6)), labels

    def head(labels: np.ndarray) -> np.ndarray:
        scores = rng.uniform(0.0, 0.2, (len(labels), 3))
        scores[np.arange(len(labels)), labels] = rng.uniform(0.7, 1.0, len(labels))
        return scores

    train_features, train_labels = known(300)
    val_known, val_labels = known(90)
    val_unknown = rng.normal(size=(30, 6)) + np.r_[0, 0, 0, 0, 0, 8.0]  # the trained kind
    novel = (centres[0] + centres[1]) / 2 + rng.normal(size=(40, 6))
    return HeldOut(
        source=source,
        train_features=train_features,
        train_labels=train_labels,
        unknown_features=rng.normal(size=(100, 6)) + np.r_[0, 0, 0, 0, 0, 8.0],
        val_head=np.vstack([head(val_labels), rng.uniform(0, 0.3, (30, 3))]),
        val_features=np.vstack([val_known, val_unknown]),
        val_labels=np.r_[val_labels, np.full(30, UNKNOWN)],
        novel_head=head(rng.integers(0, 2, 40)),  # the head is as sure as of known images
        novel_features=novel,
    )


def test_the_feature_score_alone_ranks_as_the_mahalanobis_distance_computed_by_hand() -> None:
    held = _held_out()
    means = np.stack([held.train_features[held.train_labels == k].mean(0) for k in range(3)])
    residuals = held.train_features - means[held.train_labels]
    precision = np.linalg.inv(residuals.T @ residuals / len(residuals))
    known = held.val_labels != UNKNOWN
    points = np.vstack([held.val_features[known], held.novel_features])
    gaps = points[:, None, :] - means[None]
    distance = np.einsum("nkd,de,nke->nk", gaps, precision, gaps).min(axis=1)
    is_known = np.r_[np.ones(known.sum()), np.zeros(len(held.novel_features))]
    # weight 1: the level is the feature score's CDF squared, increasing in -distance
    expected = roc_auc_score(is_known, -distance)
    assert candidate_auroc(held, "mahalanobis", 1.0, 3) == pytest.approx(expected, abs=1e-9)
    head_top = np.vstack([held.val_head[known], held.novel_head]).max(axis=1)
    assert candidate_auroc(held, "none", 0.0, 3) == pytest.approx(roc_auc_score(is_known, head_top))


def test_candidates_are_ranked_by_their_mean_over_sources_best_first() -> None:
    held_outs = [_held_out("a", 0), _held_out("b", 1)]
    table = rank_candidates(held_outs, 3)
    assert len(table) == len(CANDIDATES)
    assert list(table.columns[2:]) == ["auroc[a]", "auroc[b]", "mean_auroc"]
    mean = table[["auroc[a]", "auroc[b]"]].mean(axis=1)
    np.testing.assert_allclose(table["mean_auroc"], mean)
    assert table["mean_auroc"].is_monotonic_decreasing
    # the head is confidently wrong about the held-out images, the features are not
    head = table.loc[table["feature_score"] == "none", "mean_auroc"].item()
    assert head < 0.7 < table.loc[0, "mean_auroc"]
    assert table.loc[0, "feature_score"] != "none"
    with pytest.raises(ValueError, match="no held-out source"):
        rank_candidates([], 3)


def _manifest(sources_by_split: dict[str, list[str]]) -> pd.DataFrame:
    rows = [{"path": "k.png", "label": "cat", "source": "cat", "split": "train"}]
    for split, sources in sources_by_split.items():
        rows += [
            {"path": f"{split}-{s}.png", "label": UNKNOWN_LABEL, "source": s, "split": split}
            for s in sources
        ]
    return pd.DataFrame(rows)


def test_sources_need_two_in_training_and_images_in_val() -> None:
    with pytest.raises(ValueError, match=r"at least two.*data/unknown/<source>"):
        held_out_sources(_manifest({"train": ["web"], "val": ["web"]}))
    with pytest.raises(ValueError, match=r"raise data\.val_fraction"):
        held_out_sources(_manifest({"train": ["web", "street"]}))
    manifest = _manifest({"train": ["web", "street", "lab"], "val": ["web", "lab"]})
    assert held_out_sources(manifest) == ["lab", "web"]  # street: nothing to score, warned
    kept = without_source(manifest, "web")
    assert "web" not in set(kept["source"]) and len(kept) == len(manifest) - 2


def test_choose_score_trains_without_each_source_and_reports_the_ranking(
    project: Path,
) -> None:
    from typer.testing import CliRunner

    from opensig.cli import app
    from opensig.data.manifest import read_manifest

    runner = CliRunner()
    assert runner.invoke(app, ["ingest"]).exit_code == 0
    result = runner.invoke(app, ["choose-score"])
    assert result.exit_code == 0, result.output
    report = json.loads((project / "reports/choose_score.json").read_text())
    assert report["sources"] == ["6", "7"]  # the digits' unknown sources in training
    for source in report["sources"]:
        trained = read_manifest(
            project / f"artifacts/choose-score/{source}/artifacts/manifest.parquet", "data"
        )
        assert source not in set(trained.loc[trained["label"] == UNKNOWN_LABEL, "source"])
        assert (
            project / f"artifacts/choose-score/{source}/artifacts/model/weights.safetensors"
        ).exists()
    means = [row["mean_auroc"] for row in report["candidates"]]
    assert means == sorted(means, reverse=True) and report["best"] == report["candidates"][0]
    assert all(0.0 <= row[f"auroc[{s}]"] <= 1.0 for row in report["candidates"] for s in "67")
    assert report["current"]["feature_score"] == "mahalanobis"  # params.yaml's
    assert report["current"]["feature_weight"] == 0.5


def test_choose_score_with_one_unknown_source_stops_with_one_line(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from typer.testing import CliRunner

    from opensig.cli import app
    from tests.conftest import write_params

    write_params(project, {"data": {"holdout_unknown": ["7", "8", "9"]}})
    runner = CliRunner()
    assert runner.invoke(app, ["ingest"]).exit_code == 0
    result = runner.invoke(app, ["choose-score"])
    assert result.exit_code == 2  # every command's exit code for a refused input
    assert "needs at least two in the train split, found ['6']" in caplog.text
    assert not (project / "artifacts/choose-score").exists()  # nothing trained
