"""Open-set metrics: closed-set quality on known images plus how well unknowns are rejected.

``labels`` are int ``(N,)`` with :data:`~opensig.labels.UNKNOWN` for unknown images and
``scores`` are per-class sigmoid scores ``(N, K)``. Threshold-free metrics (AUROC, FPR@95, OSCR)
rank images by their max class score; the others use the decisions of
:func:`~opensig.thresholds.decide`. scikit-learn computes the ROC figures and is imported
where they are (a second of start-up): train and tune import this module but never pay it.
"""

from __future__ import annotations

import math

import numpy as np

from opensig.labels import UNKNOWN
from opensig.thresholds import decide, decide_multi, macro_f1

__all__ = [
    "MISTAKES",
    "SCORE_GROUPS",
    "auroc",
    "calibration_bins",
    "confusion",
    "ece",
    "fpr_at_tpr",
    "known_accuracy",
    "known_ccr",
    "macro_f1",
    "multilabel_metrics",
    "novel_metrics",
    "open_set_metrics",
    "operating_point",
    "oscr",
    "oscr_points",
    "reliability",
    "roc_points",
    "score_histograms",
    "unknown_groups",
    "unknown_recall",
    "worst_mistakes",
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
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(is_known, max_score))


def fpr_at_tpr(scores: np.ndarray, labels: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of unknowns accepted at the max-score threshold that accepts ``tpr`` of knowns."""
    is_known, max_score = _known_vs_unknown(scores, labels)
    if is_known.all() or not is_known.any():
        return math.nan
    from sklearn.metrics import roc_curve

    fpr, tpr_curve, _ = roc_curve(is_known, max_score, drop_intermediate=False)
    return float(fpr[np.argmax(tpr_curve >= tpr)])


def oscr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the open-set classification rate curve (Dhamija et al., 2018).

    For a threshold ``t`` on the max score, CCR(t) is the fraction of knowns that are argmax-correct
    with max score >= t and FPR(t) the fraction of unknowns with max score >= t. Equal scores are
    one step, the curve runs from (0, 0) to (1, closed-set accuracy), and the area is a trapezoid
    sum. Unlike AUROC it rewards rejecting unknowns only when knowns are also classified right.
    """
    fpr, ccr = oscr_points(scores, labels)
    if fpr.size == 0:
        return math.nan
    # Trapezoids by hand: np.trapezoid needs numpy 2 and the project supports numpy >= 1.24.
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2.0))


def oscr_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, ccr): the curve :func:`oscr` integrates, one point per distinct max score.

    Empty arrays when either side is missing, since no curve exists then.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    is_known, max_score = _known_vs_unknown(scores, labels)
    n_known, n_unknown = int(is_known.sum()), int((~is_known).sum())
    if n_known == 0 or n_unknown == 0:
        return np.empty(0), np.empty(0)
    correct = is_known & (np.argmax(scores, axis=1) == labels)
    order = np.argsort(-max_score, kind="stable")
    sorted_score = max_score[order]
    last = np.append(np.flatnonzero(np.diff(sorted_score) != 0), sorted_score.size - 1)
    ccr = np.concatenate([[0.0], np.cumsum(correct[order])[last] / n_known])
    fpr = np.concatenate([[0.0], np.cumsum(~is_known[order])[last] / n_unknown])
    return fpr, ccr


def class_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, K) booleans "image is of class k": from class indices (UNKNOWN: none) or from
    multi-hot labels as they are, so per-class metrics serve both kinds of data."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.astype(bool)
    return labels[:, None] == np.arange(num_classes)


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
    bins = calibration_bins(scores, n_bins)
    targets = class_targets(labels, num_classes)
    per_class = []
    for k in range(num_classes):
        target = targets[:, k].astype(np.float64)
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
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(is_known, max_score)
    return fpr, tpr, thresholds


def operating_point(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """Where the decisions sit on the ROC and OSCR planes: the fraction of unknown images given
    a class (``fpr``), of known images given one (``tpr``) and given the right one (``ccr``)."""
    return {
        "fpr": 1.0 - unknown_recall(preds, labels),
        "tpr": _mean_or_nan(np.asarray(preds)[np.asarray(labels) != UNKNOWN] != UNKNOWN),
        "ccr": known_ccr(preds, labels),
    }


def unknown_groups(labels: np.ndarray, novel: np.ndarray) -> dict[str, np.ndarray]:
    """Image masks of the two known-vs-unknown tests: every known image with the unknown
    images of the sources seen in training (``seen_unknown``), and with those of the held-out
    sources (``novel_unknown``, the honest test). ``novel`` marks unknown images only."""
    known = np.asarray(labels) != UNKNOWN
    novel = np.asarray(novel, dtype=bool)
    return {"seen_unknown": known | ~novel, "novel_unknown": known | novel}


def calibration_bins(scores: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """The bin of each score among ``n_bins`` equal-width bins on [0, 1] (1.0 in the last one):
    one binning for :func:`ece`, the reliability diagram and the score histograms."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.clip((np.clip(scores, 0.0, 1.0) * n_bins).astype(np.int64), 0, n_bins - 1)


def reliability(scores: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability diagram of every sigmoid output, binned as :func:`ece`.

    Each (image, class k) pair is one claim "this is class k with probability p"; unknown images
    are negatives for every class. Per bin: its ``lower`` and ``upper`` edge, the ``count`` of
    claims, their ``mean_score`` and the ``fraction_true`` of them (nan for an empty bin). A
    calibrated model has fraction_true == mean_score in every bin.
    """
    scores = np.asarray(scores, dtype=np.float64)
    target = class_targets(labels, scores.shape[1])
    bins = calibration_bins(scores, n_bins).ravel()
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins: 0 / 0 = nan
        mean_score = np.bincount(bins, weights=scores.ravel(), minlength=n_bins) / count
        fraction_true = np.bincount(bins, weights=target.ravel(), minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "count": count,
        "mean_score": mean_score,
        "fraction_true": fraction_true,
    }


SCORE_GROUPS = ("true class", "other known", "unknown")


def score_histograms(scores: np.ndarray, labels: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """``counts[k, g, b]``: images of group g whose class-k score falls in bin b.

    The groups are :data:`SCORE_GROUPS`: images of class k, of another known class, unknown
    images; bins as :func:`calibration_bins`. Where the groups overlap around class k's
    threshold, the decision rule errs.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    bins = calibration_bins(scores, n_bins)
    targets = class_targets(labels, scores.shape[1])
    unknown = ~targets.any(axis=1)
    counts = np.zeros((scores.shape[1], len(SCORE_GROUPS), n_bins), dtype=np.int64)
    for k in range(scores.shape[1]):
        for g, mask in enumerate((targets[:, k], ~unknown & ~targets[:, k], unknown)):
            counts[k, g] = np.bincount(bins[mask, k], minlength=n_bins)
    return counts


MISTAKES = ("known called unknown", "unknown accepted", "wrong class")


def worst_mistakes(
    scores: np.ndarray, labels: np.ndarray, preds: np.ndarray
) -> dict[str, np.ndarray]:
    """Indices of the images of each kind of error in :data:`MISTAKES`, worst first.

    - known called unknown: a known image decided UNKNOWN, by lowest score of its true class;
    - unknown accepted: an unknown image given a class, by highest max score;
    - wrong class: a known image given another class, by highest score of that class.

    Ties keep the images' order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels, preds = np.asarray(labels), np.asarray(preds)
    rows = np.arange(len(labels))
    known, accepted = labels != UNKNOWN, preds != UNKNOWN
    kinds = {
        MISTAKES[0]: (known & ~accepted, scores[rows, np.where(known, labels, 0)]),
        MISTAKES[1]: (~known & accepted, -scores.max(axis=1)),
        MISTAKES[2]: (
            known & accepted & (preds != labels),
            -scores[rows, np.where(accepted, preds, 0)],
        ),
    }
    worst = {}
    for kind, (mask, key) in kinds.items():
        found = np.flatnonzero(mask)
        worst[kind] = found[np.argsort(key[found], kind="stable")]
    return worst


def _json_float(value: float) -> float | None:
    """Python float for JSON, with nan (undefined metric) as None."""
    value = float(value)
    return None if math.isnan(value) else value


def novel_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    rejected: np.ndarray,
    novel_mask: np.ndarray | None,
    with_oscr: bool = True,
) -> dict | None:
    """The rejection metrics again on the known and the novel unknown images only: the honest
    test of generalising to kinds of unknown never seen in training. None when no image is
    marked novel.

    ``labels`` are class indices with UNKNOWN (multi-label data: any known index for a known
    image), ``rejected`` marks the images decided unknown, ``novel_mask`` the held-out unknown
    images (unknown images only). ``with_oscr``: OSCR needs one true class per image, so
    multi-label data has none.
    """
    if novel_mask is None:
        return None
    novel_mask, labels = np.asarray(novel_mask, dtype=bool), np.asarray(labels)
    known = labels != UNKNOWN
    if novel_mask.shape != labels.shape:
        raise ValueError(f"novel_mask must have shape {labels.shape}, got {novel_mask.shape}")
    if (novel_mask & known).any():
        raise ValueError("novel_mask marks known images; it must mark unknown images only")
    if not novel_mask.any():
        return None
    keep = known | novel_mask
    s, y = scores[keep], labels[keep]
    report = {"auroc": _json_float(auroc(s, y)), "fpr95": _json_float(fpr_at_tpr(s, y))}
    if with_oscr:
        report["oscr"] = _json_float(oscr(s, y))
    report["unknown_recall"] = _json_float(_mean_or_nan(rejected[novel_mask]))
    report["n_novel"] = int(novel_mask.sum())
    return report


def open_set_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray,
    novel_mask: np.ndarray | None = None,
) -> dict:
    """All headline metrics as a JSON-safe dict (floats, None for undefined, int counts).

    ``novel_mask`` marks held-out "novel" unknown images (never seen as unknowns in training);
    when any are marked, ``novel`` repeats the rejection metrics on known + novel images only
    (:func:`novel_metrics`).
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
    if novel := novel_metrics(scores, labels, preds == UNKNOWN, novel_mask):
        result["novel"] = novel
    return result


# --- multi-label data: a set of classes per image, the empty set for an unknown image ------


def multilabel_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    thresholds: np.ndarray,
    classes: list[str],
    novel_mask: np.ndarray | None = None,
) -> dict:
    """Per-class precision/recall/F1, their macro mean, micro F1 and subset accuracy.

    ``targets`` are multi-hot ``(N, K)``; decisions are :func:`decide_multi` (every class that
    passes its threshold). Subset accuracy counts an image right only if its whole predicted
    set is right, the empty set being "unknown". Known-vs-unknown AUROC and FPR@95 rank by max
    score as for single-label data; OSCR and top-1 accuracy need one true class, so are absent.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=bool)
    preds = decide_multi(scores, thresholds)
    true_pos = (preds & targets).sum(axis=0)
    predicted, support = preds.sum(axis=0), targets.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, true_pos / predicted, 0.0)
        recall = np.where(support > 0, true_pos / support, 0.0)
        f1 = np.where(predicted + support > 0, 2 * true_pos / (predicted + support), 0.0)
    known = targets.any(axis=1)
    as_labels = np.where(known, 0, UNKNOWN)  # known vs unknown is all the ranking metrics need
    rejected = ~preds.any(axis=1)  # decided unknown: no class passes its threshold
    all_tp, all_pred, all_true = true_pos.sum(), predicted.sum(), support.sum()
    result: dict = {
        "macro_f1": _json_float(_mean_or_nan(f1[support > 0])),
        "micro_f1": _json_float(
            2 * all_tp / (all_pred + all_true) if all_pred + all_true else math.nan
        ),
        "subset_accuracy": _json_float(_mean_or_nan((preds == targets).all(axis=1))),
        "unknown_recall": _json_float(_mean_or_nan(rejected[~known])),
        "auroc": _json_float(auroc(scores, as_labels)),
        "fpr95": _json_float(fpr_at_tpr(scores, as_labels)),
        "ece": _json_float(ece(scores, targets)),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(classes)
        },
        "n_known": int(known.sum()),
        "n_unknown": int((~known).sum()),
    }
    if novel := novel_metrics(scores, as_labels, rejected, novel_mask, with_oscr=False):
        result["novel"] = novel
    return result
