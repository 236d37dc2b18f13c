"""What tune writes and everything that decides reads: the thresholds file and the feature
score statistics beside it.

``thresholds.json`` holds one threshold per class, the ``model_digest`` of the model they
were tuned for, the scale of the scores (``score_scale``) and the feature score they were
tuned on; ``feature_score.safetensors`` holds that score's statistics and calibration.
Tune writes both (:func:`write_thresholds`), a :class:`~opensig.predict.Bundle` reads them
(:func:`read_thresholds`), register copies and fingerprints them (:func:`decision_files`).
Nothing here imports predict: data flows from this format to the code that decides, not back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from opensig.io import file_digest, read_json, write_json
from opensig.model import model_digest
from opensig.posthoc import OLD_SCALE, FeatureScore, save_empty_score

log = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"
MODEL_DIGEST_KEY = "model_sha256"  # in thresholds.json: the model_digest they were tuned for
FEATURE_SCORE_KEY = "feature_score"  # in thresholds.json: the post-hoc score they were tuned on
FEATURE_SCORE_FILE = "feature_score.safetensors"  # its statistics, beside thresholds.json
SCALE_KEY = "score_scale"  # in thresholds.json: what the scores are (docs/how-it-works.md)
HEAD_SCALE = "head"  # tune.feature_score none: the method's own per-class scores


def write_thresholds(
    path: Path,
    classes: Sequence[str],
    values: np.ndarray,
    strategy: str,
    options: dict,
    *,
    model_sha256: str,
    feature_score: FeatureScore | None = None,
) -> None:
    """Thresholds by class, with the ``model_digest`` of the model they were tuned for and
    the feature score they were tuned on (saved beside, as ``FEATURE_SCORE_FILE``)."""
    stats = path.parent / FEATURE_SCORE_FILE
    described = None
    if feature_score is not None:
        feature_score.save(stats)
        described = {**feature_score.describe(), "file": stats.name, "sha256": file_digest(stats)}
    else:  # an empty file, not a stale one: dvc.yaml declares it whatever the setting
        save_empty_score(stats)
    write_json(
        path,
        {
            "strategy": strategy,
            "options": options,
            MODEL_DIGEST_KEY: model_sha256,
            SCALE_KEY: score_scale(feature_score),
            FEATURE_SCORE_KEY: described,
            "thresholds": {c: float(v) for c, v in zip(classes, values, strict=True)},
        },
    )


def score_scale(feature_score: FeatureScore | None) -> str:
    """What the scores are (docs/how-it-works.md: Reading a score): the calibrated probability, the
    head's own scores (no feature score), or the product of CDFs of an older model."""
    return feature_score.scale if feature_score is not None else HEAD_SCALE


def read_thresholds(
    path: Path, classes: Sequence[str], model_dir: Path, force: bool = False
) -> tuple[np.ndarray, FeatureScore | None]:
    """Thresholds in the model's class order and the feature score they were tuned on, once
    they are known to be this model's: the same classes and, when the file records it, the
    same model (``--force`` overrides that)."""
    content = read_json(path)
    by_class = content.get("thresholds") if isinstance(content, dict) else None
    if not isinstance(by_class, dict):
        raise ValueError(f"{path}: no thresholds by class in it; rerun `opensig tune`")
    if sorted(by_class) != sorted(classes):
        raise ValueError(
            f"{path}: thresholds are for classes {sorted(by_class)}, "
            f"the model has {list(classes)}; rerun `opensig tune`"
        )
    tuned_for = content.get(MODEL_DIGEST_KEY)
    if tuned_for is None:
        log.warning(
            "%s does not record the model it was tuned for (an older opensig wrote it), so it "
            "cannot be checked against %s; rerun `opensig tune` to record it",
            path,
            model_dir,
        )
    elif tuned_for != (digest := model_digest(model_dir)):
        problem = (
            f"{path} was tuned for another model (sha256 {tuned_for[:12]}), not for "
            f"{model_dir} (sha256 {digest[:12]})"
        )
        if not force:
            raise ValueError(
                f"{problem}; pass the thresholds tuned with this model, rerun `opensig tune`, "
                "or --force to use them anyway"
            )
        log.warning("%s; used anyway (--force)", problem)
    values = np.array([by_class[c] for c in classes], dtype=np.float64)
    feature_score = _read_feature_score(path, content.get(FEATURE_SCORE_KEY))
    if feature_score is not None and feature_score.scale == OLD_SCALE:
        log.info(
            "%s: scores on the scale before calibrated probabilities (the product of two "
            "CDFs), as it was tuned; rerun `opensig tune` for readable scores",
            path,
        )
    return values, feature_score


def decision_files(thresholds: Path) -> list[Path]:
    """The files a model's decisions depend on besides its weights: the thresholds file and
    the feature score statistics it names (what register copies and fingerprints)."""
    described = read_json(thresholds).get(FEATURE_SCORE_KEY)
    extra = [thresholds.parent / str(described.get("file"))] if described else []
    return [thresholds, *extra]


def _read_feature_score(path: Path, described: dict | None) -> FeatureScore | None:
    """The statistics file that ``thresholds.json`` names, checked against its digest."""
    if not described:
        return None
    stats = path.parent / str(described.get("file", FEATURE_SCORE_FILE))
    if stats.parent != path.parent or not stats.is_file():
        raise FileNotFoundError(
            f"{path} was tuned on the feature score in {stats}, which is missing; copy it "
            "beside the thresholds or rerun `opensig tune`"
        )
    if described.get("sha256") != file_digest(stats):
        raise ValueError(
            f"{stats} is not the feature score {path} was tuned on (sha256 differs); "
            "rerun `opensig tune`"
        )
    return FeatureScore.load(stats)
