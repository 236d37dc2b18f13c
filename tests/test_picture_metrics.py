"""The numbers behind the evaluation pictures, against hand-worked values and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from opensig.labels import UNKNOWN
from opensig.metrics import (
    MISTAKES,
    calibration_bins,
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

U = UNKNOWN


def test_oscr_points_group_ties_and_integrate_to_oscr() -> None:
    # known 0 at .9 correct, unknown .8, known 1 at .8 correct (tie), unknown .3
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.8], [0.3, 0.2]])
    labels = np.array([0, U, 1, U])
    fpr, ccr = oscr_points(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(ccr, [0, 0.5, 1, 1])
    assert oscr(scores, labels) == pytest.approx(0.875)


def test_oscr_points_empty_without_unknowns() -> None:
    fpr, ccr = oscr_points(np.array([[0.9, 0.1]]), np.array([0]))
    assert fpr.size == ccr.size == 0


def test_roc_points_of_a_group_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 3, size=200)
    novel = (labels == U) & (rng.random(200) < 0.5)
    scores = rng.random((200, 3))
    for keep in unknown_groups(labels, novel).values():
        fpr, tpr, _ = roc_points(scores[keep], labels[keep])
        want_fpr, want_tpr, _ = roc_curve(labels[keep] != U, scores[keep].max(axis=1))
        np.testing.assert_allclose(fpr, want_fpr)
        np.testing.assert_allclose(tpr, want_tpr)


def test_unknown_groups_split_unknowns_and_keep_every_known() -> None:
    groups = unknown_groups(np.array([0, U, U, 1]), np.array([False, True, False, False]))
    np.testing.assert_array_equal(groups["seen_unknown"], [True, False, True, True])
    np.testing.assert_array_equal(groups["novel_unknown"], [True, True, False, True])


def test_operating_point() -> None:
    labels = np.array([0, 0, 1, U, U])
    preds = np.array([0, U, 0, 1, U])
    point = operating_point(labels, preds)
    assert point["fpr"] == pytest.approx(0.5)  # one of two unknowns given a class
    assert point["tpr"] == pytest.approx(2 / 3)  # two of three knowns given a class
    assert point["ccr"] == pytest.approx(1 / 3)  # one of them the right one


def test_calibration_bins_are_equal_width_and_clipped() -> None:
    scores = np.array([-0.1, 0.0, 0.066, 0.07, 0.5, 1.0, 1.3])
    np.testing.assert_array_equal(calibration_bins(scores, 15), [0, 0, 0, 1, 7, 14, 14])


def test_reliability_two_bins_hand_worked() -> None:
    scores = np.array([[0.2, 0.1], [0.4, 0.3], [0.7, 0.5], [0.9, 1.0]])
    labels = np.array([0, U, 0, 1])
    # claims (score, true?): bin [0, .5): (.2 1) (.1 0) (.4 0) (.3 0); bin [.5, 1]: (.7 1)
    # (.5 0) (.9 0) (1.0 1)
    table = reliability(scores, labels, n_bins=2)
    np.testing.assert_allclose(table["lower"], [0, 0.5])
    np.testing.assert_allclose(table["upper"], [0.5, 1])
    np.testing.assert_array_equal(table["count"], [4, 4])
    np.testing.assert_allclose(table["mean_score"], [0.25, 0.775])
    np.testing.assert_allclose(table["fraction_true"], [0.25, 0.5])


def test_reliability_empty_bins_are_nan() -> None:
    table = reliability(np.array([[0.95]]), np.array([0]), n_bins=4)
    np.testing.assert_array_equal(table["count"], [0, 0, 0, 1])
    assert np.isnan(table["mean_score"][:3]).all() and table["fraction_true"][3] == 1.0


def test_reliability_gaps_give_ece_for_one_class() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random((300, 1))
    labels = np.where(rng.random(300) < scores[:, 0], 0, U)
    table = reliability(scores, labels)
    full = table["count"] > 0
    gaps = np.abs(table["fraction_true"][full] - table["mean_score"][full])
    assert np.sum(table["count"][full] / 300 * gaps) == pytest.approx(ece(scores, labels))


def test_score_histograms_hand_worked() -> None:
    scores = np.array([[0.9, 0.2], [0.3, 0.8], [0.6, 0.1], [0.4, 0.7]])
    labels = np.array([0, 1, U, 0])
    counts = score_histograms(scores, labels, n_bins=2)
    # class 0: true class .9 .4, other known .3, unknown .6
    np.testing.assert_array_equal(counts[0], [[1, 1], [1, 0], [0, 1]])
    # class 1: true class .8, other known .2 .7, unknown .1
    np.testing.assert_array_equal(counts[1], [[0, 1], [1, 1], [1, 0]])


def test_worst_mistakes_order_each_kind_worst_first() -> None:
    labels = np.array([0, 0, 1, U, U, 1, 0, U, 0])
    preds = np.array([U, U, 0, 1, 0, 1, 1, U, U])
    scores = np.array(
        [
            [0.4, 0.1],  # known 0 called unknown, true score .4
            [0.2, 0.3],  # known 0 called unknown, true score .2
            [0.7, 0.1],  # known 1 called 0 at .7
            [0.1, 0.95],  # unknown accepted, max .95
            [0.6, 0.65],  # unknown accepted (as 0), max .65
            [0.1, 0.9],  # right
            [0.2, 0.9],  # known 0 called 1 at .9
            [0.1, 0.1],  # unknown rejected: right
            [0.2, 0.0],  # known 0 called unknown, true score .2: a tie with image 1
        ]
    )
    worst = worst_mistakes(scores, labels, preds)
    assert list(worst) == list(MISTAKES)
    np.testing.assert_array_equal(worst["known called unknown"], [1, 8, 0])
    np.testing.assert_array_equal(worst["unknown accepted"], [3, 4])
    np.testing.assert_array_equal(worst["wrong class"], [6, 2])


def test_worst_mistakes_of_a_perfect_model_are_empty() -> None:
    worst = worst_mistakes(np.array([[0.9, 0.1]]), np.array([0]), np.array([0]))
    assert all(found.size == 0 for found in worst.values())
