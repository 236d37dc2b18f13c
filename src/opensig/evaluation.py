"""Score a bundle on a manifest split and compute the open-set metrics.

One function for the evaluate stage and for the champion/challenger comparison in
register, so both numbers come from the same code on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from opensig.data.manifest import label_indices
from opensig.metrics import open_set_metrics
from opensig.model import ModelSpec
from opensig.predict import Bundle, score_sources
from opensig.thresholds import decide


@dataclass
class Evaluation:
    metrics: dict
    scores: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    novel: np.ndarray


def score_rows(
    model: torch.nn.Module, spec: ModelSpec, rows: pd.DataFrame, batch_size: int
) -> np.ndarray:
    """Scores for manifest rows; an unreadable file here means the data changed since ingest."""
    scores, errors = score_sources(model, spec, rows["path"].tolist(), batch_size)
    bad = [(p, e) for p, e in zip(rows["path"], errors, strict=True) if e]
    if bad:
        raise RuntimeError(
            f"{len(bad)} image(s) from the manifest can no longer be read, e.g. {bad[0][0]}: "
            f"{bad[0][1]}; rerun `opensig ingest` (dvc repro)"
        )
    return scores


def evaluate_bundle(bundle: Bundle, rows: pd.DataFrame, batch_size: int = 256) -> Evaluation:
    """Metrics of ``bundle`` on manifest ``rows`` (known, unknown and novel unknown images)."""
    scores = score_rows(bundle.model, bundle.spec, rows, batch_size)
    labels = label_indices(rows["label"].tolist(), bundle.spec.classes)
    novel = rows["novel"].to_numpy(dtype=bool)
    metrics = open_set_metrics(scores, labels, bundle.thresholds, novel_mask=novel)
    return Evaluation(metrics, scores, labels, decide(scores, bundle.thresholds), novel)
