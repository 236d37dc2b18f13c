"""Training methods: how labels become targets, which loss, how logits become class scores.

Labels are class indices 0..K-1 for known images and ``UNKNOWN`` (-1) for unknown ones.
Every method returns per-class scores in [0, 1], shape (N, K), so that thresholds, the
decision rule and every metric apply unchanged, whatever the head was trained with:

- ``sigmoid_bce`` (opensig's): sigmoid head + BCE; unknown images get an all-zero target.
- ``sigmoid_bce_known_only``: the same without unknown images (what the unknowns bring).
- ``softmax_msp``: softmax + cross-entropy on known images; score = softmax probability
  (max-softmax baseline, Hendrycks & Gimpel 2017).
- ``softmax_maxlogit``: the same model; score = sigmoid(logit), which ranks images exactly
  as the max logit does (Vaze et al. 2022) while staying in [0, 1] for thresholds.
- ``softmax_kplus1``: unknown images form an extra "garbage" class K; score = the softmax
  probabilities of the K real classes.
- ``softmax_eos``: entropic open-set loss / outlier exposure: an unknown image's target is
  the uniform distribution over the K classes (Dhamija et al. 2018; Hendrycks et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opensig.labels import UNKNOWN


def sigmoid_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets for known images, all-zero for unknown ones, smoothed to eps / 1-eps.
    Multi-hot ``labels`` (N, K), for images of several classes, are the targets as they are.

    Written by hand because timm's BinaryCrossEntropy skips smoothing for dense targets,
    and an unknown image's all-zero row is exactly what a softmax head cannot express.
    """
    if labels.ndim == 2:
        targets = labels.to(torch.float32)
    else:
        known = labels != UNKNOWN
        targets = torch.zeros(
            labels.shape[0], num_classes, dtype=torch.float32, device=labels.device
        )
        targets[known, labels[known]] = 1.0
    return targets * (1.0 - 2.0 * smoothing) + smoothing


def softmax_targets(
    labels: torch.Tensor, num_classes: int, smoothing: float = 0.0, unknown_class: bool = False
) -> torch.Tensor:
    """Distributions over the outputs: one-hot (smoothed) for known images; for unknown ones
    the extra class K (``unknown_class``) or else the uniform distribution (entropic loss)."""
    width = num_classes + int(unknown_class)
    known = labels != UNKNOWN
    targets = torch.zeros(labels.shape[0], width, dtype=torch.float32, device=labels.device)
    targets[known, labels[known]] = 1.0
    if unknown_class:
        targets[~known, num_classes] = 1.0
    else:
        targets[~known] = 1.0 / num_classes
    return targets * (1.0 - smoothing) + smoothing / width


def is_unknown(labels: torch.Tensor) -> torch.Tensor:
    """(N,) which images are unknown: label UNKNOWN, or an all-zero multi-hot row."""
    return labels.sum(dim=1) == 0 if labels.ndim == 2 else labels == UNKNOWN


def sample_weights(labels: torch.Tensor, unknown_weight: float) -> torch.Tensor:
    """Per-image loss weight: 1 for known images, ``unknown_weight`` for unknown ones."""
    unknown = is_unknown(labels)
    weights = torch.ones(labels.shape[0], dtype=torch.float32, device=labels.device)
    weights[unknown] = unknown_weight
    return weights


def mix_unknowns(
    images: torch.Tensor, labels: torch.Tensor, share: float, low: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic unknown images: ``share`` of the batch replaced by blends of two known images
    of different classes, ``lam * a + (1 - lam) * b`` with ``lam`` uniform in [low, 1 - low],
    labelled unknown (every method's unknown target: all-zero, the extra class, or uniform).

    Why: the unknowns in the data cover some of what lies between the classes; blends cover
    more of it at no cost. Draws from torch's global RNG, which the loop seeds per epoch.
    Returns new tensors; the inputs are not changed.
    """
    if share <= 0:
        return images, labels
    known = ~is_unknown(labels)
    first = torch.nonzero(known).flatten()
    first = first[torch.randperm(first.numel(), device=first.device)]
    second = first.roll(1)  # each image's partner: the next in a random order, never itself
    different = (
        (labels[first] != labels[second]).any(dim=1)
        if labels.ndim == 2
        else labels[first] != labels[second]
    )
    count = min(round(share * labels.shape[0]), int(different.sum()))
    first, second = first[different][:count], second[different][:count]
    lam = torch.empty(count, device=images.device).uniform_(low, 1.0 - low)
    lam = lam.view(-1, *([1] * (images.ndim - 1)))
    images, labels = images.clone(), labels.clone()
    images[first] = lam * images[first] + (1.0 - lam) * images[second]
    labels[first] = 0 if labels.ndim == 2 else UNKNOWN
    return images, labels


def rotate_unknowns(
    images: torch.Tensor, labels: torch.Tensor, share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic unknown images: ``share`` of the batch replaced by known images turned a
    quarter turn (90 or 270 degrees, evenly), labelled unknown.

    Why: where every image shows its object upright (products, garments), a turned known
    image is unlike every class in shape, not in texture, so the network has to encode the
    shape's layout to reject it: the detail that tells a novel class from the known one it
    resembles (a shift of the input, as in Tack et al. 2020, "CSI"). Not half a turn: it
    leaves 0, 1, 8, bags and trousers much the same, so those copies contradict their class
    (with it the demo's macro-F1 fell 0.933 -> 0.835; quarter turns only: 0.941;
    bench/README.md, Recipe ablations). Only for upright data (not aerial or microscope
    images). Needs square images. Draws from torch's global RNG; returns new tensors.
    """
    if share <= 0:
        return images, labels
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"train.rotated_unknowns turns images by 90 degrees and needs square ones, got "
            f"{tuple(images.shape[-2:])}; set it to 0"
        )
    known = ~is_unknown(labels)
    chosen = torch.nonzero(known).flatten()
    chosen = chosen[torch.randperm(chosen.numel(), device=chosen.device)]
    chosen = chosen[: round(share * labels.shape[0])]
    turns = 1 + 2 * torch.randint(0, 2, (chosen.numel(),), device=chosen.device)
    images, labels = images.clone(), labels.clone()
    for k in (1, 3):
        picked = chosen[turns == k]
        images[picked] = torch.rot90(images[picked], k, dims=(-2, -1))
    labels[chosen] = 0 if labels.ndim == 2 else UNKNOWN
    return images, labels


def _weighted_mean(per_image: torch.Tensor, labels: torch.Tensor, unknown_weight: float):
    weights = sample_weights(labels, unknown_weight)
    return (per_image * weights).sum() / weights.sum().clamp_min(1e-12)


def weighted_bce_loss(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0, unknown_weight: float = 1.0
) -> torch.Tensor:
    """BCE-with-logits averaged over classes, then a weighted mean over the batch."""
    targets = sigmoid_targets(labels, logits.shape[1], smoothing)
    per_image = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    return _weighted_mean(per_image.mean(dim=1), labels, unknown_weight)


def weighted_softmax_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    smoothing: float = 0.0,
    unknown_weight: float = 1.0,
    unknown_class: bool = False,
) -> torch.Tensor:
    """Cross-entropy against ``softmax_targets``, then a weighted mean over the batch."""
    num_classes = logits.shape[1] - int(unknown_class)
    targets = softmax_targets(labels, num_classes, smoothing, unknown_class)
    per_image = -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return _weighted_mean(per_image, labels, unknown_weight)


def _softmax_scores(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1)[:, :num_classes]


def _sigmoid_scores(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.sigmoid(logits.float())[:, :num_classes]


def _kplus1_loss(logits, labels, smoothing=0.0, unknown_weight=1.0):
    return weighted_softmax_loss(logits, labels, smoothing, unknown_weight, unknown_class=True)


@dataclass(frozen=True)
class Method:
    """What a training method changes: head width, whether unknowns train, loss, scores,
    and whether it can learn multi-label targets (independent sigmoids can; a softmax cannot)."""

    name: str
    uses_unknown: bool
    loss: Callable[..., torch.Tensor]
    score_fn: Callable[[torch.Tensor, int], torch.Tensor]
    extra_outputs: int = 0
    multi_label: bool = False

    def num_outputs(self, num_classes: int) -> int:
        return num_classes + self.extra_outputs

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class scores in [0, 1], shape (N, K)."""
        return self.score_fn(logits, logits.shape[1] - self.extra_outputs)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("sigmoid_bce", True, weighted_bce_loss, _sigmoid_scores, multi_label=True),
        Method(
            "sigmoid_bce_known_only", False, weighted_bce_loss, _sigmoid_scores, multi_label=True
        ),
        Method("softmax_msp", False, weighted_softmax_loss, _softmax_scores),
        Method("softmax_maxlogit", False, weighted_softmax_loss, _sigmoid_scores),
        Method("softmax_kplus1", True, _kplus1_loss, _softmax_scores, extra_outputs=1),
        Method("softmax_eos", True, weighted_softmax_loss, _softmax_scores),
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
