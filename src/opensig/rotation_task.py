"""Rotation prediction: a self-supervised task trained beside the classes (``train.rotation_loss``).

Each training batch gets turned copies of half its images (90, 180 or 270 degrees), and a
small head on the penultimate features learns, for the images and the copies alike, by how
many quarter turns each was turned (Hendrycks et al. 2019, "Using self-supervised learning
can improve model robustness and uncertainty"). To answer, the network has to encode the
layout of a shape, not only its texture: the detail that tells a novel class from the known
class it resembles. The copies are not labelled unknown (``train.rotated_unknowns`` does
that), so where a class looks the same turned (the digits 0, 1, 8) nothing contradicts its
class: only the turn is ambiguous there.

The head lives in training only: the saved model, predict, the served model and ONNX hold
the classifier alone, and validation's loss is the method's loss alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opensig.model import features_and_logits

TURNED_SHARE = 0.5  # copies of half the batch: 1.5x the images per step, about 1.3x its time
TURNS = 4  # the head's outputs: 0, 90, 180 and 270 degrees


def turned_copies(
    images: torch.Tensor, share: float = TURNED_SHARE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of ``share`` of the images, each turned 1, 2 or 3 quarter turns (evenly drawn),
    and those turn counts. Draws from torch's global RNG, which the loop seeds per epoch.

    Square images only: a turned copy must stack with the batch.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"train.rotation_loss turns images by 90 degrees and needs square ones, got "
            f"{tuple(images.shape[-2:])}; set it to 0"
        )
    chosen = torch.randperm(images.shape[0], device=images.device)
    chosen = chosen[: round(share * images.shape[0])]
    turns = torch.randint(1, TURNS, (chosen.numel(),), device=images.device)
    copies = images[chosen]
    for k in range(1, TURNS):
        picked = turns == k
        copies[picked] = torch.rot90(copies[picked], k, dims=(-2, -1))
    return copies, turns


class WithRotationHead(torch.nn.Module):
    """The network and a linear rotation head on its penultimate features, one module, so
    the optimizer, DistributedDataParallel and ``torch.compile`` see both.

    ``model(images)`` is the network's forward; ``model(images, copies)`` runs one pass over
    both and returns the logits of ``images`` and every image's turn logits (``images``
    first, then ``copies``).
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        width = getattr(net, "head_hidden_size", None) or net.num_features
        self.head = torch.nn.Linear(width, TURNS)

    def forward(
        self, images: torch.Tensor, copies: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if copies is None:
            return self.net(images)
        features, logits = features_and_logits(self.net, torch.cat([images, copies]))
        return logits[: images.shape[0]], self.head(features)


def rotation_loss(turn_logits: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the turn: the first ``len(turn_logits) - len(turns)`` rows are the
    upright images (turn 0), the rest the copies turned ``turns`` quarter turns."""
    upright = turn_logits.shape[0] - turns.shape[0]
    targets = torch.cat([turns.new_zeros(upright), turns])
    return F.cross_entropy(turn_logits.float(), targets)
