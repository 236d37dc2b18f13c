"""The monitor's pictures (reports/monitor/), drawn like the evaluation's (opensig.plots)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from opensig.labels import UNKNOWN_LABEL
from opensig.monitoring.drift import wilson
from opensig.plots import _save_png

WINDOW_COLORS = {"reference": "tab:blue", "current": "tab:orange"}


def _predicted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["error"].fillna("") == ""]


BINS = (  # (the log's time spread up to, bin, its name): a few to a few hundred points
    (pd.Timedelta(hours=6), pd.Timedelta(minutes=10), "10 minutes"),
    (pd.Timedelta(days=3), pd.Timedelta(hours=1), "hour"),
    (pd.Timedelta(days=120), pd.Timedelta(days=1), "day"),
)


def time_bin(spread: pd.Timedelta) -> tuple[pd.Timedelta, str]:
    """(bin width, its name) of the unknown-rate curve for a log of this time spread."""
    week = (pd.Timedelta(days=7), "week")
    return next(((width, n) for up_to, width, n in BINS if spread <= up_to), week)


def write_unknown_rate(
    rows: pd.DataFrame, reference: pd.DataFrame, alpha: float, out_dir: Path
) -> Path:
    """unknown_rate.png: the unknown rate per time bin (a bin that fits the log's spread),
    over the reference's rate and interval, on an axis that spans the log."""
    fine = _predicted(rows)
    times = fine["time"] if len(fine) else rows["time"]
    width, name = time_bin(times.max() - times.min())
    daily = (fine["label"] == UNKNOWN_LABEL).groupby(fine["time"].dt.floor(width)).mean()
    ref = _predicted(reference)
    hits = int((ref["label"] == UNKNOWN_LABEL).sum())
    low, high = wilson(hits, max(len(ref), 1), alpha)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.axhspan(low, high, color=WINDOW_COLORS["reference"], alpha=0.2, label="reference interval")
    ax.axhline(hits / max(len(ref), 1), color=WINDOW_COLORS["reference"], label="reference rate")
    ax.plot(
        daily.index, daily.to_numpy(), marker="o", color="tab:red", label=f"unknown rate per {name}"
    )
    if len(daily):  # one point would otherwise sit on an axis of years
        ax.set_xlim(daily.index.min() - width, daily.index.max() + width)
    ax.set_ylim(0, max(1e-3, float(daily.max()) if len(daily) else 0.0, high) * 1.1)
    ax.set_ylabel("share predicted unknown")
    ax.set_title(f"Unknown rate per {name} ({1 - alpha:.0%} interval of the reference)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    return _save_png(fig, out_dir / "unknown_rate.png")


def write_class_shares(report: dict, out_dir: Path) -> Path:
    """class_shares.png: each class's share of the known predictions, both windows."""
    shares = report["class_shares"]["classes"]
    names = list(shares)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2), 3.5))
    for offset, window in ((-0.2, "reference"), (0.2, "current")):
        values = [shares[c][window] for c in names]
        ax.bar(x + offset, values, width=0.4, color=WINDOW_COLORS[window], label=window)
    ax.set_xticks(x, names, rotation=45 if len(names) > 8 else 0)
    ax.set_ylabel("share of known predictions")
    ax.set_title(f"Class shares (chi-square p = {report['class_shares']['p_value']:.2g})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save_png(fig, out_dir / "class_shares.png")


def write_score_histograms(
    current: pd.DataFrame, reference: pd.DataFrame, report: dict, out_dir: Path, n_bins: int = 20
) -> Path:
    """max_score.png: the distribution of the top score in both windows (densities)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for window, frame in (("reference", reference), ("current", current)):
        scores = _predicted(frame)["score"].to_numpy(float)
        density = np.histogram(scores, edges)[0] / max(len(scores), 1)
        ax.stairs(density, edges, color=WINDOW_COLORS[window], linewidth=1.5, label=window)
    shift = report["score_shift"]
    ax.set_title(
        f"Max score: KS {shift['ks']:.2f} (p = {shift['p_value']:.2g}), PSI {shift['psi']:.2f}"
    )
    ax.set_xlabel("highest class score of an image")
    ax.set_ylabel("share of images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_png(fig, out_dir / "max_score.png")


def write_monitor_pictures(
    rows: pd.DataFrame,
    current: pd.DataFrame,
    reference: pd.DataFrame,
    report: dict,
    alpha: float,
    out_dir: Path,
) -> list[Path]:
    """Every picture the report's figures allow (only the daily rate for too few rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = [write_unknown_rate(rows, reference, alpha, out_dir)]
    if "class_shares" in report:
        pictures.append(write_class_shares(report, out_dir))
        pictures.append(write_score_histograms(current, reference, report, out_dir))
    return pictures
