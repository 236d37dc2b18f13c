"""Pure statistics comparing a current window of predictions with a reference window.

The tests are scipy's; what opensig adds is only the effect sizes an alert also needs
(a significant 0.3-point wiggle on 10 000 rows is no news).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from scipy import stats

PSI_FLOOR = 1e-4  # a bin empty in one window would make PSI infinite


def wilson(hits: int, n: int, alpha: float) -> tuple[float, float]:
    """The Wilson score interval of a rate at confidence 1 - alpha."""
    ci = stats.binomtest(hits, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


def rate_change(hits: int, n: int, ref_hits: int, ref_n: int, alpha: float) -> dict:
    """A rate in the current window against the reference: both rates, the current rate's
    Wilson interval at 1 - alpha, and the two-sided p-value of the two-proportion z-test
    (the Pearson chi-square of the 2x2 table without continuity correction: the same test)."""
    low, high = wilson(hits, n, alpha)
    table = np.array([[hits, n - hits], [ref_hits, ref_n - ref_hits]])
    if (table.sum(axis=0) == 0).any():  # both windows all hits or all misses: nothing moved
        p_value = 1.0
    else:
        p_value = float(stats.chi2_contingency(table, correction=False).pvalue)
    return {
        "current": hits / n,
        "reference": ref_hits / ref_n,
        "ci_low": low,
        "ci_high": high,
        "p_value": p_value,
    }


def share_change(current: Sequence[str], reference: Sequence[str], classes: Sequence[str]) -> dict:
    """Each class's share of the predictions in both windows, and the chi-square test of
    homogeneity of the two windows' class counts (classes seen in neither left out)."""
    tallies = [Counter(window) for window in (current, reference)]
    counts = np.array([[tally[c] for c in classes] for tally in tallies])
    seen = counts.sum(axis=0) > 0
    if seen.sum() < 2 or (counts.sum(axis=1) == 0).any():
        p_value = 1.0
    else:
        p_value = float(stats.chi2_contingency(counts[:, seen], correction=False).pvalue)
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    shares = counts / totals
    return {
        "classes": {
            c: {"current": float(shares[0, k]), "reference": float(shares[1, k])}
            for k, c in enumerate(classes)
        },
        "p_value": p_value,
    }


def psi(current: np.ndarray, reference: np.ndarray, bins: int = 10) -> float:
    """Population stability index over bins cut at the reference's deciles (open ends)."""
    inner = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    edges = np.concatenate([[-np.inf], inner, [np.inf]])
    cur = np.maximum(np.histogram(current, edges)[0] / len(current), PSI_FLOOR)
    ref = np.maximum(np.histogram(reference, edges)[0] / len(reference), PSI_FLOOR)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def score_shift(current: np.ndarray, reference: np.ndarray) -> dict:
    """The max-score distributions: two-sample Kolmogorov-Smirnov statistic and p-value, PSI."""
    test = stats.ks_2samp(current, reference)
    return {
        "ks": float(test.statistic),
        "p_value": float(test.pvalue),
        "psi": psi(np.asarray(current), np.asarray(reference)),
    }
