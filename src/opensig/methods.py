"""Training methods: how labels become targets, which loss, how logits become class scores.

Labels are class indices 0..K-1 for known images and ``UNKNOWN`` (-1) for unknown ones.
Every method returns per-class scores in [0, 1] so that thresholds, the decision rule and
every metric apply unchanged, whatever the head was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opensig.thresholds import UNKNOWN


def sigmoid_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets for known images, all-zero for unknown ones, smoothed to eps / 1-eps.

    Written by hand because timm's BinaryCrossEntropy skips smoothing for dense targets,
    and an unknown image's all-zero row is exactly what a softmax head cannot express.
    """
    known = labels != UNKNOWN
    targets = torch.zeros(labels.shape[0], num_classes, dtype=torch.float32, device=labels.device)
    targets[known, labels[known]] = 1.0
    return targets * (1.0 - 2.0 * smoothing) + smoothing


def sample_weights(labels: torch.Tensor, unknown_weight: float) -> torch.Tensor:
    """Per-image loss weight: 1 for known images, ``unknown_weight`` for unknown ones."""
    weights = torch.ones(labels.shape[0], dtype=torch.float32, device=labels.device)
    weights[labels == UNKNOWN] = unknown_weight
    return weights


def weighted_bce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    smoothing: float = 0.0,
    unknown_weight: float = 1.0,
) -> torch.Tensor:
    """BCE-with-logits averaged over classes, then a weighted mean over the batch."""
    targets = sigmoid_targets(labels, logits.shape[1], smoothing)
    per_image = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").mean(
        dim=1
    )
    weights = sample_weights(labels, unknown_weight)
    return (per_image * weights).sum() / weights.sum().clamp_min(1e-12)


@dataclass(frozen=True)
class Method:
    """What a training method changes: the head's width, the loss, the score function."""

    name: str
    uses_unknown: bool

    def num_outputs(self, num_classes: int) -> int:
        return num_classes

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        smoothing: float = 0.0,
        unknown_weight: float = 1.0,
    ) -> torch.Tensor:
        return weighted_bce_loss(logits, labels, smoothing, unknown_weight)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class scores in [0, 1], shape (N, K)."""
        return torch.sigmoid(logits.float())


METHODS: dict[str, Method] = {
    "sigmoid_bce": Method("sigmoid_bce", uses_unknown=True),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
