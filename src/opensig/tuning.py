"""What the tune stage fits on a trained model: the feature score (on the known training
images, its CDFs and its calibration on the validation images), then one threshold per class
on the validation scores it gives. Never the test split."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from opensig.data.manifest import label_targets
from opensig.evaluation import score_rows
from opensig.labels import UNKNOWN_LABEL
from opensig.methods import get_method
from opensig.model import ModelSpec
from opensig.posthoc import USES_UNKNOWN, FeatureScore, Scorer, fit_feature_score
from opensig.thresholds import tune_thresholds

log = logging.getLogger(__name__)


def fit_decision(
    *,
    model: torch.nn.Module,
    spec: ModelSpec,
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    multi_label: bool,
    strategy: str,
    options: dict,
    feature_score: str = "mahalanobis",
    knn_k: int = 50,
    feature_weight: float = 0.5,
    batch_size: int = 256,
) -> tuple[np.ndarray, FeatureScore | None]:
    """The thresholds (one per class, by ``strategy`` with its ``options``) and the fitted
    feature score they were tuned on (None: the head's scores as they are).

    Multi-label data keeps the head's scores (``none``): the feature score's class means
    need images of one class each.
    """
    val_labels = label_targets(val_rows["label"], spec.classes, multi_label)
    if feature_score != "none" and multi_label:
        log.warning("tune.feature_score %s is not used on multi-label data", feature_score)
        feature_score = "none"
    head = Scorer(model, get_method(spec.method))
    if feature_score == "none":
        (scores,) = score_rows(head, spec, val_rows, batch_size)
        return tune_thresholds(scores, val_labels, strategy, **options), None
    is_unknown = train_rows["label"] == UNKNOWN_LABEL
    train_known = train_rows[~is_unknown]
    _, train_features = score_rows(head, spec, train_known, batch_size, features=True)
    unknown_features = None
    if feature_score in USES_UNKNOWN and is_unknown.any():
        _, unknown_features = score_rows(
            head, spec, train_rows[is_unknown], batch_size, features=True
        )
    val_head, val_features = score_rows(head, spec, val_rows, batch_size, features=True)
    fitted = fit_feature_score(
        feature_score,
        train_features,
        label_targets(train_known["label"], spec.classes, False),
        val_head,
        val_features,
        val_labels,
        spec.num_classes,
        knn_k,
        feature_weight,
        unknown_features,
    )
    with torch.no_grad():
        scores = fitted(torch.from_numpy(val_head), torch.from_numpy(val_features)).numpy()
    return tune_thresholds(scores, val_labels, strategy, **options), fitted
