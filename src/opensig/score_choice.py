"""Choosing ``tune.feature_score`` and ``tune.feature_weight`` on validation data that
imitates novelty: leave one unknown training source out of training at a time, and score
its validation images as novel.

Why: the validation split holds the kinds of unknown the network was trained on, so its
AUROC rewards the head's own score and cannot tell which feature score, or which share of
the vote, will catch images of a kind never seen. Which one does depends on the data
(bench/README.md: the near-novel protocol, where novel classes lie next to known ones and
``mahalanobis+ratio`` leads, against the fixed split, where plain ``mahalanobis`` does).
A network trained without one source sees that source as novel, in its head and in its
features alike; its validation images then stand in for the novel images to come.

It costs one training per unknown source (each with the user's params, logged to the
MLflow experiment ``<mlflow.experiment>-choose-score``), so it is a tool to run once per
data set (``opensig choose-score``), not a stage: it reports the candidates ranked by their
mean AUROC over the sources, and the user adopts the best in params.yaml.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from opensig.config import Config, parse_config
from opensig.labels import UNKNOWN, UNKNOWN_LABEL
from opensig.posthoc import FEATURE_SCORES, USES_UNKNOWN, fit_feature_score

log = logging.getLogger(__name__)

WEIGHTS = (0.25, 0.5, 0.75, 1.0)  # feature_weight candidates (0: the head alone, "none")
CANDIDATES: tuple[tuple[str, float], ...] = (
    ("none", 0.0),
    *((kind, weight) for kind in FEATURE_SCORES if kind != "none" for weight in WEIGHTS),
)


@dataclass(frozen=True)
class HeldOut:
    """What one network, trained without ``source``, gives for the images a candidate
    needs: class indices for known images, ``UNKNOWN`` for the val split's other unknowns."""

    source: str
    train_features: np.ndarray  # (N, D) known training images
    train_labels: np.ndarray  # (N,) their class indices
    unknown_features: np.ndarray  # (M, D) the other sources' unknown training images
    val_head: np.ndarray  # (V, K) the val split without the held-out source
    val_features: np.ndarray  # (V, D)
    val_labels: np.ndarray  # (V,)
    novel_head: np.ndarray  # (S, K) the held-out source's val images
    novel_features: np.ndarray  # (S, D)


def candidate_auroc(
    held: HeldOut, kind: str, weight: float, num_classes: int, knn_k: int = 50
) -> float:
    """AUROC of the known val images against the held-out source's, ranked by the level the
    candidate's scores keep (the calibration is increasing in it, so the AUROC is the
    scores'); ``none`` ranks by the head's top score."""
    from sklearn.metrics import roc_auc_score

    known = held.val_labels != UNKNOWN
    head = np.concatenate([held.val_head[known], held.novel_head]).astype(np.float32)
    is_known = np.r_[np.ones(int(known.sum())), np.zeros(len(held.novel_head))]
    if kind == "none":
        return float(roc_auc_score(is_known, head.max(axis=1)))
    features = np.concatenate([held.val_features[known], held.novel_features])
    score = fit_feature_score(
        kind,
        held.train_features,
        held.train_labels,
        held.val_head,
        held.val_features,
        held.val_labels,
        num_classes,
        knn_k,
        weight,
        held.unknown_features,
    )
    with torch.no_grad():
        level = score.level(torch.from_numpy(head), torch.from_numpy(features.astype(np.float32)))
    return float(roc_auc_score(is_known, level.numpy()))


def rank_candidates(
    held_outs: list[HeldOut],
    num_classes: int,
    knn_k: int = 50,
    candidates: tuple[tuple[str, float], ...] = CANDIDATES,
) -> pd.DataFrame:
    """One row per candidate (``feature_score``, ``feature_weight``): its AUROC on each
    held-out source and their mean, best first (ties keep the candidates' order)."""
    if not held_outs:
        raise ValueError("no held-out source to choose a feature score on")
    rows = []
    for kind, weight in candidates:
        if kind in USES_UNKNOWN and any(len(h.unknown_features) == 0 for h in held_outs):
            continue  # a network trained on no other source has no unknown images to use
        aurocs = {
            f"auroc[{h.source}]": candidate_auroc(h, kind, weight, num_classes, knn_k)
            for h in held_outs
        }
        rows.append({"feature_score": kind, "feature_weight": weight, **aurocs})
    table = pd.DataFrame(rows)
    table["mean_auroc"] = table.filter(like="auroc[").mean(axis=1)
    return table.sort_values("mean_auroc", ascending=False, kind="stable").reset_index(drop=True)


def held_out_sources(manifest: pd.DataFrame) -> list[str]:
    """The unknown sources of the train split, each with images in the val split to score:
    a source with none there is left out with a warning (nothing would stand for it)."""
    unknown = manifest["label"] == UNKNOWN_LABEL
    trained = sorted(manifest.loc[unknown & (manifest["split"] == "train"), "source"].unique())
    if len(trained) < 2:
        raise ValueError(
            "choose-score leaves one unknown source out of training at a time and needs at "
            f"least two in the train split, found {trained or 'none'}: add folders "
            "data/unknown/<source>/ (sources not in data.holdout_unknown)"
        )
    in_val = set(manifest.loc[unknown & (manifest["split"] == "val"), "source"])
    for source in trained:
        if source not in in_val:
            log.warning(
                "unknown source %r has no image in the val split and is not held out: "
                "add images to it or raise data.val_fraction",
                source,
            )
    sources = [s for s in trained if s in in_val]
    if not sources:
        raise ValueError(
            "no unknown source has images in the val split to score as novel; "
            "raise data.val_fraction"
        )
    return sources


def without_source(manifest: pd.DataFrame, source: str) -> pd.DataFrame:
    """The manifest a held-out network trains on: every image of the unknown ``source`` out."""
    unknown = manifest["label"] == UNKNOWN_LABEL
    return manifest[~(unknown & (manifest["source"] == source))].reset_index(drop=True)


def features_of(
    model_dir: Path, manifest: pd.DataFrame, source: str, device: str, batch: int
) -> HeldOut:
    """Run the network trained without ``source`` over what a candidate needs (see HeldOut)."""
    from opensig.data.manifest import label_targets, split_rows
    from opensig.evaluation import score_rows
    from opensig.methods import get_method
    from opensig.model import load_model_dir, resolve_device
    from opensig.posthoc import Scorer

    model, spec = load_model_dir(model_dir, resolve_device(device))
    scorer = Scorer(model, get_method(spec.method))
    held = manifest["source"] == source
    trained_on = without_source(manifest, source)
    train, val = split_rows(trained_on, "train"), split_rows(trained_on, "val")
    is_unknown = train["label"] == UNKNOWN_LABEL
    _, train_features = score_rows(scorer, spec, train[~is_unknown], batch, features=True)
    _, unknown_features = score_rows(scorer, spec, train[is_unknown], batch, features=True)
    val_head, val_features = score_rows(scorer, spec, val, batch, features=True)
    novel_rows = split_rows(manifest[held & (manifest["label"] == UNKNOWN_LABEL)], "val")
    novel_head, novel_features = score_rows(scorer, spec, novel_rows, batch, features=True)
    return HeldOut(
        source=source,
        train_features=train_features,
        train_labels=label_targets(train.loc[~is_unknown, "label"], spec.classes, False),
        unknown_features=unknown_features,
        val_head=val_head,
        val_features=val_features,
        val_labels=label_targets(val["label"], spec.classes, False),
        novel_head=novel_head,
        novel_features=novel_features,
    )


def choose_score(cfg: Config, manifest_path: Path, work: Path) -> dict:
    """Train one network per held-out unknown source (under ``work/<source>/``, with the
    user's params), rank every candidate on them and return the report: the ranking, the
    best candidate and the one params.yaml sets now."""
    from opensig.data.manifest import is_multi_label, read_manifest, write_manifest
    from opensig.stages import Layout, train

    manifest = read_manifest(manifest_path, cfg.data.root)
    if is_multi_label(manifest["label"]):
        raise ValueError(
            "choose-score: the data set is multi-label, where tune uses the head's scores "
            "(feature_score: none); there is nothing to choose"
        )
    held_outs = []
    raw = cfg.model_dump(mode="json")
    raw["mlflow"]["experiment"] = f"{cfg.mlflow.experiment}-choose-score"
    for source in held_out_sources(manifest):
        log.info("choose-score: training without unknown source %r", source)
        at = Layout.under(work / source)
        write_manifest(without_source(manifest, source), at.manifest)
        train(parse_config(raw), at)
        held_outs.append(
            features_of(at.model_dir, manifest, source, cfg.train.device, cfg.evaluate.batch_size)
        )
    chosen = cfg.tune.feature_score
    current = (chosen, 0.0 if chosen == "none" else cfg.tune.feature_weight)
    candidates = CANDIDATES if current in CANDIDATES else (*CANDIDATES, current)
    table = rank_candidates(held_outs, held_outs[0].val_head.shape[1], cfg.tune.knn_k, candidates)
    is_current = (table["feature_score"] == current[0]) & (table["feature_weight"] == current[1])
    return {
        "sources": [h.source for h in held_outs],
        "best": table.iloc[0].to_dict(),
        "current": table[is_current].iloc[0].to_dict(),
        "candidates": table.to_dict(orient="records"),
    }
