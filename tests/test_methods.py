"""Tests for targets, weights, the weighted BCE loss and the method registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opensig.methods import (
    METHODS,
    Method,
    get_method,
    sample_weights,
    sigmoid_targets,
    weighted_bce_loss,
)
from opensig.thresholds import UNKNOWN


def _labels() -> torch.Tensor:
    return torch.tensor([0, 2, UNKNOWN, 1], dtype=torch.long)


def _logits() -> torch.Tensor:
    return torch.tensor(
        [
            [2.0, -1.0, 0.5],
            [-0.3, 0.7, 1.5],
            [0.2, -2.0, 3.0],
            [-1.0, 4.0, -0.5],
        ]
    )


def _np_bce(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Numerically stable BCE-with-logits, elementwise, in float64."""
    return np.maximum(x, 0.0) - x * t + np.log1p(np.exp(-np.abs(x)))


def test_unknown_is_minus_one() -> None:
    assert UNKNOWN == -1


def test_sigmoid_targets_one_hot_and_zero_row() -> None:
    targets = sigmoid_targets(_labels(), 3)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert targets.dtype == torch.float32
    assert torch.equal(targets, expected)


def test_sigmoid_targets_smoothing_exact() -> None:
    eps = 0.25  # exactly representable: eps and 1 - eps must come out exact
    targets = sigmoid_targets(_labels(), 3, smoothing=eps)
    hard = sigmoid_targets(_labels(), 3)
    assert torch.equal(targets, torch.where(hard == 1.0, 1.0 - eps, eps))
    assert torch.equal(targets[2], torch.full((3,), eps))


def test_sigmoid_targets_smoothing_small_eps() -> None:
    eps = 0.1
    targets = sigmoid_targets(_labels(), 3, smoothing=eps)
    hard = sigmoid_targets(_labels(), 3)
    expected = torch.where(hard == 1.0, 1.0 - eps, eps).float()
    torch.testing.assert_close(targets, expected, rtol=0.0, atol=1e-7)
    assert targets.unique().tolist() == pytest.approx([0.1, 0.9], abs=1e-7)


def test_sample_weights() -> None:
    weights = sample_weights(_labels(), unknown_weight=0.3)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.0, 0.3, 1.0]))
    assert torch.equal(sample_weights(_labels(), 1.0), torch.ones(4))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("unknown_weight", [0.5, 2.0])
def test_weighted_bce_matches_numpy(smoothing: float, unknown_weight: float) -> None:
    logits, labels = _logits(), _labels()
    x = logits.numpy().astype(np.float64)
    t = np.zeros_like(x)
    for row, label in enumerate(labels.tolist()):
        if label != UNKNOWN:
            t[row, label] = 1.0
    t = t * (1.0 - 2.0 * smoothing) + smoothing
    w = np.where(labels.numpy() == UNKNOWN, unknown_weight, 1.0)
    expected = float((_np_bce(x, t).mean(axis=1) * w).sum() / w.sum())

    loss = weighted_bce_loss(logits, labels, smoothing=smoothing, unknown_weight=unknown_weight)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_matches_torch() -> None:
    logits, labels = _logits(), _labels()
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    per_image = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    weights = torch.tensor([1.0, 1.0, 3.0, 1.0])
    expected = (per_image * weights).sum() / weights.sum()
    loss = weighted_bce_loss(logits, labels, unknown_weight=3.0)
    torch.testing.assert_close(loss, expected)
    # unknown_weight matters: the default weighting gives a different value
    assert not torch.isclose(loss, weighted_bce_loss(logits, labels))


def test_weighted_bce_unknown_weight_zero_ignores_unknown() -> None:
    logits, labels = _logits(), _labels()
    known = labels != UNKNOWN
    loss = weighted_bce_loss(logits, labels, unknown_weight=0.0)
    torch.testing.assert_close(loss, weighted_bce_loss(logits[known], labels[known]))


def test_weighted_bce_all_unknown_zero_weight_is_finite() -> None:
    labels = torch.full((3,), UNKNOWN, dtype=torch.long)
    loss = weighted_bce_loss(torch.randn(3, 4), labels, unknown_weight=0.0)
    assert torch.isfinite(loss)
    assert loss.item() == 0.0


def test_weighted_bce_half_logits_and_grad() -> None:
    logits = _logits().half().requires_grad_(True)
    loss = weighted_bce_loss(logits, _labels(), unknown_weight=0.5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad.float()).all()
    # pushing the unknown image's logits down must lower its loss
    assert (logits.grad[2].float() > 0).all()


def test_get_method() -> None:
    method = get_method("sigmoid_bce")
    assert isinstance(method, Method)
    assert method is METHODS["sigmoid_bce"]
    assert method.uses_unknown
    assert method.num_outputs(7) == 7


def test_get_method_unknown_name() -> None:
    with pytest.raises(ValueError, match="softmax_ce") as info:
        get_method("softmax_ce")
    assert "sigmoid_bce" in str(info.value)


def test_method_scores_is_sigmoid() -> None:
    logits = _logits()
    scores = get_method("sigmoid_bce").scores(logits.half())
    assert scores.dtype == torch.float32
    assert scores.shape == logits.shape
    torch.testing.assert_close(scores, torch.sigmoid(logits), atol=1e-3, rtol=0.0)
    torch.testing.assert_close(get_method("sigmoid_bce").scores(logits), torch.sigmoid(logits))
    assert ((scores >= 0) & (scores <= 1)).all()


def test_method_loss_delegates() -> None:
    logits, labels = _logits(), _labels()
    method = get_method("sigmoid_bce")
    torch.testing.assert_close(
        method.loss(logits, labels, 0.1, 2.0), weighted_bce_loss(logits, labels, 0.1, 2.0)
    )
