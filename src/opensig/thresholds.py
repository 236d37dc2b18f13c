"""Per-class thresholds on sigmoid scores and the one decision rule that uses them.

Every stage (training-time validation, evaluation, prediction) must turn scores into labels the
same way, so the rule lives here as :func:`decide` and the tuning strategies optimise exactly it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import numpy as np

from opensig.labels import UNKNOWN

logger = logging.getLogger(__name__)

_DEFAULT_THRESHOLD = 0.5
# f1 tunes within these (on the calibrated scale, odds of 1 in 20 of a known image of the
# class either way): a validation split with no novel unknowns cannot justify accepting an
# image below them, and a threshold there reads as "anything goes" (bench/README.md)
READABLE = (0.05, 0.95)
_IMPROVEMENT_TOL = 1e-12


def decide(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Turn per-class scores into labels, with :data:`UNKNOWN` when no class is confident.

    Rule: class ``k`` is a candidate for an image when ``scores[:, k] >= thresholds[k]``. With no
    candidate the image is ``UNKNOWN``; otherwise it gets the candidate with the highest score
    (an exact tie goes to the lowest class index). Returns int64 labels of shape ``(N,)``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if scores.ndim != 2 or thresholds.shape != (scores.shape[1],):
        raise ValueError(
            f"need scores (N, K) and thresholds (K,), got {scores.shape} and {thresholds.shape}"
        )
    passing = scores >= thresholds
    best = np.argmax(np.where(passing, scores, -np.inf), axis=1)
    return np.where(passing.any(axis=1), best, UNKNOWN).astype(np.int64)


def macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    """Macro-F1 over the labels present in ``labels`` or ``preds``, UNKNOWN being one of them.

    Same value as ``sklearn.metrics.f1_score(labels, preds, average="macro")`` but a bincount
    instead of sklearn's validation overhead, because threshold tuning calls it many times.
    """
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if labels.shape != preds.shape or labels.ndim != 1:
        raise ValueError(
            f"labels and preds must be equal-length 1-D, got {labels.shape}, {preds.shape}"
        )
    if labels.size == 0:
        return float("nan")
    present, inverse = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    y, p = inverse[: labels.size], inverse[labels.size :]
    n = present.size
    support = np.bincount(y, minlength=n)
    predicted = np.bincount(p, minlength=n)
    true_pos = np.bincount(y[y == p], minlength=n)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (support + predicted); both > 0 for a present label.
    return float(np.mean(2.0 * true_pos / (support + predicted)))


def decide_multi(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The multi-label form of the rule: every class whose score reaches its threshold, (N, K)
    booleans; a row with none is ``unknown``. Single-label ``decide`` picks the best of these."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores >= np.asarray(thresholds, dtype=np.float64)


def _check_inputs(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and label range once, so strategies can index without surprises.

    ``labels`` are class indices (N,) with UNKNOWN, or multi-hot targets (N, K) for
    multi-label data (an all-zero row is an unknown image).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or labels.shape not in ((scores.shape[0],), scores.shape):
        raise ValueError(
            f"need scores (N, K) and labels (N,) or (N, K), got {scores.shape}, {labels.shape}"
        )
    num_classes = scores.shape[1]
    if labels.ndim == 2:
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ValueError("multi-hot labels must be 0 or 1")
    elif labels.size and (labels.min() < UNKNOWN or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [{UNKNOWN}, {num_classes - 1}]")
    return scores, labels


def _positive(labels: np.ndarray, k: int) -> np.ndarray:
    """Which images are of class ``k``, for class indices or multi-hot labels alike."""
    return labels[:, k] == 1 if labels.ndim == 2 else labels == k


def _ovr_curve(
    score: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-vs-rest counts at every distinct score used as threshold (descending thresholds).

    Returns ``(thresholds, true_pos, false_pos)`` where the counts are of images with
    ``score >= threshold``; equal scores are grouped because a threshold cannot split them.
    """
    order = np.argsort(-score, kind="stable")
    sorted_score = score[order]
    cum_pos = np.cumsum(positive[order])
    group_end = np.flatnonzero(np.diff(sorted_score) != 0)
    last = np.append(group_end, sorted_score.size - 1)
    true_pos = cum_pos[last]
    false_pos = last + 1 - true_pos
    return sorted_score[last], true_pos, false_pos


def fixed(scores: np.ndarray, labels: np.ndarray, value: float = _DEFAULT_THRESHOLD) -> np.ndarray:
    """The same threshold for every class: the baseline that needs no validation data."""
    scores, _ = _check_inputs(scores, labels)
    return np.full(scores.shape[1], float(value))


def precision(scores: np.ndarray, labels: np.ndarray, target_precision: float = 0.9) -> np.ndarray:
    """Per class, the lowest threshold whose one-vs-rest precision reaches ``target_precision``.

    The lowest qualifying threshold keeps the most recall at the requested precision. When no
    threshold qualifies, the most precise one is used (lowest among ties) and a warning is logged;
    a class without positive validation images keeps the default 0.5.
    """
    scores, labels = _check_inputs(scores, labels)
    out = np.full(scores.shape[1], _DEFAULT_THRESHOLD)
    for k in range(scores.shape[1]):
        positive = _positive(labels, k)
        if not positive.any():
            logger.warning("class %d has no positive validation images; threshold stays 0.5", k)
            continue
        thr, true_pos, false_pos = _ovr_curve(scores[:, k], positive)
        prec = true_pos / (true_pos + false_pos)
        qualifying = np.flatnonzero(prec >= target_precision)
        if qualifying.size:
            out[k] = thr[qualifying[-1]]
        else:
            best = np.flatnonzero(prec == prec.max())[-1]
            logger.warning(
                "class %d never reaches precision %.3f; using threshold %.4f (precision %.3f)",
                k,
                target_precision,
                thr[best],
                prec[best],
            )
            out[k] = thr[best]
    return out


def doc(scores: np.ndarray, labels: np.ndarray, doc_k: float = 3.0) -> np.ndarray:
    """DOC (Shu et al. 2017): per class, a Gaussian fitted to its own images' scores.

    The class's positive scores s are mirrored around 1 (s and 2 - s), so the fitted Gaussian
    has mean 1 and sigma = sqrt(mean((s - 1)^2)); the threshold is max(0.5, 1 - doc_k * sigma).
    It needs no unknown validation images: a class whose scores spread widely gets a lower
    threshold. A class with no validation images keeps 0.5, with a warning.
    """
    scores, labels = _check_inputs(scores, labels)
    out = np.full(scores.shape[1], _DEFAULT_THRESHOLD)
    for k in range(scores.shape[1]):
        own = scores[_positive(labels, k), k]
        if own.size == 0:
            logger.warning("class %d has no validation images; DOC threshold stays 0.5", k)
            continue
        sigma = float(np.sqrt(np.mean((own - 1.0) ** 2)))
        out[k] = max(_DEFAULT_THRESHOLD, 1.0 - doc_k * sigma)
    return out


def _ovr_f1_thresholds(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class, the highest threshold maximising that class's own one-vs-rest F1 (0.5 if
    no positives; see :func:`f1` for why the highest)."""
    out = np.full(scores.shape[1], _DEFAULT_THRESHOLD)
    for k in range(scores.shape[1]):
        positive = _positive(labels, k)
        if positive.any():
            thr, true_pos, false_pos = _ovr_curve(scores[:, k], positive)
            f1_k = 2.0 * true_pos / (positive.sum() + true_pos + false_pos)
            # thresholds descend, so argmax (the first maximum) is the highest of the best
            out[k] = np.clip(thr[np.argmax(f1_k)], *READABLE)
    return out


def _candidates(score: np.ndarray, current: float, max_candidates: int) -> np.ndarray:
    """Thresholds to try for one class: the current one first, then score values and midpoints.

    Unique scores are subsampled to evenly spaced quantiles so the sweep stays cheap for large N.
    """
    values = np.unique(score)
    if values.size > max_candidates:
        values = values[np.linspace(0, values.size - 1, max_candidates).round().astype(np.int64)]
    mids = (values[:-1] + values[1:]) / 2.0
    inside = np.concatenate([values, mids, READABLE])
    inside = inside[(inside >= READABLE[0]) & (inside <= READABLE[1])]
    return np.concatenate([[current], inside])


def _sweep_class(
    scores: np.ndarray,
    y: np.ndarray,
    thresholds: np.ndarray,
    k: int,
    candidates: np.ndarray,
) -> np.ndarray:
    """Macro-F1 after :func:`decide` for each candidate threshold of class ``k``, others fixed.

    ``y`` uses ``K`` for unknown. With the other thresholds fixed, each image's decision is either
    ``alt`` (what it gets without class ``k``) or ``k``, and it can be ``k`` only if ``k`` would
    win the score comparison. So lowering the threshold flips those winners from ``alt`` to ``k``
    in descending score order, and cumulative sums give every candidate's counts at once.
    """
    n_images, num_classes = scores.shape
    unknown = num_classes
    passing = scores >= thresholds
    passing[:, k] = False
    masked = np.where(passing, scores, -np.inf)
    alt = np.argmax(masked, axis=1)
    alt_score = masked[np.arange(n_images), alt]
    alt = np.where(np.isfinite(alt_score), alt, unknown)
    score_k = scores[:, k]
    # Same tie-break as decide: on equal scores the lower class index wins.
    wins = (score_k > alt_score) | ((score_k == alt_score) & (k < alt))

    support = np.bincount(y, minlength=num_classes + 1)
    base_pred = np.bincount(alt, minlength=num_classes + 1)
    base_tp = np.bincount(alt[alt == y], minlength=num_classes + 1)

    w_score, w_alt, w_y = score_k[wins], alt[wins], y[wins]
    order = np.argsort(-w_score, kind="stable")
    w_alt, w_y = w_alt[order], w_y[order]
    rows = np.arange(1, w_alt.size + 1)
    d_pred = np.zeros((w_alt.size + 1, num_classes + 1))
    d_pred[rows, w_alt] -= 1.0
    d_pred[rows, k] += 1.0
    d_tp = np.zeros_like(d_pred)
    d_tp[rows, w_alt] -= w_y == w_alt
    d_tp[rows, k] += w_y == k
    np.cumsum(d_pred, axis=0, out=d_pred)
    np.cumsum(d_tp, axis=0, out=d_tp)

    ascending = np.sort(w_score)
    n_flipped = w_score.size - np.searchsorted(ascending, candidates, side="left")
    predicted = base_pred + d_pred[n_flipped]
    true_pos = base_tp + d_tp[n_flipped]
    denom = support + predicted
    present = denom > 0
    f1_per_class = np.divide(2.0 * true_pos, denom, out=np.zeros_like(denom), where=present)
    return f1_per_class.sum(axis=1) / present.sum(axis=1)


def f1(
    scores: np.ndarray,
    labels: np.ndarray,
    max_rounds: int = 5,
    max_candidates: int = 256,
) -> np.ndarray:
    """Thresholds maximising macro-F1 (K classes + unknown) of the labels :func:`decide` gives.

    Tuning per class in isolation ignores that classes compete inside the decision rule, so this
    does coordinate ascent on the real objective: start from the better of per-class one-vs-rest
    F1 thresholds and a flat 0.5, then sweep one class at a time with the others fixed, keeping
    strict improvements, for up to ``max_rounds`` rounds or until a round changes nothing.
    Thresholds stay within :data:`READABLE`.
    Ties go to the highest of the best thresholds: the validation split has no novel
    unknowns, and a lower threshold that scores the same on it can only let more of them
    in. That holds most where validation cannot tell a range apart at all (every unknown
    below, every known above, as on the demo): the calibrated 0.5 then sits anywhere in the
    gap, and on the demo it let in up to half the novel digits that the least typical known
    validation image's score keeps out (bench/README.md: Thresholds on separable
    validation). A class with no validation image keeps 0.5, with a warning: sweeping it
    would only learn to silence it.

    With multi-hot labels every class is decided on its own (:func:`decide_multi`), so the
    per-class one-vs-rest F1 thresholds are the optimum and no sweep is needed.
    """
    scores, labels = _check_inputs(scores, labels)
    num_classes = scores.shape[1]
    if labels.size == 0:
        logger.warning("no validation images; all thresholds stay 0.5")
        return np.full(num_classes, _DEFAULT_THRESHOLD)
    tunable = [k for k in range(num_classes) if _positive(labels, k).any()]
    for k in sorted(set(range(num_classes)) - set(tunable)):
        logger.warning("class %d has no validation images; threshold stays 0.5", k)
    if labels.ndim == 2:
        return _ovr_f1_thresholds(scores, labels)
    y = np.where(labels == UNKNOWN, num_classes, labels)

    starts = [_ovr_f1_thresholds(scores, labels), np.full(num_classes, _DEFAULT_THRESHOLD)]
    start_f1 = [macro_f1(labels, decide(scores, t)) for t in starts]
    thresholds = starts[int(np.argmax(start_f1))].copy()
    best_f1 = max(start_f1)

    for round_idx in range(max_rounds):
        improved = False
        for k in tunable:
            cands = _candidates(scores[:, k], thresholds[k], max_candidates)
            values = _sweep_class(scores, y, thresholds, k, cands)
            if values.max() > values[0] + _IMPROVEMENT_TOL:
                thresholds[k] = cands[values >= values.max() - _IMPROVEMENT_TOL].max()
                best_f1 = float(values.max())
                improved = True
        logger.debug("f1 tuning round %d: macro-F1 %.4f", round_idx + 1, best_f1)
        if not improved:
            break
    logger.info("f1 tuning: validation macro-F1 %.4f", best_f1)
    return thresholds


STRATEGIES: dict[str, Callable[..., np.ndarray]] = {
    "fixed": fixed,
    "precision": precision,
    "f1": f1,
    "doc": doc,
}
"""Strategy name -> ``fn(scores, labels, **options) -> thresholds (K,)``."""


def tune_thresholds(
    scores: np.ndarray, labels: np.ndarray, strategy: str, **options: object
) -> np.ndarray:
    """Run the named strategy, passing it only the options its signature accepts.

    Filtering lets callers hand over one options dict (e.g. from config) whatever the strategy.
    """
    try:
        fn = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(
            f"unknown threshold strategy {strategy!r}; valid: {', '.join(sorted(STRATEGIES))}"
        ) from None
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {k: v for k, v in options.items() if takes_any or k in params}
    ignored = sorted(set(options) - set(accepted))
    if ignored:
        logger.debug("strategy %r ignores options %s", strategy, ignored)
    return np.asarray(fn(scores, labels, **accepted), dtype=np.float64)
