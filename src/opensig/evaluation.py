"""Score a bundle on a manifest split and compute the open-set metrics.

One function for the evaluate stage and for the champion/challenger comparison in
register, so both numbers come from the same code on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from opensig.data.manifest import label_targets
from opensig.metrics import multilabel_metrics, open_set_metrics
from opensig.model import ModelSpec
from opensig.predict import Bundle, score_sources
from opensig.thresholds import decide, decide_multi


@dataclass
class Evaluation:
    """Metrics, and per image (in the order of ``rows``) what the pictures are drawn from."""

    metrics: dict
    scores: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    novel: np.ndarray
    rows: pd.DataFrame  # the manifest rows: path, label, source, ...
    classes: list[str]
    thresholds: np.ndarray
    multi_label: bool = False  # then labels and preds are (N, K) multi-hot, not class indices


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


def evaluate_bundle(
    bundle: Bundle, rows: pd.DataFrame, batch_size: int = 256, multi_label: bool = False
) -> Evaluation:
    """Metrics of ``bundle`` on manifest ``rows`` (known, unknown and novel unknown images).

    ``multi_label`` (the manifest has images of several classes): every class that passes
    its threshold is a decision, and the metrics are per class plus subset accuracy.
    """
    scores = score_rows(bundle.model, bundle.spec, rows, batch_size)
    classes, thresholds = bundle.spec.classes, bundle.thresholds
    novel = rows["novel"].to_numpy(dtype=bool)
    labels = label_targets(rows["label"], classes, multi_label)
    if multi_label:
        metrics = multilabel_metrics(scores, labels, thresholds, classes, novel_mask=novel)
        preds = decide_multi(scores, thresholds)
    else:
        metrics = open_set_metrics(scores, labels, thresholds, novel_mask=novel)
        preds = decide(scores, thresholds)
    return Evaluation(metrics, scores, labels, preds, novel, rows, classes, thresholds, multi_label)
