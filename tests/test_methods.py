"""Tests for targets, weights, the weighted BCE loss and the method registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opensig.labels import UNKNOWN
from opensig.methods import (
    METHODS,
    Method,
    get_method,
    mix_unknowns,
    rotate_unknowns,
    sample_weights,
    sigmoid_targets,
    softmax_targets,
    weighted_bce_loss,
)


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


@pytest.mark.parametrize("name", [name for name, m in METHODS.items() if m.uses_unknown])
def test_unknown_minus_one_is_never_read_as_a_class_index(name: str) -> None:
    """UNKNOWN is -1, which as an index picks the last class: each method that trains on
    unknown images gives one a loss of its own, not the loss of any known class."""
    assert UNKNOWN == -1
    method = get_method(name)
    logits = torch.tensor([[1.5, -0.5, 0.25, -1.0]])[:, : method.num_outputs(3)]
    as_unknown = method.loss(logits, torch.tensor([UNKNOWN]))
    for k in range(3):
        as_class = method.loss(logits, torch.tensor([k]))
        assert not torch.isclose(as_unknown, as_class, rtol=1e-3), (name, k)


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


# --- softmax baselines -------------------------------------------------------------------


def test_softmax_targets_known_unknown_kplus1_and_smoothing() -> None:
    labels = torch.tensor([1, UNKNOWN])
    uniform = softmax_targets(labels, 3)
    torch.testing.assert_close(uniform, torch.tensor([[0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    garbage = softmax_targets(labels, 3, unknown_class=True)
    torch.testing.assert_close(garbage, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    smoothed = softmax_targets(torch.tensor([0]), 4, smoothing=0.2)
    torch.testing.assert_close(smoothed, torch.tensor([[0.85, 0.05, 0.05, 0.05]]))


def test_entropic_loss_of_an_unknown_image_by_hand() -> None:
    # Uniform target over K=2: loss = -(log p0 + log p1) / 2 with p = softmax([1, 0]).
    logits = torch.tensor([[1.0, 0.0]])
    p = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    expected = -np.log(p).mean()
    loss = get_method("softmax_eos").loss(logits, torch.tensor([UNKNOWN]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_kplus1_loss_is_cross_entropy_with_the_garbage_class() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = torch.tensor([0, UNKNOWN])
    expected = F.cross_entropy(logits, torch.tensor([0, 2]))
    loss = get_method("softmax_kplus1").loss(logits, labels)
    torch.testing.assert_close(loss, expected)
    weighted = get_method("softmax_kplus1").loss(logits, labels, unknown_weight=3.0)
    per_image = F.cross_entropy(logits, torch.tensor([0, 2]), reduction="none")
    torch.testing.assert_close(weighted, (per_image[0] + 3 * per_image[1]) / 4)


def test_msp_loss_is_plain_cross_entropy_with_label_smoothing() -> None:
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 1])
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(get_method("softmax_msp").loss(logits, labels, 0.1), expected)


def test_scores_per_method_are_k_wide_and_in_unit_interval() -> None:
    logits = torch.tensor([[3.0, 1.0, -2.0, 0.5]])
    msp = get_method("softmax_msp").scores(logits)
    torch.testing.assert_close(msp, torch.softmax(logits, dim=1))
    maxlogit = get_method("softmax_maxlogit").scores(logits)
    assert maxlogit.argmax().item() == logits.argmax().item()  # ranks as the max logit does
    kplus1 = get_method("softmax_kplus1").scores(logits)
    assert kplus1.shape == (1, 3)  # the garbage class is not a class score
    torch.testing.assert_close(kplus1, torch.softmax(logits, dim=1)[:, :3])
    assert get_method("softmax_kplus1").num_outputs(3) == 4


def test_known_only_methods_do_not_train_on_unknowns() -> None:
    uses = {name: m.uses_unknown for name, m in METHODS.items()}
    assert uses == {
        "sigmoid_bce": True,
        "sigmoid_bce_known_only": False,
        "softmax_msp": False,
        "softmax_maxlogit": False,
        "softmax_kplus1": True,
        "softmax_eos": True,
    }


def test_config_accepts_exactly_the_registered_methods() -> None:
    from typing import get_args

    from opensig.config import TrainConfig

    assert set(get_args(TrainConfig.model_fields["method"].annotation)) == set(METHODS)


def test_mixed_unknowns_blend_two_classes_into_an_unknown_by_hand() -> None:
    # one image per class, constant pixels 0, 10, 20: any blend of two of them is lam*a +
    # (1 - lam)*b with lam in [0.3, 0.7], so its pixel value says which pair was blended
    images = torch.tensor([0.0, 10.0, 20.0, 5.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    labels = torch.tensor([0, 1, 2, UNKNOWN])
    torch.manual_seed(0)
    mixed, targets = mix_unknowns(images, labels, share=0.5)
    assert mixed.shape == images.shape and torch.equal(labels, torch.tensor([0, 1, 2, UNKNOWN]))
    changed = (targets != labels).nonzero().flatten().tolist()
    assert len(changed) == 2 and all(i < 3 for i in changed)  # 2 of 4; never the unknown
    assert (targets[changed] == UNKNOWN).all()
    for i in changed:
        value = float(mixed[i, 0, 0, 0])
        pairs = [
            (a, b) for a in (0.0, 10.0, 20.0) for b in (0.0, 10.0, 20.0) if a == i * 10.0 and b != a
        ]
        assert any(
            min(0.3 * a + 0.7 * b, 0.7 * a + 0.3 * b) - 1e-5
            <= value
            <= max(0.3 * a + 0.7 * b, 0.7 * a + 0.3 * b) + 1e-5
            for a, b in pairs
        )
    untouched = [i for i in range(4) if i not in changed]
    assert torch.equal(mixed[untouched], images[untouched])


def test_mixed_unknowns_off_and_for_multi_hot_labels() -> None:
    images = torch.rand(4, 1, 2, 2)
    labels = torch.tensor([0, 1, 0, 1])
    same, kept = mix_unknowns(images, labels, share=0.0)
    assert same is images and kept is labels
    multi = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    torch.manual_seed(1)
    _, targets = mix_unknowns(images, multi, share=0.25)
    assert (targets.sum(dim=1) == 0).sum() == 2  # the all-zero row, plus one blend
    # a batch of one class has no pair to blend: nothing changes
    _, single = mix_unknowns(images, torch.zeros(4, dtype=torch.long), share=0.5)
    assert (single == 0).all()


def test_rotated_unknowns_turn_known_images_a_quarter_turn_by_hand() -> None:
    # distinct pixels, so a turned image is one of the two quarter turns of its own original
    # (never the half turn, which leaves symmetric objects the same)
    images = torch.arange(6 * 9, dtype=torch.float32).view(6, 1, 3, 3)
    labels = torch.tensor([0, 1, 2, 0, UNKNOWN, 1])
    torch.manual_seed(0)
    turned, targets = rotate_unknowns(images, labels, share=0.5)
    changed = (targets != labels).nonzero().flatten().tolist()
    assert len(changed) == 3 and 4 not in changed and (targets[changed] == UNKNOWN).all()
    for i in changed:
        turns = [torch.rot90(images[i], k, dims=(-2, -1)) for k in (1, 3)]
        assert any(torch.equal(turned[i], t) for t in turns), i
    untouched = [i for i in range(6) if i not in changed]
    assert torch.equal(turned[untouched], images[untouched])
    assert torch.equal(labels, torch.tensor([0, 1, 2, 0, UNKNOWN, 1]))  # inputs left alone
    # every image of a batch turned: a quarter turn each, both ways, never the half turn
    many = torch.arange(40 * 9, dtype=torch.float32).view(40, 1, 3, 3)
    turned, _ = rotate_unknowns(many, torch.zeros(40, dtype=torch.long), share=1.0)
    same_as = {
        k: (turned == torch.rot90(many, k, dims=(-2, -1))).flatten(1).all(1) for k in (1, 2, 3)
    }
    assert (same_as[1] | same_as[3]).all() and same_as[1].any() and same_as[3].any()
    assert not same_as[2].any()


def test_rotated_unknowns_off_multi_hot_and_square_images_only() -> None:
    images = torch.rand(4, 1, 2, 2)
    labels = torch.tensor([0, 1, 0, 1])
    same, kept = rotate_unknowns(images, labels, share=0.0)
    assert same is images and kept is labels
    multi = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    _, targets = rotate_unknowns(images, multi, share=0.5)
    assert (targets.sum(dim=1) == 0).sum() == 3  # the all-zero row, plus two turned
    with pytest.raises(ValueError, match=r"train.rotated_unknowns.*square.*\(2, 3\)"):
        rotate_unknowns(torch.rand(4, 1, 2, 3), labels, share=0.5)
