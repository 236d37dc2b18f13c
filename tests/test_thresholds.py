"""Tests for the decision rule, the macro-F1 helper and the threshold strategies."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.metrics import f1_score

from opensig.labels import UNKNOWN
from opensig.thresholds import (
    READABLE,
    STRATEGIES,
    decide,
    f1,
    fixed,
    macro_f1,
    precision,
    tune_thresholds,
)


def _synthetic(
    n: int, num_classes: int, seed: int, levels: tuple[float, float] = (0.2, 0.6)
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid-like scores; the default true-class levels mostly sit below 0.5, a poor cut."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    labels[rng.random(n) < 0.3] = UNKNOWN
    scores = rng.beta(1.0, 8.0, size=(n, num_classes))
    known = labels != UNKNOWN
    # Each class gets its own confidence level so the best thresholds differ per class.
    level = np.linspace(*levels, num_classes)[labels[known]]
    scores[known, labels[known]] = np.clip(level + rng.normal(0.0, 0.12, known.sum()), 0.0, 1.0)
    return scores, labels


def _sk_macro_f1(labels: np.ndarray, preds: np.ndarray) -> float:
    return float(f1_score(labels, preds, average="macro"))


# --- decide -------------------------------------------------------------------------------------


def test_decide_picks_highest_passing_class_else_unknown() -> None:
    scores = np.array(
        [
            [0.9, 0.2, 0.1],  # only class 0 passes
            [0.3, 0.4, 0.2],  # nothing passes
            [0.6, 0.7, 0.1],  # both pass, class 1 higher
            [0.8, 0.9, 0.1],  # class 1 higher but below its own threshold
            [0.5, 0.1, 0.1],  # score equal to threshold passes
        ]
    )
    thresholds = np.array([0.5, 0.5, 0.5])
    thresholds_strict_1 = np.array([0.5, 0.95, 0.5])
    preds = decide(scores, thresholds)
    assert preds.dtype == np.int64
    assert preds.tolist() == [0, UNKNOWN, 1, 1, 0]
    assert decide(scores, thresholds_strict_1).tolist() == [0, UNKNOWN, 0, 0, 0]


def test_decide_tie_goes_to_lowest_class_index() -> None:
    scores = np.array([[0.2, 0.7, 0.7], [0.7, 0.7, 0.7]])
    assert decide(scores, np.full(3, 0.5)).tolist() == [1, 0]


def test_decide_all_unknown_when_no_class_passes() -> None:
    scores = np.full((4, 3), 0.49)
    assert decide(scores, np.full(3, 0.5)).tolist() == [UNKNOWN] * 4


def test_decide_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        decide(np.zeros((2, 3)), np.zeros(2))


# --- macro_f1 -----------------------------------------------------------------------------------


def test_macro_f1_matches_sklearn_including_labels_only_predicted() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 3, size=200)
    preds = rng.integers(-1, 5, size=200)  # classes 3 and 4 are predicted but never true
    assert macro_f1(labels, preds) == pytest.approx(_sk_macro_f1(labels, preds))


def test_macro_f1_hand_worked() -> None:
    labels = np.array([0, 0, 1, UNKNOWN])
    preds = np.array([0, 1, 1, 1])
    # class 0: TP 1, FN 1 -> 2/3; class 1: TP 1, FP 2 -> 2/4; unknown: TP 0 -> 0
    assert macro_f1(labels, preds) == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)


# --- fixed --------------------------------------------------------------------------------------


def test_fixed_defaults_to_half_and_takes_value() -> None:
    scores, labels = np.zeros((5, 4)), np.zeros(5, dtype=int)
    np.testing.assert_array_equal(fixed(scores, labels), np.full(4, 0.5))
    np.testing.assert_array_equal(fixed(scores, labels, value=0.3), np.full(4, 0.3))


# --- precision ----------------------------------------------------------------------------------

# Class 0 one-vs-rest precision by threshold: 0.95:1/1 0.85:2/2 0.75:2/3 0.65:3/4 0.55:4/5 0.45:4/6
# Class 1 has a single positive scored below every negative: best precision 1/6 at 0.3.
# Class 2 has no positive image at all.
_P_SCORES = np.array(
    [
        [0.95, 0.9, 0.1],
        [0.85, 0.8, 0.1],
        [0.75, 0.3, 0.1],
        [0.65, 0.7, 0.1],
        [0.55, 0.6, 0.1],
        [0.45, 0.5, 0.1],
    ]
)
_P_LABELS = np.array([0, 0, 1, 0, 0, UNKNOWN])


def test_precision_picks_lowest_threshold_reaching_target() -> None:
    # 0.8 is reached at 0.95, 0.85 and 0.55 (precision is not monotone): the lowest is 0.55.
    assert precision(_P_SCORES, _P_LABELS, target_precision=0.8)[0] == 0.55
    assert precision(_P_SCORES, _P_LABELS, target_precision=1.0)[0] == 0.85
    assert precision(_P_SCORES, _P_LABELS, target_precision=0.75)[0] == 0.55
    assert precision(_P_SCORES, _P_LABELS, target_precision=0.5)[0] == 0.45


def test_precision_unreachable_target_uses_most_precise_threshold_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="opensig.thresholds"):
        thresholds = precision(_P_SCORES, _P_LABELS, target_precision=0.8)
    assert thresholds[1] == 0.3
    messages = [r.getMessage() for r in caplog.records]
    assert any("class 1 never reaches" in m for m in messages)
    assert not any(m.startswith("class 0") for m in messages)


def test_precision_class_without_positives_keeps_half_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="opensig.thresholds"):
        thresholds = precision(_P_SCORES, _P_LABELS, target_precision=0.8)
    assert thresholds[2] == 0.5
    assert any("class 2 has no positive" in r.getMessage() for r in caplog.records)


def test_precision_threshold_achieves_target_on_validation() -> None:
    scores, labels = _synthetic(2000, 4, seed=1, levels=(0.6, 0.8))
    thresholds = precision(scores, labels, target_precision=0.9)
    for k in range(4):
        accepted = scores[:, k] >= thresholds[k]
        assert np.mean(labels[accepted] == k) >= 0.9
        # The lowest qualifying threshold: one notch lower must miss the target.
        below = np.max(scores[:, k][scores[:, k] < thresholds[k]])
        assert np.mean(labels[scores[:, k] >= below] == k) < 0.9


# --- f1 -----------------------------------------------------------------------------------------


def test_f1_tuning_beats_fixed_half_on_synthetic_data() -> None:
    scores, labels = _synthetic(3000, 4, seed=2)
    baseline = _sk_macro_f1(labels, decide(scores, np.full(4, 0.5)))
    tuned = _sk_macro_f1(labels, decide(scores, f1(scores, labels)))
    assert tuned > baseline + 0.05


def _coarse_ties(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores on a 0.1 grid, so equal scores across passing classes are common."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 3, size=120)
    scores = rng.integers(0, 8, size=(120, 3)) / 10
    known = labels != UNKNOWN
    scores[known, labels[known]] = rng.integers(4, 11, size=known.sum()) / 10
    return scores, labels


@pytest.mark.parametrize(
    "data",
    [_synthetic(150, 3, seed=3), _coarse_ties(seed=5), _coarse_ties(seed=7)],
    ids=["continuous", "coarse-ties-5", "coarse-ties-7"],
)
def test_f1_tuning_is_coordinatewise_optimal_by_brute_force(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    """Checks the vectorised sweep against sklearn on every candidate, not just the chosen one."""
    scores, labels = data
    thresholds = f1(scores, labels, max_rounds=50)
    best = _sk_macro_f1(labels, decide(scores, thresholds))
    for k in range(3):
        values = np.unique(scores[:, k])
        for t in np.concatenate([values, (values[:-1] + values[1:]) / 2]):
            trial = thresholds.copy()
            trial[k] = t
            assert _sk_macro_f1(labels, decide(scores, trial)) <= best + 1e-9


def test_f1_tuning_handles_large_input() -> None:
    scores, labels = _synthetic(20000, 10, seed=4)
    thresholds = f1(scores, labels)
    assert thresholds.shape == (10,)
    assert np.all(np.isfinite(thresholds))
    baseline = macro_f1(labels, decide(scores, np.full(10, 0.5)))
    assert macro_f1(labels, decide(scores, thresholds)) > baseline


def test_f1_tuning_never_worse_than_half_when_already_good() -> None:
    # Well-separated scores: 0.5 is already perfect, tuning must not lose that.
    labels = np.array([0, 1, 2, UNKNOWN] * 10)
    scores = np.full((40, 3), 0.1)
    known = labels != UNKNOWN
    scores[known, labels[known]] = 0.9
    thresholds = f1(scores, labels)
    assert macro_f1(labels, decide(scores, thresholds)) == 1.0


# --- registry and dispatch ----------------------------------------------------------------------


def test_registry_names() -> None:
    assert {"fixed", "precision", "f1"} <= set(STRATEGIES)


def test_tune_thresholds_dispatches_and_filters_options() -> None:
    options = {"value": 0.3, "target_precision": 0.8}
    np.testing.assert_array_equal(
        tune_thresholds(_P_SCORES, _P_LABELS, "fixed", **options), np.full(3, 0.3)
    )
    np.testing.assert_array_equal(
        tune_thresholds(_P_SCORES, _P_LABELS, "precision", **options),
        precision(_P_SCORES, _P_LABELS, target_precision=0.8),
    )


def test_tune_thresholds_unknown_strategy_names_it_and_valid_ones() -> None:
    with pytest.raises(ValueError, match="no_such_strategy") as err:
        tune_thresholds(_P_SCORES, _P_LABELS, "no_such_strategy")
    assert "f1" in str(err.value)
    assert "precision" in str(err.value)


def test_strategies_reject_out_of_range_labels() -> None:
    with pytest.raises(ValueError):
        f1(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError):
        precision(np.zeros((2, 2)), np.array([-2, 0]))


def test_f1_keeps_the_highest_of_equally_good_thresholds() -> None:
    # Any class-0 threshold in (0.1, 0.8] and class-1 one in (0.2, 0.7] is perfect on this
    # validation set: the top of each range, the lowest own score, is kept (0.5 is among
    # them too, but validation has no novel unknowns and a lower threshold only lets more in).
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.9], [0.1, 0.7], [0.1, 0.1]])
    labels = np.array([0, 0, 1, 1, UNKNOWN])
    assert f1(scores, labels) == pytest.approx([0.8, 0.7])
    # One class: perfect in (0.6, 0.8], then in (0.1, 0.45]: the top of the range.
    one = np.array([0, 0, UNKNOWN, UNKNOWN])
    assert f1(np.array([[0.9], [0.8], [0.1], [0.6]]), one) == pytest.approx([0.8])
    assert f1(np.array([[0.45], [0.5], [0.1], [0.05]]), one) == pytest.approx([0.45])
    # Not separable: class 0's best macro-F1 is reached by every threshold in (0.3, 0.6]
    # (one unknown at 0.7 always passes, the one at 0.3 never should): the sweep keeps 0.6.
    scores = np.array([[0.9], [0.6], [0.7], [0.3], [0.05]])
    labels = np.array([0, 0, UNKNOWN, UNKNOWN, UNKNOWN])
    assert f1(scores, labels) == pytest.approx([0.6])
    # Multi-hot labels take the one-vs-rest thresholds, with the same rule.
    multi = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [0, 0]])
    assert f1(np.array([[0.9, 0.1], [0.8, 0.9], [0.2, 0.7], [0.1, 0.1], [0.3, 0.2]]), multi) == (
        pytest.approx([0.8, 0.7])
    )


def test_doc_by_hand() -> None:
    # Class 0's own scores 0.9 and 0.7: mirrored around 1, sigma = sqrt((0.01 + 0.09) / 2).
    # Class 1's own score 0.99: sigma = 0.01, so 1 - 3 * 0.01 = 0.97. Class 2 has no images.
    scores = np.array([[0.9, 0.2, 0.1], [0.7, 0.1, 0.0], [0.3, 0.99, 0.2], [0.6, 0.6, 0.6]])
    labels = np.array([0, 0, 1, UNKNOWN])
    got = tune_thresholds(scores, labels, "doc", doc_k=1.0)
    assert got[0] == pytest.approx(1 - np.sqrt(0.05))
    assert got[1] == pytest.approx(0.99)
    assert got[2] == 0.5
    # k = 3 pushes class 0 under the 0.5 floor; unknown images never move DOC thresholds
    got3 = tune_thresholds(scores, labels, "doc", doc_k=3.0)
    assert got3 == pytest.approx([0.5, 0.97, 0.5])


def test_f1_class_without_validation_images_keeps_half_and_warns(caplog) -> None:
    # class 2 has no image: predicting it can only add false positives, so a sweep would
    # raise its threshold until the class is never predicted, silencing it for good
    scores = np.array([[0.9, 0.1, 0.6], [0.2, 0.8, 0.7], [0.1, 0.2, 0.55], [0.7, 0.3, 0.1]])
    labels = np.array([0, 1, UNKNOWN, 0])
    with caplog.at_level("WARNING"):
        thresholds = f1(scores, labels)
    assert thresholds[2] == 0.5
    assert "class 2 has no validation images" in caplog.text
    assert decide(scores, thresholds).tolist()[:2] == [0, 1]


def test_f1_thresholds_stay_readable_where_validation_would_push_them_lower() -> None:
    """Each class's least typical known image scores 0.01 or 0.02 and every unknown less:
    macro-F1 on validation would take thresholds that low; f1 keeps to READABLE."""
    scores = np.array(
        [[0.9, 0.1], [0.8, 0.1], [0.01, 0.001], [0.1, 0.9], [0.1, 0.8], [0.001, 0.02]]
        + [[0.001, 0.003]] * 4
    )
    labels = np.array([0, 0, 0, 1, 1, 1] + [UNKNOWN] * 4)
    thresholds = f1(scores, labels)
    assert READABLE == (0.05, 0.95)
    assert ((thresholds >= READABLE[0]) & (thresholds <= READABLE[1])).all(), thresholds
    assert decide(scores, thresholds)[[2, 5]].tolist() == [UNKNOWN, UNKNOWN]
