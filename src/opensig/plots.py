"""Plot files: CSVs for `dvc plots`, PNGs for MLflow and humans."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from opensig.data.scan import UNKNOWN_LABEL
from opensig.io import atomic_write
from opensig.metrics import confusion, roc_points
from opensig.thresholds import UNKNOWN


def _names(indices: np.ndarray, classes: Sequence[str]) -> list[str]:
    return [UNKNOWN_LABEL if i == UNKNOWN else classes[i] for i in indices]


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def _save_png(fig: plt.Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def write_confusion(
    labels: np.ndarray, preds: np.ndarray, classes: Sequence[str], out_dir: Path
) -> list[Path]:
    """confusion.csv (one row per image, for `dvc plots`) and confusion.png (counts)."""
    csv = write_csv(
        pd.DataFrame({"actual": _names(labels, classes), "predicted": _names(preds, classes)}),
        out_dir / "confusion.csv",
    )
    matrix = confusion(labels, preds, len(classes))
    names = [*classes, UNKNOWN_LABEL]
    size = 1.5 + 0.5 * len(names)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            color="white" if count > matrix.max() / 2 else "black",
            fontsize=8,
        )
    return [csv, _save_png(fig, out_dir / "confusion.png")]


def write_roc(
    scores: np.ndarray,
    labels: np.ndarray,
    novel: np.ndarray,
    out_dir: Path,
) -> list[Path]:
    """roc.csv (known vs all unknowns, and vs novel unknowns) and roc.png."""
    curves = {"all_unknown": np.ones(len(labels), dtype=bool)}
    if novel.any():
        curves["novel_unknown"] = (labels != UNKNOWN) | novel
    frames, fig = [], plt.figure(figsize=(4.5, 4.5))
    for name, keep in curves.items():
        fpr, tpr, _ = roc_points(scores[keep], labels[keep])
        frames.append(pd.DataFrame({"fpr": fpr, "tpr": tpr, "unknowns": name}))
        plt.plot(fpr, tpr, label=name)
    plt.plot([0, 1], [0, 1], ":", color="grey")
    plt.xlabel("false positive rate (unknown accepted)")
    plt.ylabel("true positive rate (known accepted)")
    plt.legend(loc="lower right")
    csv = write_csv(pd.concat(frames, ignore_index=True), out_dir / "roc.csv")
    return [csv, _save_png(fig, out_dir / "roc.png")]


def write_history(history: list[dict], out_dir: Path) -> list[Path]:
    """train_history.csv (per-epoch losses, for `dvc plots`) and loss.png."""
    frame = pd.DataFrame(history)
    csv = write_csv(frame, out_dir / "train_history.csv")
    fig = plt.figure(figsize=(5, 3.5))
    plt.plot(frame["epoch"], frame["train_loss"], label="train")
    plt.plot(frame["epoch"], frame["val_loss"], label="val")
    plt.xlabel("epoch")
    plt.ylabel("loss")
    plt.legend()
    return [csv, _save_png(fig, out_dir / "loss.png")]
