"""Judging a model on a class list that is not its own (the promotion gate across class sets)."""

from __future__ import annotations

import numpy as np
import pytest

from opensig.evaluation import align_classes
from opensig.labels import UNKNOWN
from opensig.metrics import open_set_metrics
from opensig.thresholds import decide


def test_align_classes_puts_the_model_in_todays_columns() -> None:
    scores = np.array([[0.9, 0.2], [0.1, 0.7]])
    aligned, limits, columns = align_classes(
        scores, np.array([0.5, 0.6]), ["cat", "dog"], ["bird", "dog"]
    )
    assert columns == ["bird", "dog", "cat"]  # today's, then the model's own extra ones
    np.testing.assert_array_equal(aligned, [[0.0, 0.2, 0.9], [0.0, 0.7, 0.1]])
    np.testing.assert_array_equal(limits, [np.inf, 0.6, 0.5])
    # An unknown class is never decided; the model's extra class still can be (wrongly).
    np.testing.assert_array_equal(decide(aligned, limits), [2, 1])


def test_align_classes_is_the_identity_on_the_same_class_list() -> None:
    scores = np.array([[0.3, 0.8, 0.1]], dtype=np.float32)
    aligned, limits, columns = align_classes(
        scores, np.array([0.5, 0.5, 0.5]), ["a", "b", "c"], ["a", "b", "c"]
    )
    assert columns == ["a", "b", "c"] and aligned.dtype == np.float32
    np.testing.assert_array_equal(aligned, scores)
    np.testing.assert_array_equal(limits, [0.5, 0.5, 0.5])


def test_images_of_a_class_the_model_lacks_count_as_its_mistakes() -> None:
    """Today: classes a, b. The model knows a and z (not b). Two images of a (right), two of
    b (it cannot name them), one unknown (rejected)."""
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3], [0.7, 0.1], [0.1, 0.1]])
    aligned, limits, _ = align_classes(scores, np.array([0.5, 0.5]), ["a", "z"], ["a", "b"])
    labels = np.array([0, 0, 1, 1, UNKNOWN])
    metrics = open_set_metrics(aligned, labels, limits)
    np.testing.assert_array_equal(decide(aligned, limits), [0, 0, UNKNOWN, 0, UNKNOWN])
    assert metrics["known_accuracy"] == pytest.approx(0.5)  # the b images: argmax is never b
    assert metrics["known_ccr"] == pytest.approx(0.5)
    # macro-F1 over a, b, unknown: a 2/(3+2)*2=0.8, b 0, unknown 2*1/(1+2)=0.667
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.0 + 2 / 3) / 3)
