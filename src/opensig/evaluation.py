"""Score a bundle on a manifest split and compute the open-set metrics.

One function for the evaluate stage and for the champion/challenger comparison in
register (:func:`opensig.tracking.promotion.champion_judge`), so both numbers come from the
same code on the same images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from opensig.data.manifest import label_targets
from opensig.methods import get_method
from opensig.metrics import multilabel_metrics, open_set_metrics
from opensig.model import ModelSpec
from opensig.posthoc import Scorer
from opensig.predict import Bundle, run_scorer
from opensig.thresholds import decide, decide_multi

log = logging.getLogger(__name__)


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


def _readable(rows: pd.DataFrame, errors: list[str]) -> None:
    """An unreadable file among manifest rows means the data changed since ingest."""
    bad = [(p, e) for p, e in zip(rows["path"], errors, strict=True) if e]
    if bad:
        raise RuntimeError(
            f"{len(bad)} image(s) from the manifest can no longer be read, e.g. {bad[0][0]}: "
            f"{bad[0][1]}; rerun `opensig ingest` (dvc repro)"
        )


def score_rows(
    scorer: Scorer,
    spec: ModelSpec,
    rows: pd.DataFrame,
    batch_size: int,
    features: bool = False,
) -> list[np.ndarray]:
    """The scorer's outputs for manifest rows (:func:`opensig.predict.run_scorer`): the
    per-class scores, or with ``features`` the head scores and the penultimate features."""
    outputs, errors = run_scorer(scorer, spec, rows["path"].tolist(), batch_size, features=features)
    _readable(rows, errors)
    return outputs


def align_classes(
    scores: np.ndarray,
    thresholds: np.ndarray,
    model_classes: Sequence[str],
    classes: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A model's scores and thresholds in the columns of ``classes``, then of its own classes
    that ``classes`` lacks: (scores, thresholds, column names).

    How a champion trained on another class set is judged on today's data: a class it does
    not know scores 0 with an infinite threshold, so it is never decided and its images count
    as the model's mistakes (it cannot name them); a class of its own that today's data lacks
    stays a column it may still decide, wrongly, since no image has that label.
    """
    columns = [*classes, *(c for c in model_classes if c not in classes)]
    source = {name: k for k, name in enumerate(model_classes)}
    aligned = np.zeros((len(scores), len(columns)), dtype=np.asarray(scores).dtype)
    limits = np.full(len(columns), np.inf)
    for j, name in enumerate(columns):
        if name in source:
            aligned[:, j] = scores[:, source[name]]
            limits[j] = thresholds[source[name]]
    return aligned, limits, columns


def evaluate_bundle(
    bundle: Bundle,
    rows: pd.DataFrame,
    batch_size: int = 256,
    multi_label: bool = False,
    classes: Sequence[str] | None = None,
) -> Evaluation:
    """Metrics of ``bundle`` on manifest ``rows`` (known, unknown and novel unknown images).

    ``multi_label`` (the manifest has images of several classes): every class that passes
    its threshold is a decision, and the metrics are per class plus subset accuracy.
    ``classes``: judge the bundle on this class list instead of its own (see
    :func:`align_classes`), as the promotion gate does with a champion of another class set.
    """
    scorer = Scorer(bundle.model, get_method(bundle.spec.method), bundle.feature_score)
    (scores,) = score_rows(scorer, bundle.spec, rows, batch_size)
    thresholds = bundle.thresholds
    if classes is None:
        classes = bundle.spec.classes
    else:
        scores, thresholds, classes = align_classes(
            scores, thresholds, bundle.spec.classes, classes
        )
    novel = rows["novel"].to_numpy(dtype=bool)
    labels = label_targets(rows["label"], classes, multi_label)
    if multi_label:
        metrics = multilabel_metrics(scores, labels, thresholds, classes, novel_mask=novel)
        preds = decide_multi(scores, thresholds)
    else:
        metrics = open_set_metrics(scores, labels, thresholds, novel_mask=novel)
        preds = decide(scores, thresholds)
    return Evaluation(metrics, scores, labels, preds, novel, rows, classes, thresholds, multi_label)
