"""An independent check of opensig's open-set scores: pytorch-ood's detectors on the same
trained network's penultimate features and logits.

Why: a bug in opensig's own statistics, or an off-the-shelf detector that simply ranks
better, must not hide behind opensig's numbers. Every detector is fitted on the known
training images and read on validation (known vs the training kinds of unknown: what may
choose one) and on test (known vs novel unknowns: what is reported). pytorch-ood
(Apache-2.0) is a bench dependency: ``pip install 'opensig[bench]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from opensig.evaluation import score_rows
from opensig.labels import UNKNOWN, UNKNOWN_LABEL
from opensig.methods import get_method
from opensig.metrics import auroc, fpr_at_tpr, oscr
from opensig.model import ModelSpec, features_and_logits
from opensig.posthoc import Scorer

log = logging.getLogger(__name__)

VIM_DIMENSIONS = 64  # ViM's principal subspace (the paper's choice for 512-d features: D/8)


class _Raw(Scorer):
    """The network's logits and features, as :func:`opensig.predict.run_scorer` reads them."""

    def head_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = features_and_logits(self.model, images)
        return logits, features


def detectors(model: torch.nn.Module, n_train: int) -> dict[str, tuple[Callable, str]]:
    """Name -> (a new detector, what it reads: ``features`` or ``logits``); kNN's k is 50
    (opensig's ``tune.knn_k``) or the number of training images when fewer."""
    from pytorch_ood import detector as ood

    layer = model.get_classifier()
    return {
        "Mahalanobis": (lambda: ood.Mahalanobis(None), "features"),
        "RMD": (lambda: ood.RMD(None), "features"),
        "KNN": (lambda: ood.KNN(None, k=min(50, n_train)), "features"),
        "ViM": (lambda: ood.ViM(None, VIM_DIMENSIONS, layer.weight, layer.bias), "features"),
        "Energy": (lambda: ood.EnergyBased(None), "logits"),
        "MaxLogit": (lambda: ood.MaxLogit(None), "logits"),
        "GEN": (lambda: ood.GEN(None), "logits"),
        "fDBD": (lambda: ood.fDBD(None, layer), "features"),
    }


def _readings(
    conf: np.ndarray, predicted: np.ndarray, labels: np.ndarray, num_classes: int
) -> dict[str, float]:
    """AUROC, FPR95 and OSCR of a confidence (higher = known) with the head's class."""
    scores = np.full((len(conf), num_classes), -np.inf)
    scores[np.arange(len(conf)), predicted] = conf
    return {
        "auroc": auroc(scores, labels),
        "fpr95": fpr_at_tpr(scores, labels),
        "oscr": oscr(scores, labels),
    }


def cross_check(
    model: torch.nn.Module,
    spec: ModelSpec,
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    test_rows: pd.DataFrame,
    batch_size: int = 256,
) -> list[dict]:
    """One row per detector: ``val_auroc`` (known vs unknown validation images) and the
    novel ``auroc``, ``fpr95``, ``oscr`` (known vs novel test images; the class is the
    head's argmax). ``test_rows`` need a ``novel`` column."""
    raw = _Raw(model, get_method(spec.method))
    train_rows = train_rows[train_rows["label"] != UNKNOWN_LABEL]
    _, train_features = score_rows(raw, spec, train_rows, batch_size, features=True)
    outputs = {
        "val": score_rows(raw, spec, val_rows, batch_size, features=True),
        "test": score_rows(raw, spec, test_rows, batch_size, features=True),
    }
    index = {name: k for k, name in enumerate(spec.classes)}

    def targets(rows: pd.DataFrame) -> np.ndarray:
        return np.array([index.get(label, UNKNOWN) for label in rows["label"]])

    labels = {"val": targets(val_rows), "test": targets(test_rows)}
    keep = {
        "val": np.ones(len(val_rows), dtype=bool),  # known vs the training kinds of unknown
        "test": (labels["test"] != UNKNOWN) | test_rows["novel"].to_numpy(dtype=bool),
    }
    results = []
    for name, (make, reads) in detectors(model, len(train_features)).items():
        detector = make()
        if reads == "features":
            detector.fit_features(
                torch.from_numpy(train_features), torch.from_numpy(targets(train_rows))
            )
        found = {}
        for split, (logits, features) in outputs.items():
            with torch.no_grad():
                if reads == "features":
                    outlier = detector.predict_features(torch.from_numpy(features))
                else:
                    outlier = detector.predict_logits(torch.from_numpy(logits))
            conf = -np.asarray(outlier, dtype=np.float64)  # higher = more like a known image
            predicted = logits[:, : spec.num_classes].argmax(axis=1)  # K+1: not the extra
            found[split] = _readings(
                conf[keep[split]],
                predicted[keep[split]],
                labels[split][keep[split]],
                spec.num_classes,
            )
        results.append({"detector": name, "val_auroc": found["val"]["auroc"], **found["test"]})
        log.info(
            "pytorch-ood %s: val AUROC %.3f, novel AUROC %.3f",
            name,
            found["val"]["auroc"],
            found["test"]["auroc"],
        )
    return results
