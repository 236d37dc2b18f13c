"""Open-set metrics: closed-set quality on known images plus how well unknowns are rejected.

``labels`` are int ``(N,)`` with :data:`~opensig.thresholds.UNKNOWN` for unknown images and
``scores`` are per-class sigmoid scores ``(N, K)``. Threshold-free metrics (AUROC, FPR@95, OSCR)
rank images by their max class score; the others use the decisions of
:func:`~opensig.thresholds.decide`.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from opensig.thresholds import UNKNOWN, decide, macro_f1

__all__ = [
    "auroc",
    "confusion",
    "ece",
    "fpr_at_tpr",
    "known_accuracy",
    "known_ccr",
    "macro_f1",
    "open_set_metrics",
    "oscr",
    "roc_points",
    "unknown_recall",
]


def _mean_or_nan(values: np.ndarray) -> float:
    """Mean that is nan (not a warning) on an empty selection, e.g. a split with no unknowns."""
    return float(values.mean()) if values.size else math.nan


def _known_vs_unknown(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is_known, max class score): the binary problem behind the threshold-free metrics."""
    return np.asarray(labels) != UNKNOWN, np.asarray(scores, dtype=np.float64).max(axis=1)


def known_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 argmax accuracy on known images, ignoring thresholds (the closed-set ceiling)."""
    labels = np.asarray(labels)
    known = labels != UNKNOWN
    return _mean_or_nan(np.argmax(np.asarray(scores)[known], axis=1) == labels[known])


def known_ccr(preds: np.ndarray, labels: np.ndarray) -> float:
    """Correct classification rate: known images whose decided label is their true class."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    known = labels != UNKNOWN
    return _mean_or_nan(preds[known] == labels[known])


def unknown_recall(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of unknown images decided UNKNOWN (nan when there are none)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return _mean_or_nan(preds[labels == UNKNOWN] == UNKNOWN)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of known (positive) vs unknown by max class score; nan if either side is empty."""
    is_known, max_score = _known_vs_unknown(scores, labels)
    if is_known.all() or not is_known.any():
        return math.nan
    return float(roc_auc_score(is_known, max_score))


def fpr_at_tpr(scores: np.ndarray, labels: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of unknowns accepted at the max-score threshold that accepts ``tpr`` of knowns."""
    is_known, max_score = _known_vs_unknown(scores, labels)
    if is_known.all() or not is_known.any():
        return math.nan
    fpr, tpr_curve, _ = roc_curve(is_known, max_score, drop_intermediate=False)
    return float(fpr[np.argmax(tpr_curve >= tpr)])


def oscr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the open-set classification rate curve (Dhamija et al., 2018).

    For a threshold ``t`` on the max score, CCR(t) is the fraction of knowns that are argmax-correct
    with max score >= t and FPR(t) the fraction of unknowns with max score >= t. Equal scores are
    one step, the curve runs from (0, 0) to (1, closed-set accuracy), and the area is a trapezoid
    sum. Unlike AUROC it rewards rejecting unknowns only when knowns are also classified right.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    is_known, max_score = _known_vs_unknown(scores, labels)
    n_known, n_unknown = int(is_known.sum()), int((~is_known).sum())
    if n_known == 0 or n_unknown == 0:
        return math.nan
    correct = is_known & (np.argmax(scores, axis=1) == labels)
    order = np.argsort(-max_score, kind="stable")
    sorted_score = max_score[order]
    last = np.append(np.flatnonzero(np.diff(sorted_score) != 0), sorted_score.size - 1)
    ccr = np.concatenate([[0.0], np.cumsum(correct[order])[last] / n_known])
    fpr = np.concatenate([[0.0], np.cumsum(~is_known[order])[last] / n_unknown])
    # Trapezoids by hand: np.trapezoid needs numpy 2 and the project supports numpy >= 1.24.
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2.0))


def ece(scores: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Mean over classes of the binary expected calibration error of each sigmoid output.

    A sigmoid head makes K independent probability claims, so each output k is checked against
    ``labels == k`` (unknown images are negatives for every class) with equal-width bins on [0, 1]:
    ``ECE_k = sum_b |B_b| / N * |mean(y in b) - mean(p in b)|``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    n_images, num_classes = scores.shape
    if n_images == 0:
        return math.nan
    bins = np.clip((np.clip(scores, 0.0, 1.0) * n_bins).astype(np.int64), 0, n_bins - 1)
    per_class = []
    for k in range(num_classes):
        target = (labels == k).astype(np.float64)
        # |B| * |mean y - mean p| = |sum y - sum p|, so empty bins contribute zero by themselves.
        gap = np.abs(
            np.bincount(bins[:, k], weights=target, minlength=n_bins)
            - np.bincount(bins[:, k], weights=scores[:, k], minlength=n_bins)
        )
        per_class.append(gap.sum() / n_images)
    return float(np.mean(per_class))


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(K+1)x(K+1) counts, rows true and columns decided, with UNKNOWN as the last row/column."""
    size = num_classes + 1
    y = np.where(np.asarray(labels) == UNKNOWN, num_classes, labels).astype(np.int64)
    p = np.where(np.asarray(preds) == UNKNOWN, num_classes, preds).astype(np.int64)
    if y.size and (min(y.min(), p.min()) < 0 or max(y.max(), p.max()) >= size):
        raise ValueError(f"labels/preds must be in [{UNKNOWN}, {num_classes - 1}]")
    return np.bincount(y * size + p, minlength=size * size).reshape(size, size)


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of known vs unknown by max score, for plotting.

    Empty arrays when either side is missing, since no curve exists then.
    """
    is_known, max_score = _known_vs_unknown(scores, labels)
    if is_known.all() or not is_known.any():
        empty = np.empty(0)
        return empty, empty.copy(), empty.copy()
    fpr, tpr, thresholds = roc_curve(is_known, max_score)
    return fpr, tpr, thresholds


def _json_float(value: float) -> float | None:
    """Python float for JSON, with nan (undefined metric) as None."""
    value = float(value)
    return None if math.isnan(value) else value


def open_set_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray,
    novel_mask: np.ndarray | None = None,
) -> dict:
    """All headline metrics as a JSON-safe dict (floats, None for undefined, int counts).

    ``novel_mask`` marks held-out "novel" unknown images (never seen as unknowns in training);
    when any are marked, ``novel`` repeats the rejection metrics on known + novel images only,
    which is the honest test of generalising to unseen kinds of unknown.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    preds = decide(scores, thresholds)
    known = labels != UNKNOWN
    result: dict = {
        "known_accuracy": _json_float(known_accuracy(scores, labels)),
        "known_ccr": _json_float(known_ccr(preds, labels)),
        "unknown_recall": _json_float(unknown_recall(preds, labels)),
        "macro_f1": _json_float(macro_f1(labels, preds)),
        "auroc": _json_float(auroc(scores, labels)),
        "fpr95": _json_float(fpr_at_tpr(scores, labels)),
        "oscr": _json_float(oscr(scores, labels)),
        "ece": _json_float(ece(scores, labels)),
        "n_known": int(known.sum()),
        "n_unknown": int((~known).sum()),
    }
    if novel_mask is not None:
        novel_mask = np.asarray(novel_mask, dtype=bool)
        if novel_mask.shape != labels.shape:
            raise ValueError(f"novel_mask must have shape {labels.shape}, got {novel_mask.shape}")
        if (novel_mask & known).any():
            raise ValueError("novel_mask marks known images; it must mark unknown images only")
        if novel_mask.any():
            keep = known | novel_mask
            s, y, p = scores[keep], labels[keep], preds[keep]
            result["novel"] = {
                "auroc": _json_float(auroc(s, y)),
                "fpr95": _json_float(fpr_at_tpr(s, y)),
                "oscr": _json_float(oscr(s, y)),
                "unknown_recall": _json_float(unknown_recall(p, y)),
                "n_novel": int(novel_mask.sum()),
            }
    return result
