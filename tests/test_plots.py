"""The evaluation pictures from a synthetic evaluation: every file, real PNGs, the CSVs that
`dvc plots` draws equal to the curves scikit-learn computes, and the empty cases."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_curve

from opensig.evaluation import Evaluation
from opensig.labels import UNKNOWN
from opensig.metrics import open_set_metrics, oscr_points, reliability
from opensig.plots import FPR_GRID, on_fpr_grid, picture_tables, write_pictures
from opensig.thresholds import decide

CLASSES = ["cat", "dog", "bird"]
PICTURES = {
    "confusion.png": (400, 400),
    "roc.png": (500, 500),
    "oscr.png": (500, 500),
    "score_histograms.png": (900, 300),  # one row of three classes
    "reliability.png": (500, 600),
    "worst_mistakes.png": (1200, 600),
}
CSVS = {
    "confusion.csv": ["actual", "predicted"],
    "roc_seen_unknown.csv": ["fpr", "tpr"],
    "roc_novel_unknown.csv": ["fpr", "tpr"],
    "oscr_seen_unknown.csv": ["fpr", "ccr"],
    "oscr_novel_unknown.csv": ["fpr", "ccr"],
    "reliability.csv": ["lower", "upper", "count", "mean_score", "fraction_true"],
}


def synthetic(folder: Path, with_novel: bool = True, n: int = 90) -> Evaluation:
    """A plausible evaluation of ``n`` small real images: known ones score high on their
    class, unknown ones lower; a third of the unknowns come from a held-out source."""
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, len(CLASSES), size=n)
    unknown = labels == UNKNOWN
    novel = unknown & (np.arange(n) % 3 == 0) & with_novel
    scores = rng.random((n, len(CLASSES))) * 0.6
    scores[~unknown, labels[~unknown]] += 0.4 * rng.random((~unknown).sum())
    thresholds = np.full(len(CLASSES), 0.5)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:03d}.png"
        Image.new("RGB", (40, 30), tuple(int(c) for c in rng.integers(0, 255, 3))).save(path)
        paths.append(str(path))
    rows = pd.DataFrame(
        {
            "path": paths,
            "label": [UNKNOWN if y == UNKNOWN else CLASSES[y] for y in labels],
            "source": np.where(novel, "held_out", np.where(unknown, "street", "")),
            "novel": novel,
        }
    )
    metrics = open_set_metrics(scores, labels, thresholds, novel_mask=novel)
    preds = decide(scores, thresholds)
    return Evaluation(metrics, scores, labels, preds, novel, rows, CLASSES, thresholds)


def test_every_picture_and_csv_is_written_and_readable(tmp_path: Path) -> None:
    result = synthetic(tmp_path)
    written = write_pictures(result, tmp_path / "plots")
    assert sorted(p.name for p in written) == sorted([*PICTURES, *CSVS])
    for name, (min_width, min_height) in PICTURES.items():
        with Image.open(tmp_path / "plots" / name) as image:
            image.verify()  # a whole, valid PNG
        with Image.open(tmp_path / "plots" / name) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert min_width <= width <= 4000 and min_height <= height <= 4000, (name, image.size)
            colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
            assert colours is None or len(colours) > 2, f"{name} is blank"
    for name, columns in CSVS.items():
        frame = pd.read_csv(tmp_path / "plots" / name)
        assert list(frame.columns) == columns, name
        assert len(frame) > 0, name


def test_curve_csvs_are_the_curves_of_each_group_of_unknowns(tmp_path: Path) -> None:
    result = synthetic(tmp_path)
    write_pictures(result, tmp_path)
    known = result.labels != UNKNOWN
    groups = {"seen_unknown": ~result.novel, "novel_unknown": known | result.novel}
    for group, keep in groups.items():
        roc = pd.read_csv(tmp_path / f"roc_{group}.csv")
        fpr, tpr, _ = roc_curve(known[keep], result.scores[keep].max(axis=1))
        np.testing.assert_allclose(roc["fpr"], fpr)
        np.testing.assert_allclose(roc["tpr"], tpr)
        oscr = pd.read_csv(tmp_path / f"oscr_{group}.csv")
        fpr, ccr = oscr_points(result.scores[keep], result.labels[keep])
        np.testing.assert_allclose(oscr["fpr"], fpr)
        np.testing.assert_allclose(oscr["ccr"], ccr)
    table = pd.DataFrame(reliability(result.scores, result.labels))
    written = pd.read_csv(tmp_path / "reliability.csv")
    np.testing.assert_allclose(written, table[table["count"] > 0])


def test_no_novel_unknowns_leaves_an_empty_curve_file_and_a_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opensig")
    write_pictures(synthetic(tmp_path, with_novel=False), tmp_path)
    for name in ("roc_novel_unknown.csv", "oscr_novel_unknown.csv"):
        frame = pd.read_csv(tmp_path / name)
        assert frame.empty and len(frame.columns) == 2  # header only: DVC still finds it
    assert "no curve for unknowns of held-out sources" in caplog.text
    assert len(pd.read_csv(tmp_path / "roc_seen_unknown.csv")) > 2


def test_mistakes_grid_with_no_mistakes_of_some_kind(tmp_path: Path) -> None:
    result = synthetic(tmp_path)
    known = result.labels != UNKNOWN
    result.preds = np.where(known, result.labels, result.preds)  # knowns all right
    write_pictures(result, tmp_path)
    with Image.open(tmp_path / "worst_mistakes.png") as image:
        assert image.size[1] < 600  # one row of pictures: the empty kinds take a line each


def test_curve_on_the_fpr_grid_takes_the_best_point_at_or_below_each_fpr() -> None:
    curve = pd.DataFrame(
        {"fpr": [0.0, 0.0, 0.1, 0.1, 0.5, 1.0], "tpr": [0.0, 0.4, 0.4, 0.8, 0.9, 1.0]}
    )
    table = on_fpr_grid(curve)
    assert table["fpr"].tolist() == FPR_GRID.tolist() and len(table) == 101
    at = dict(zip(table["fpr"], table["tpr"], strict=True))
    assert (at[0.0], at[0.09], at[0.1], at[0.49], at[0.5], at[0.99], at[1.0]) == (
        0.4,
        0.4,
        0.8,
        0.8,
        0.9,
        0.9,
        1.0,
    )


def test_picture_tables_line_up_across_runs(tmp_path: Path) -> None:
    result = synthetic(tmp_path)
    write_pictures(result, tmp_path / "plots")
    plots = tmp_path / "plots"
    roc = picture_tables(plots / "roc.png")
    assert set(roc) == {"roc_seen_unknown", "roc_novel_unknown"}
    assert all(table["fpr"].tolist() == FPR_GRID.tolist() for table in roc.values())
    assert set(picture_tables(plots / "oscr.png")) == {"oscr_seen_unknown", "oscr_novel_unknown"}
    [confusion] = picture_tables(plots / "confusion.png").values()
    labels = [*CLASSES, "unknown"]
    assert len(confusion) == len(labels) ** 2  # every cell, zeros included
    assert confusion["count"].sum() == len(result.labels)
    cat = confusion[confusion["actual"] == "cat"]
    assert cat["share_of_row"].sum() == pytest.approx(1.0)
    assert set(picture_tables(plots / "reliability.png")) == {"reliability"}
    assert picture_tables(plots / "score_histograms.png") == {}
    write_pictures(synthetic(tmp_path, with_novel=False), tmp_path / "no_novel")
    assert set(picture_tables(tmp_path / "no_novel" / "roc.png")) == {"roc_seen_unknown"}
