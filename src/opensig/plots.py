"""Plot files: CSVs for `dvc plots`, PNGs for MLflow and humans.

Drawing only: every number drawn comes from a pure function in :mod:`opensig.metrics`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import LogFormatter
from PIL import Image

from opensig.data.images import decode
from opensig.io import atomic_write
from opensig.labels import UNKNOWN, UNKNOWN_LABEL
from opensig.metrics import (
    MISTAKES,
    SCORE_GROUPS,
    auroc,
    confusion,
    ece,
    operating_point,
    oscr,
    oscr_points,
    reliability,
    roc_points,
    score_histograms,
    unknown_groups,
    worst_mistakes,
)

if TYPE_CHECKING:
    from opensig.evaluation import Evaluation

log = logging.getLogger(__name__)

GROUP_LABELS = {
    "seen_unknown": "unknowns of sources seen in training",
    "novel_unknown": "unknowns of held-out sources (novel)",
}
MISTAKES_SHOWN = 8  # per kind of error in the grid
THUMBNAIL = 96  # pixels, the longer side of a thumbnail in the grid


def _names(indices: np.ndarray, classes: Sequence[str]) -> list[str]:
    return [UNKNOWN_LABEL if i == UNKNOWN else classes[i] for i in indices]


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def _log_y(ax: plt.Axes) -> None:
    """A log y axis whose ticks read as plain numbers (1, 10, 100; 0.02, 0.05), not 10^2:
    easier to read for counts and losses, and drawn without mathtext parsing (about 0.1 s
    of an evaluation's ~1.9 s of pictures). Which ticks get a label is matplotlib's choice."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def _save_png(fig: plt.Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def write_confusion(
    labels: np.ndarray, preds: np.ndarray, classes: Sequence[str], out_dir: Path
) -> list[Path]:
    """confusion.csv (one row per image, for `dvc plots`) and confusion.png: counts, coloured
    by the share of the row, so that a small class reads as well as the many unknowns."""
    csv = write_csv(
        pd.DataFrame({"actual": _names(labels, classes), "predicted": _names(preds, classes)}),
        out_dir / "confusion.csv",
    )
    matrix = confusion(labels, preds, len(classes))
    names = [*classes, UNKNOWN_LABEL]
    size = 1.5 + 0.5 * len(names)
    fig, ax = plt.subplots(figsize=(size, size))
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("Confusion on the test split\n(images; colour: share of the row)", fontsize=10)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            color="white" if share[i, j] > 0.5 else "black",
            fontsize=9,
        )
    return [csv, _save_png(fig, out_dir / "confusion.png")]


def _roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    fpr, tpr, _ = roc_points(scores, labels)
    return fpr, tpr, auroc(scores, labels)


def _oscr(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    return (*oscr_points(scores, labels), oscr(scores, labels))


def _write_curves(
    name: str,
    curve: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, float]],
    y: str,
    y_label: str,
    title: str,
    result: Evaluation,
    out_dir: Path,
) -> list[Path]:
    """``<name>_<group>.csv`` per group of unknowns (header only when the test split has
    none, so DVC always finds its outputs) and ``<name>.png`` with both curves, each with
    the point the tuned thresholds decide at."""
    written, notes = [], []
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for group, keep in unknown_groups(result.labels, result.novel).items():
        labels = result.labels[keep]
        x_values, y_values, area = curve(result.scores[keep], labels)
        written.append(
            write_csv(pd.DataFrame({"fpr": x_values, y: y_values}), out_dir / f"{name}_{group}.csv")
        )
        n_unknown = int((labels == UNKNOWN).sum())
        if x_values.size == 0:
            notes.append(f"no curve for {GROUP_LABELS[group]}: none in the test split")
            log.info("%s: %s", name, notes[-1])
            continue
        (line,) = ax.plot(
            x_values,
            y_values,
            label=f"{GROUP_LABELS[group]} (n={n_unknown}): area {area:.3f}",
        )
        point = operating_point(labels, result.preds[keep])
        ax.plot(point["fpr"], point[y], "o", color=line.get_color(), markersize=7)
    ax.plot([], [], "o", color="grey", label="decisions with the tuned thresholds")
    if name == "roc":
        ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=title)
    ax.set_xlabel("false positive rate: unknown images accepted as a class")
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    for i, note in enumerate(notes):
        fig.text(0.5, -0.02 - 0.04 * i, note, ha="center", fontsize=9, style="italic")
    return [*written, _save_png(fig, out_dir / f"{name}.png")]


def write_roc(result: Evaluation, out_dir: Path) -> list[Path]:
    """roc_seen_unknown.csv, roc_novel_unknown.csv and roc.png: known vs unknown by max score."""
    return _write_curves(
        "roc",
        _roc,
        "tpr",
        "true positive rate: known images accepted as a class",
        "ROC: known vs unknown images by max score (test split)",
        result,
        out_dir,
    )


def write_oscr(result: Evaluation, out_dir: Path) -> list[Path]:
    """oscr_seen_unknown.csv, oscr_novel_unknown.csv and oscr.png (Dhamija et al. 2018)."""
    return _write_curves(
        "oscr",
        _oscr,
        "ccr",
        "correct classification rate: known images given their class",
        "OSCR: known images classified right vs unknowns accepted (test split)",
        result,
        out_dir,
    )


def write_score_histograms(result: Evaluation, out_dir: Path, n_bins: int = 20) -> list[Path]:
    """score_histograms.png: per class k, the class-k scores of the images of class k, of the
    other classes and of the unknown images, with class k's tuned threshold."""
    counts = score_histograms(result.scores, result.labels, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    n_classes = len(result.classes)
    cols = min(n_classes, max(3, math.ceil(math.sqrt(n_classes))))
    rows = math.ceil(n_classes / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols, 2.6 * rows + 0.8), sharex=True, squeeze=False
    )
    colors = {"true class": "tab:green", "other known": "tab:blue", "unknown": "tab:red"}
    names = {
        "true class": "images of this class",
        "other known": "images of the other classes",
        "unknown": "unknown images",
    }
    for k, ax in enumerate(axes.flat):
        if k >= n_classes:
            ax.axis("off")
            continue
        for g, group in enumerate(SCORE_GROUPS):
            ax.stairs(counts[k, g], edges, color=colors[group], linewidth=1.5, label=names[group])
        threshold = float(result.thresholds[k])
        ax.axvline(threshold, color="black", linestyle="--", label="tuned threshold")
        _log_y(ax)
        ax.set_ylim(bottom=0.7)
        ax.set_title(f"class {result.classes[k]} (threshold {threshold:.2f})", fontsize=10)
        ax.grid(alpha=0.3)
        if k % cols == 0:
            ax.set_ylabel("images (log scale)")
        if k >= n_classes - cols:
            ax.set_xlabel("score of this class")
            ax.tick_params(labelbottom=True)
    fig.suptitle("Per-class scores on the test split")
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    return [_save_png(fig, out_dir / "score_histograms.png")]


def write_reliability(result: Evaluation, out_dir: Path, n_bins: int = 15) -> list[Path]:
    """reliability.csv (the non-empty bins, for `dvc plots`) and reliability.png."""
    table = pd.DataFrame(reliability(result.scores, result.labels, n_bins))
    csv = write_csv(table[table["count"] > 0], out_dir / "reliability.csv")
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    width = 1.0 / n_bins
    top.bar(
        table["lower"],
        table["fraction_true"],
        width=width,
        align="edge",
        color="tab:blue",
        alpha=0.35,
        edgecolor="tab:blue",
        label="fraction true per bin",
    )
    top.plot(
        table["mean_score"],
        table["fraction_true"],
        "o-",
        color="tab:blue",
        label="a bin's mean score vs its fraction true",
    )
    top.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    top.set(xlim=(0, 1), ylim=(0, 1))
    top.set_ylabel("fraction true")
    top.set_title(
        "Reliability of the sigmoid outputs (test split)\n"
        f"ECE {ece(result.scores, result.labels, n_bins):.3f} (mean over classes, "
        "as in metrics.json)",
        fontsize=10,
    )
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(table["lower"], table["count"], width=width, align="edge", color="grey")
    _log_y(bottom)
    bottom.set_ylabel("(image, class)\npairs")
    bottom.set_xlabel("score (mean score of the bin for the dots)")
    bottom.grid(alpha=0.3)
    return [csv, _save_png(fig, out_dir / "reliability.png")]


def _thumbnail(path: str) -> np.ndarray:
    """The image as a viewer shows it (opensig's decoder), shrunk to fit the grid cell."""
    image = Image.fromarray(decode(path, 3, min_size=THUMBNAIL))
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(image)


def _caption(result: Evaluation, kind: str, i: int) -> str:
    """Three short lines (names can be long): the truth, the decision, the scores behind it."""
    classes, scores, thresholds = result.classes, result.scores[i], result.thresholds
    label, pred = int(result.labels[i]), int(result.preds[i])
    if label == UNKNOWN:
        source = result.rows["source"].iloc[i]
        truth = f"{UNKNOWN_LABEL}/{source}" + (", novel" if result.novel[i] else "")
    else:
        truth = classes[label]
    decided = UNKNOWN_LABEL if pred == UNKNOWN else classes[pred]
    k = label if kind == MISTAKES[0] else pred
    margin = f"s {scores[k]:.2f} {'<' if kind == MISTAKES[0] else '≥'} t {thresholds[k]:.2f}"
    if kind == MISTAKES[2]:
        detail = f"{margin}, true s {scores[label]:.2f}"
    else:
        detail = f"{margin} ({scores[k] - thresholds[k]:+.2f})"
    return f"{truth}\n→ {decided}\n{detail}"


def write_mistakes(result: Evaluation, out_dir: Path) -> list[Path]:
    """worst_mistakes.png: one row per kind of error with its worst images, each captioned
    with its true label, the decision and the class score (s) and threshold (t) behind it."""
    worst = worst_mistakes(result.scores, result.labels, result.preds)
    heights = [2.6 if worst[kind].size else 0.5 for kind in MISTAKES]
    fig = plt.figure(figsize=(1.6 * MISTAKES_SHOWN, sum(heights)))
    rows = fig.subfigures(len(MISTAKES), 1, height_ratios=heights)
    for row, kind in zip(rows, MISTAKES, strict=True):
        found = worst[kind]
        shown = found[:MISTAKES_SHOWN]
        title = f"{kind}: {len(found)} test image(s)"
        row.suptitle(
            title + (f", the worst {len(shown)} shown" if len(found) else ""),
            fontsize=11,
            x=0.01,
            ha="left",
        )
        if not len(found):
            continue
        axes = row.subplots(1, MISTAKES_SHOWN)
        row.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.7, wspace=0.2)
        for c, ax in enumerate(axes):
            ax.axis("off")
            if c < len(shown):
                ax.imshow(_thumbnail(result.rows["path"].iloc[shown[c]]), interpolation="nearest")
                ax.set_title(_caption(result, kind, int(shown[c])), fontsize=8)
    fig.suptitle(
        "Worst mistakes on the test split\n"
        "s: the score behind the decision (of the true class for a known image called "
        "unknown, else of the class given); t: that class's tuned threshold; (s - t)",
        y=1.0 + 0.5 / fig.get_figheight(),
        fontsize=11,
    )
    return [_save_png(fig, out_dir / "worst_mistakes.png")]


# Pictures that need one true class per image, and the CSVs behind them (with their columns):
# for multi-label data they hold a note instead, so every file dvc.yaml declares exists.
SINGLE_LABEL_ONLY = {
    "confusion.csv": ["actual", "predicted"],
    "oscr_seen_unknown.csv": ["fpr", "ccr"],
    "oscr_novel_unknown.csv": ["fpr", "ccr"],
    "confusion.png": None,
    "oscr.png": None,
    "worst_mistakes.png": None,
}


def _note(path: Path, text: str) -> Path:
    fig = plt.figure(figsize=(5, 1.2))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, wrap=True)
    return _save_png(fig, path)


def _write_multi_label(result: Evaluation, out_dir: Path) -> list[Path]:
    """Known vs unknown ROC (an image is accepted when any class passes), the per-class
    histograms and calibration; notes where a picture needs one class per image."""
    known, accepted = result.labels.any(axis=1), result.preds.any(axis=1)
    as_known = replace(
        result,
        labels=np.where(known, 0, UNKNOWN),
        preds=np.where(accepted, 0, UNKNOWN),
        multi_label=False,
    )
    written = [
        *write_roc(as_known, out_dir),
        *write_score_histograms(result, out_dir),
        *write_reliability(result, out_dir),
    ]
    text = (
        "Needs one class per image: not drawn for multi-label data.\nSee per_class in metrics.json."
    )
    for name, columns in SINGLE_LABEL_ONLY.items():
        path = out_dir / name
        written.append(
            write_csv(pd.DataFrame(columns=columns), path) if columns else _note(path, text)
        )
    return written


def write_pictures(result: Evaluation, out_dir: Path) -> list[Path]:
    """Every evaluation picture, and the CSVs behind those `dvc plots` draws."""
    if result.multi_label:
        return _write_multi_label(result, out_dir)
    return [
        *write_confusion(result.labels, result.preds, result.classes, out_dir),
        *write_roc(result, out_dir),
        *write_oscr(result, out_dir),
        *write_score_histograms(result, out_dir),
        *write_reliability(result, out_dir),
        *write_mistakes(result, out_dir),
    ]


def write_history(history: list[dict], out_dir: Path) -> list[Path]:
    """train_history.csv (per-epoch losses, for `dvc plots`) and loss.png."""
    frame = pd.DataFrame(history)
    csv = write_csv(frame, out_dir / "train_history.csv")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(frame["epoch"], frame["train_loss"], "o-", label="train")
    ax.plot(frame["epoch"], frame["val_loss"], "o-", label="validation")
    _log_y(ax)  # the late epochs, where the best one is chosen, stay readable
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (log scale)")
    ax.set_title("Training and validation loss", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return [csv, _save_png(fig, out_dir / "loss.png")]


# Tables for MLflow: the data of a picture, in rows that line up across runs, so that
# MLflow's artifact view (and mlflow.load_table) compares runs row by row.
FPR_GRID = np.round(np.linspace(0.0, 1.0, 101), 2)  # where curves are read: 0, 0.01, ..., 1


def on_fpr_grid(curve: pd.DataFrame) -> pd.DataFrame:
    """A curve (``fpr`` and one y column) read at each FPR of :data:`FPR_GRID`: the best y
    among its points with an FPR no higher, i.e. what some threshold reaches without
    accepting more unknowns. Runs' curves have points at different FPRs; these rows match."""
    y = next(column for column in curve.columns if column != "fpr")
    order = np.argsort(curve["fpr"].to_numpy(), kind="stable")
    fpr = curve["fpr"].to_numpy()[order]
    best = np.maximum.accumulate(curve[y].to_numpy()[order])
    index = np.searchsorted(fpr, FPR_GRID + 1e-9, side="right") - 1  # 1e-9: float noise
    values = np.where(index >= 0, best[np.maximum(index, 0)], np.nan)
    return pd.DataFrame({"fpr": FPR_GRID, y: values})


def confusion_counts(confusion: pd.DataFrame) -> pd.DataFrame:
    """One row per (actual, predicted) pair, zeros included, with its count and its share
    of the actual class (the colour of confusion.png); confusion.csv has a row per image."""
    labels = sorted(set(confusion["actual"]) | set(confusion["predicted"]))
    matrix = pd.crosstab(confusion["actual"], confusion["predicted"])
    matrix = matrix.reindex(index=labels, columns=labels, fill_value=0)
    counts = matrix.stack().rename("count").reset_index()
    totals = counts.groupby("actual")["count"].transform("sum")
    return counts.assign(share_of_row=counts["count"] / totals.where(totals > 0))


_PICTURE_DATA = {  # picture -> (the CSVs next to it holding its data, their table)
    "roc": ("roc_*.csv", on_fpr_grid),
    "oscr": ("oscr_*.csv", on_fpr_grid),
    "confusion": ("confusion.csv", confusion_counts),
    "reliability": ("reliability.csv", lambda bins: bins),  # fixed bins: rows already match
}


def picture_tables(picture: Path) -> dict[str, pd.DataFrame]:
    """The data drawn in ``picture`` as tables whose rows line up across runs, named after
    the CSVs they come from; none for pictures without such data or curves without points."""
    if picture.stem not in _PICTURE_DATA:
        return {}
    pattern, table = _PICTURE_DATA[picture.stem]
    tables = {}
    for path in sorted(picture.parent.glob(pattern)):
        frame = pd.read_csv(path, dtype={"actual": str, "predicted": str})
        if not frame.empty:
            tables[path.stem] = table(frame)
    return tables
