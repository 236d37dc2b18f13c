"""Score a bundle on a manifest split and compute the open-set metrics.

One function for the evaluate stage and for the champion/challenger comparison in
register, so both numbers come from the same code on the same images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from opensig.config import Config
from opensig.data.manifest import label_targets
from opensig.labels import UNKNOWN, UNKNOWN_LABEL
from opensig.methods import get_method
from opensig.metrics import multilabel_metrics, open_set_metrics
from opensig.model import ModelSpec
from opensig.posthoc import FeatureScore, Scorer, fit_feature_score
from opensig.predict import Bundle, resolve_model_dir, run_scorer
from opensig.thresholds import decide, decide_multi, tune_thresholds

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


def score_rows(bundle: Bundle, rows: pd.DataFrame, batch_size: int) -> np.ndarray:
    """Per-class scores (N, K) for manifest rows, as the bundle's thresholds expect them."""
    scores, errors = bundle.score(rows["path"].tolist(), batch_size)
    _readable(rows, errors)
    return scores


def head_and_features(
    model: torch.nn.Module, spec: ModelSpec, rows: pd.DataFrame, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The method's per-class scores (N, K) and the penultimate features (N, D) of rows."""
    scorer = Scorer(model, get_method(spec.method))
    (head, features), errors = run_scorer(
        scorer, spec, rows["path"].tolist(), batch_size, features=True
    )
    _readable(rows, errors)
    return head, features


def fit_decision(
    model: torch.nn.Module,
    spec: ModelSpec,
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    multi_label: bool,
    strategy: str,
    options: dict,
    feature_score: str = "mahalanobis",
    knn_k: int = 50,
    batch_size: int = 256,
) -> tuple[np.ndarray, FeatureScore | None]:
    """What tune fits: the feature score (on the known training images, its CDFs on the known
    validation images), then the thresholds on the validation scores it gives.

    Multi-label data keeps the head's scores (``none``): the feature score's class means
    need images of one class each.
    """
    val_labels = label_targets(val_rows["label"], spec.classes, multi_label)
    if feature_score != "none" and multi_label:
        log.warning("tune.feature_score %s is not used on multi-label data", feature_score)
        feature_score = "none"
    if feature_score == "none":
        scores = score_rows(Bundle(model, spec, np.zeros(spec.num_classes)), val_rows, batch_size)
        return tune_thresholds(scores, val_labels, strategy, **options), None
    train_known = train_rows[train_rows["label"] != UNKNOWN_LABEL]
    _, train_features = head_and_features(model, spec, train_known, batch_size)
    val_head, val_features = head_and_features(model, spec, val_rows, batch_size)
    fitted = fit_feature_score(
        feature_score,
        train_features,
        label_targets(train_known["label"], spec.classes, False),
        val_head,
        val_features,
        val_labels != UNKNOWN,
        spec.num_classes,
        knn_k,
    )
    with torch.no_grad():
        scores = fitted(torch.from_numpy(val_head), torch.from_numpy(val_features)).numpy()
    return tune_thresholds(scores, val_labels, strategy, **options), fitted


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
    scores = score_rows(bundle, rows, batch_size)
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


ChampionJudge = Callable[[str, Sequence[str]], tuple[dict, list[str]]]
"""(version, today's classes) -> (its metrics on today's test split and classes, its own
classes): how register's promotion gate measures the champion."""


def champion_judge(
    cfg: Config, tracking_uri: str | None, rows: pd.DataFrame, multi_label: bool
) -> ChampionJudge:
    """The champion measured as evaluate measured the challenger: a version of
    ``mlflow.registered_model`` from ``tracking_uri``, downloaded and evaluated on ``rows``
    (today's test split) in today's classes (:func:`evaluate_bundle`)."""

    def judge(version: str, classes: Sequence[str]) -> tuple[dict, list[str]]:
        uri = f"models:/{cfg.mlflow.registered_model}/{version}"
        champion = Bundle.load(resolve_model_dir(uri, tracking_uri), device=cfg.train.device)
        result = evaluate_bundle(champion, rows, cfg.evaluate.batch_size, multi_label, classes)
        return result.metrics, champion.spec.classes

    return judge
