"""Tests for the open-set metrics against hand-worked values and scikit-learn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score, roc_curve

from opensig.labels import UNKNOWN
from opensig.metrics import (
    auroc,
    confusion,
    ece,
    fpr_at_tpr,
    known_accuracy,
    known_ccr,
    macro_f1,
    multilabel_metrics,
    open_set_metrics,
    oscr,
    roc_points,
    unknown_recall,
)
from opensig.thresholds import decide
from tests.conftest import METRIC_KEYS


def _random_case(
    n: int = 300, num_classes: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, num_classes, size=n)
    scores = rng.random((n, num_classes)) * 0.6
    known = labels != UNKNOWN
    scores[known, labels[known]] += 0.4 * rng.random(known.sum())
    return scores, labels


def test_known_accuracy_ignores_unknowns_and_thresholds() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.6, 0.4], [0.3, 0.2]])
    labels = np.array([0, 1, 1, UNKNOWN])
    assert known_accuracy(scores, labels) == pytest.approx(2 / 3)


def test_known_ccr_and_unknown_recall() -> None:
    labels = np.array([0, 1, 1, UNKNOWN, UNKNOWN, UNKNOWN])
    preds = np.array([0, UNKNOWN, 1, UNKNOWN, 0, UNKNOWN])
    assert known_ccr(preds, labels) == pytest.approx(2 / 3)
    assert unknown_recall(preds, labels) == pytest.approx(2 / 3)


def test_unknown_recall_nan_without_unknowns() -> None:
    assert math.isnan(unknown_recall(np.array([0, 1]), np.array([0, 1])))


def test_macro_f1_matches_sklearn() -> None:
    scores, labels = _random_case()
    preds = decide(scores, np.full(4, 0.5))
    assert macro_f1(labels, preds) == pytest.approx(f1_score(labels, preds, average="macro"))


def test_auroc_matches_sklearn_on_max_score() -> None:
    scores, labels = _random_case(seed=1)
    expected = roc_auc_score(labels != UNKNOWN, scores.max(axis=1))
    assert auroc(scores, labels) == pytest.approx(expected)


def test_threshold_free_metrics_nan_with_one_side_missing() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.8]])
    for labels in (np.array([0, 1]), np.array([UNKNOWN, UNKNOWN])):
        assert math.isnan(auroc(scores, labels))
        assert math.isnan(fpr_at_tpr(scores, labels))
        assert math.isnan(oscr(scores, labels))


def test_fpr_at_tpr_hand_worked() -> None:
    # known max scores 0.9 0.8 0.7 0.4; unknown max scores 0.85 0.5 0.3 0.2
    scores = np.array([[0.9], [0.8], [0.7], [0.4], [0.85], [0.5], [0.3], [0.2]])
    labels = np.array([0, 0, 0, 0, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN])
    # Accepting 95% of 4 knowns means all of them: threshold 0.4 also accepts 0.85 and 0.5.
    assert fpr_at_tpr(scores, labels) == pytest.approx(0.5)
    # Half the knowns: threshold 0.8 accepts only the 0.85 unknown.
    assert fpr_at_tpr(scores, labels, tpr=0.5) == pytest.approx(0.25)


def test_oscr_groups_tied_scores() -> None:
    # known A 0.9 correct, unknown 0.8, known B 0.8 correct (tie), unknown 0.3.
    # Curve (0,0) (0,.5) (.5,1) (1,1): area .5*.75 + .5*1 = .875. Splitting the tie either way
    # would give .75 or 1.0 instead.
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.8], [0.3, 0.2]])
    labels = np.array([0, UNKNOWN, 1, UNKNOWN])
    assert oscr(scores, labels) == pytest.approx(0.875)


def test_oscr_ends_at_closed_set_accuracy() -> None:
    # known 0.9 correct, unknown 0.8, known 0.6 misclassified, unknown 0.3.
    # Curve (0,0) (0,.5) (.5,.5) (.5,.5) (1,.5): area .5.
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.2], [0.3, 0.2]])
    labels = np.array([0, UNKNOWN, 1, UNKNOWN])
    assert oscr(scores, labels) == pytest.approx(0.5)


def test_oscr_equals_auroc_when_every_known_is_correct() -> None:
    scores, labels = _random_case(seed=2)
    known = labels != UNKNOWN
    scores[known, labels[known]] = scores[known].max(axis=1) + 0.01  # force argmax correct
    scores = np.round(scores, 2)  # and create ties
    assert known_accuracy(scores, labels) == 1.0
    assert oscr(scores, labels) == pytest.approx(roc_auc_score(known, scores.max(axis=1)))


def test_ece_two_bin_hand_worked() -> None:
    scores = np.array([[0.2, 0.1], [0.4, 0.3], [0.7, 0.5], [0.9, 1.0]])
    labels = np.array([0, UNKNOWN, 0, 1])
    # class 0, targets 1 0 1 0: bin [0,.5) |.5-.3|*2/4 = .1; bin [.5,1] |.5-.8|*2/4 = .15 -> .25
    # class 1, targets 0 0 0 1: bin [0,.5) |0-.2|*2/4 = .1; bin [.5,1] |.5-.75|*2/4 = .125 -> .225
    assert ece(scores, labels, n_bins=2) == pytest.approx((0.25 + 0.225) / 2)


def test_ece_zero_when_calibrated() -> None:
    scores = np.array([[0.25, 0.75]] * 4)
    labels = np.array([0, 1, 1, 1])
    assert ece(scores, labels) == pytest.approx(0.0)


def test_confusion_puts_unknown_last_and_matches_sklearn() -> None:
    labels = np.array([0, 1, UNKNOWN, UNKNOWN, 1])
    preds = np.array([0, UNKNOWN, 1, UNKNOWN, 1])
    expected = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(confusion(labels, preds, num_classes=2), expected)

    scores, labels = _random_case(seed=3)
    preds = decide(scores, np.full(4, 0.5))
    np.testing.assert_array_equal(
        confusion(labels, preds, num_classes=4),
        confusion_matrix(labels, preds, labels=[0, 1, 2, 3, UNKNOWN]),
    )


def test_roc_points_match_sklearn_and_empty_without_unknowns() -> None:
    scores, labels = _random_case(seed=4)
    fpr, tpr, thr = roc_points(scores, labels)
    exp_fpr, exp_tpr, exp_thr = roc_curve(labels != UNKNOWN, scores.max(axis=1))
    np.testing.assert_allclose(fpr, exp_fpr)
    np.testing.assert_allclose(tpr, exp_tpr)
    np.testing.assert_allclose(thr, exp_thr)
    assert all(
        a.size == 0 for a in roc_points(scores[labels != UNKNOWN], labels[labels != UNKNOWN])
    )


def test_open_set_metrics_values_are_json_safe_and_consistent() -> None:
    scores, labels = _random_case(seed=5)
    thresholds = np.array([0.4, 0.5, 0.6, 0.5])
    out = open_set_metrics(scores, labels, thresholds)
    json.dumps(out, allow_nan=False)
    assert set(out) == METRIC_KEYS | {"n_known", "n_unknown"}
    preds = decide(scores, thresholds)
    assert out["known_ccr"] == pytest.approx(known_ccr(preds, labels))
    assert out["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert out["auroc"] == pytest.approx(auroc(scores, labels))
    assert out["n_known"] + out["n_unknown"] == len(labels)
    assert out["n_unknown"] == int(np.sum(labels == UNKNOWN))
    assert all(type(out[k]) is float for k in ("oscr", "ece", "fpr95"))


def test_open_set_metrics_undefined_values_become_none() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.8]])
    out = open_set_metrics(scores, np.array([0, 1]), np.full(2, 0.5))
    assert out["unknown_recall"] is None
    assert out["auroc"] is None
    assert out["known_ccr"] == 1.0
    json.dumps(out, allow_nan=False)


def test_open_set_metrics_novel_subset() -> None:
    scores, labels = _random_case(seed=6)
    unknown_idx = np.flatnonzero(labels == UNKNOWN)
    novel_mask = np.zeros(len(labels), dtype=bool)
    novel_mask[unknown_idx[::2]] = True
    scores[novel_mask] *= 0.5  # novel unknowns are easier to reject than the others
    thresholds = np.full(4, 0.5)
    out = open_set_metrics(scores, labels, thresholds, novel_mask=novel_mask)
    keep = (labels != UNKNOWN) | novel_mask
    novel = out["novel"]
    assert novel["n_novel"] == int(novel_mask.sum())
    assert novel["auroc"] == pytest.approx(
        roc_auc_score(labels[keep] != UNKNOWN, scores[keep].max(1))
    )
    assert novel["auroc"] > out["auroc"]
    assert novel["oscr"] == pytest.approx(oscr(scores[keep], labels[keep]))
    assert novel["fpr95"] == pytest.approx(fpr_at_tpr(scores[keep], labels[keep]))
    preds = decide(scores, thresholds)
    assert novel["unknown_recall"] == pytest.approx(np.mean(preds[novel_mask] == UNKNOWN))
    json.dumps(out, allow_nan=False)


def test_open_set_metrics_novel_key_only_when_novel_present() -> None:
    scores, labels = _random_case(seed=7)
    out = open_set_metrics(scores, labels, np.full(4, 0.5), novel_mask=np.zeros(len(labels), bool))
    assert "novel" not in out


def test_open_set_metrics_rejects_novel_mask_on_known_images() -> None:
    scores, labels = _random_case(seed=8)
    bad = labels != UNKNOWN
    with pytest.raises(ValueError, match="known"):
        open_set_metrics(scores, labels, np.full(4, 0.5), novel_mask=bad)


def test_multilabel_novel_subset_is_the_same_report_without_oscr() -> None:
    """One novel report for both kinds of data: multi-label data ranks known vs unknown the
    same way, has no OSCR (no single true class), and refuses the same bad masks."""
    scores, labels = _random_case(seed=9)
    targets = (labels[:, None] == np.arange(4)).astype(int)  # one class per known image
    novel_mask = labels == UNKNOWN
    novel_mask[np.flatnonzero(novel_mask)[::2]] = False
    thresholds = np.full(4, 0.5)
    single = open_set_metrics(scores, labels, thresholds, novel_mask=novel_mask)["novel"]
    multi = multilabel_metrics(scores, targets, thresholds, list("abcd"), novel_mask)["novel"]
    assert list(multi) == ["auroc", "fpr95", "unknown_recall", "n_novel"]
    assert multi == {key: single[key] for key in multi}  # no class passes: unknown in both
    with pytest.raises(ValueError, match="known"):
        multilabel_metrics(scores, targets, thresholds, list("abcd"), labels != UNKNOWN)
