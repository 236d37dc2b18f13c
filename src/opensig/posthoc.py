"""Post-hoc open-set scores: where an image's penultimate features lie next to the known
classes', fitted in ``tune`` after training and combined with the head's per-class scores.

Why: a head trained with unknown images learns to reject *those* unknowns; images unlike
anything in training (the "novel" ones) can still get a confident class score. The feature
space tells them apart better (bench/README.md: novel AUROC 0.91 -> 0.96 on Fashion-MNIST),
while the head stays best on unknowns like the trained ones. So both vote, and the vote is
put on a scale a person can read:

    level   = F_head(head_top) ** (2 (1 - w)) * F_feature(s) ** (2 w)
    u       = -ln(level)                           (the image's surprisal, in nats)
    p       = 1 / (1 + (u / u50) ** k)             (calibrated on validation, see below)
    score_k = head_k / head_top * p

``head_k`` is the method's per-class score, ``head_top`` the image's highest one, ``s`` the
feature score (higher = more like the known training images), and each ``F`` is the
empirical CDF of that score over the known validation images: the share of known images the
value beats (made continuous, :func:`ecdf`). An image keeps a high level only if it looks
known to the head *and* in feature space; ``level`` ranks images well but is unreadable
(a typical known image scores 0.25, the least typical validation ones 1e-8).

``w`` (``tune.feature_weight``) is the feature score's share of the vote: 0.5 is the plain
product, 1 the feature score alone (the head only picks the class), 0 the head alone. The
head is best on unknowns like the trained ones, the feature score on novel ones, above all
novel classes next to known ones (bench/README.md: the near-novel protocol); files written
before the weight score the plain product.

``p`` is that ranking calibrated (:func:`fit_calibration`): the probability that an image
with this surprisal is a known image of its top class, fitted on the validation split by
Platt scaling (logistic regression of "known, and its top class is right" on ``ln u``),
so that ``p = 0.5`` at surprisal ``u50`` and ``k`` says how fast it falls. It is a strictly
increasing function of ``level``: every ranking (AUROC, OSCR, FPR95) is the one ``level``
gives. The other classes keep their ratio to the top one, so the argmax class never changes,
the scores stay in [0, 1], and thresholds and :func:`opensig.thresholds.decide` apply
unchanged. Files written before this scale (no ``calibration`` in them) score ``level``
as they always did.

Feature scores (``tune.feature_score``):

- ``mahalanobis``: minus the smallest squared Mahalanobis distance to a class mean, with one
  covariance shared by the classes (Lee et al. 2018), computed as a Euclidean distance after
  whitening.
- ``mahalanobis++``: the same on L2-normalised features (Mueller & Hein 2025, "Mahalanobis++"):
  the feature norm varies a lot within a class, which a shared covariance fits badly.
- ``rmd``: relative Mahalanobis (Ren et al. 2021): each class distance minus the distance to
  one background Gaussian fitted on every known training image, so directions in which all
  known images vary alike stop counting as evidence of novelty.
- ``knn``: cosine similarity of the L2-normalised features to their k-th nearest known
  training image (Sun et al. 2022); the training features travel with the model.
- ``mahalanobis+ratio``: ``mahalanobis``, and a second vote that uses the unknown training
  images as a reference of their own: the ``knn`` similarity to the known training images
  minus that to the unknown ones (k-th nearest of each). ``F_feature`` is then the product of
  the two CDFs. For novel classes next to known ones when the unknown folder holds far-away
  things (bench/README.md: the near-novel protocol); it needs unknown training images.
- ``none``: the head's scores as they are.

Fitting (numpy) and applying (torch) are separate: the torch module is what tune, evaluate,
predict, the pyfunc and the ONNX graph all run, so every one of them scores alike. The
statistics are saved as safetensors, with the settings in its metadata: no pickle.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from opensig.io import atomic_write
from opensig.labels import UNKNOWN
from opensig.methods import Method
from opensig.model import features_and_logits

log = logging.getLogger(__name__)

FEATURE_SCORES = ("mahalanobis", "mahalanobis++", "rmd", "knn", "mahalanobis+ratio", "none")
_NORMALISED = ("mahalanobis++", "knn")  # scores computed on L2-normalised features
USES_UNKNOWN = ("mahalanobis+ratio",)  # scores fitted on the unknown training images too
MAX_REFERENCE = 2048  # points kept of each empirical CDF: quantiles when there are more
_MIN_RAMP = 0.05  # the narrowest ramp of an empirical CDF, in mean gaps (see ecdf)
_EIGEN_CUTOFF = 1e-6  # whitening drops covariance directions below this share of the largest
SCALE = "probability"  # what the combined scores are, in files with a calibration (see above)
OLD_SCALE = "level"  # ... in files written before it: the product of the two CDFs
_LEVEL_FLOOR = 1e-38  # float32's smallest normal: a level of 0 (underflow) is this surprisal
_SURPRISAL_FLOOR = 1e-6  # nats: levels above 1 - 1e-6 are float32 noise away from 1


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean feature vector of each class (K, D); ``labels`` are class indices 0..K-1."""
    features = np.asarray(features, dtype=np.float64)
    missing = sorted(set(range(num_classes)) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(
            f"classes {missing} have no training image to fit the feature score on; "
            "add images of them or set tune.feature_score: none"
        )
    return np.stack([features[labels == k].mean(axis=0) for k in range(num_classes)])


def whitening(features: np.ndarray, labels: np.ndarray, means: np.ndarray) -> np.ndarray:
    """W (D, r) with ``|(x - m) @ W|^2`` the Mahalanobis distance under the shared covariance.

    The covariance of the residuals from each image's class mean, pooled over classes; its
    eigen-directions with almost no variance (below 1e-6 of the largest, e.g. fewer images
    than dimensions) are dropped instead of inverted, so the distance stays finite.
    """
    residuals = np.asarray(features, dtype=np.float64) - means[labels]
    covariance = residuals.T @ residuals / max(len(residuals), 1)
    values, vectors = np.linalg.eigh(covariance)
    keep = values > values.max() * _EIGEN_CUTOFF
    return vectors[:, keep] / np.sqrt(values[keep])


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def reference(values: np.ndarray, max_points: int = MAX_REFERENCE) -> np.ndarray:
    """The sorted values an empirical CDF is read from: all of them, or evenly spaced
    quantiles when there are more than ``max_points`` (the CDF moves by < 1/max_points)."""
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if values.size == 0:
        raise ValueError("an empirical CDF needs at least one value")
    if values.size > max_points:
        values = np.quantile(values, np.linspace(0.0, 1.0, max_points))
    return values


def ecdf(values: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The empirical CDF of ``ref`` (sorted), made continuous and strictly increasing, so
    that float noise in a score moves it a little, never by a whole step.

    With M reference values it rises linearly from 1/(M+1) at ``ref[0]`` to M/(M+1) at
    ``ref[-1]`` (1/(M+1) per gap between neighbours, spread over at least 1/20 of the mean
    gap, equal values included) and keeps rising outside them towards
    0 and 1 along exponential tails whose scale is the mean gap: images beyond every known
    one are still ranked. Plain clamped ramps and exponentials, so the ONNX graph holds it.
    """
    values = values.float()
    lo, hi = ref[:-1], ref[1:]
    scale = (ref[-1] - ref[0]).clamp_min(1e-12) / ref.numel()
    # A ramp is at least 1/20 of the mean gap wide: near-equal reference values would make
    # it so steep that float noise (another batch size, ONNX Runtime) could jump it.
    width = (hi - lo).clamp_min(_MIN_RAMP * scale)
    inside = ((values.unsqueeze(-1) - lo) / width).clamp(0, 1).sum(dim=-1)
    below = torch.exp(((values - ref[0]) / scale).clamp(max=0.0))
    above = 1.0 - torch.exp(-((values - ref[-1]) / scale).clamp(min=0.0))
    return (below + inside + above) / (ref.numel() + 1)


def log_surprisal(level: torch.Tensor) -> torch.Tensor:
    """``ln u`` with ``u = -ln(level)``: where the calibration is linear (see above)."""
    surprisal = -torch.log(level.float().clamp_min(_LEVEL_FLOOR))
    return torch.log(surprisal.clamp_min(_SURPRISAL_FLOOR))


def calibrated(level: torch.Tensor, calibration: torch.Tensor) -> torch.Tensor:
    """``p = 1 / (1 + (u / u50) ** k)`` from ``calibration = (k, ln u50)``: strictly
    increasing in ``level`` (a sigmoid of ``ln u``, which the ONNX graph holds)."""
    k, log_u50 = calibration[0], calibration[1]
    return torch.sigmoid(-k * (log_surprisal(level) - log_u50))


def fit_calibration(level: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """``(k, ln u50)`` by Platt scaling: logistic regression of ``positive`` (a known image
    whose top class is right) on ``ln u``, with Platt's targets ``(N+ + 1) / (N+ + 2)`` and
    ``1 / (N- + 2)`` instead of 1 and 0, so that separable validation data (no unknown as
    typical as the least typical known image) still gives a finite slope.

    Without both kinds of image there is nothing to calibrate on: then ``k = 1`` and ``u50``
    is the largest surprisal of the validation images, with a warning.
    """
    from sklearn.linear_model import LogisticRegression

    x = log_surprisal(torch.from_numpy(np.asarray(level, dtype=np.float32))).double().numpy()
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    why = "it needs both"
    if n_pos and n_neg:
        target = np.where(positive, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        fit = LogisticRegression(C=np.inf).fit(
            np.concatenate([x, x])[:, None],
            np.repeat([1, 0], x.size),
            sample_weight=np.concatenate([target, 1 - target]),
        )
        slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
        if slope < 0:
            return -slope, intercept / -slope
        why = "the first do not look more typical than the others"
    log.warning(
        "the scores cannot be calibrated on the val split's %d known image(s) given their "
        "class and %d other image(s) (%s), so they are not probabilities; add unknown "
        "images (data/unknown/<source>/) and rerun `opensig tune`",
        n_pos,
        n_neg,
        why,
    )
    return 1.0, float(x.max())


def _squared_distances(whitened: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, C) squared Euclidean distances of whitened features to whitened centres."""
    return ((whitened.unsqueeze(1) - centres.unsqueeze(0)) ** 2).sum(dim=-1)


def _unit(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _kth_similarity(unit: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) cosine similarity of unit-norm rows to their k-th nearest row of ``bank``
    (the last one when the bank holds fewer)."""
    return (unit @ bank.T).topk(min(k, bank.shape[0]), dim=1).values[:, -1]


class FeatureScore(torch.nn.Module):
    """(head scores (N, K), features (N, D)) -> combined per-class scores (N, K)."""

    def __init__(self, kind: str, tensors: dict[str, torch.Tensor], k: int = 0) -> None:
        super().__init__()
        if kind not in FEATURE_SCORES[:-1]:
            raise ValueError(f"feature score {kind!r}: use one of {FEATURE_SCORES[:-1]}")
        self.kind, self.k = kind, k
        for name, value in tensors.items():
            self.register_buffer(name, value.to(torch.float32))

    def known_score(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) how like the known training images the features are (higher = more)."""
        features = features.float()
        if self.kind in _NORMALISED:
            features = _unit(features)
        if self.kind == "knn":
            return _kth_similarity(features, self.bank, self.k)
        nearest = _squared_distances(features @ self.whiten, self.centres).min(dim=1).values
        if self.kind == "rmd":
            background = _squared_distances(features @ self.bg_whiten, self.bg_centre)[:, 0]
            return background - nearest
        return -nearest

    def ratio(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) ``mahalanobis+ratio``'s second vote: how much nearer the known training
        images than the unknown ones (k-th nearest of each, cosine similarity)."""
        unit = _unit(features.float())
        return _kth_similarity(unit, self.bank, self.k) - _kth_similarity(
            unit, self.unknown_bank, self.k
        )

    def feature_level(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) ``F_feature``: the feature score's CDF (times the ratio's, where there is one)."""
        level = ecdf(self.known_score(features), self.feature_ref)
        if hasattr(self, "ratio_ref"):
            level = level * ecdf(self.ratio(features), self.ratio_ref)
        return level

    def level(self, head: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(N,) the weighted product of the two CDFs: the ranking the scores keep (above)."""
        top = head.float().max(dim=1).values
        f_head = ecdf(top, self.head_ref)
        f_feature = self.feature_level(features)
        if not hasattr(self, "feature_weight"):  # a file from before the weight: the product
            return f_head * f_feature
        weight = self.feature_weight
        return f_head ** (2 * (1 - weight)) * f_feature ** (2 * weight)

    @property
    def scale(self) -> str:
        """What the scores are: :data:`SCALE`, or :data:`OLD_SCALE` for an older file."""
        return SCALE if hasattr(self, "calibration") else OLD_SCALE

    def forward(self, head: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        head = head.float()
        top = head.max(dim=1, keepdim=True).values
        level = self.level(head, features)
        if hasattr(self, "calibration"):
            level = calibrated(level, self.calibration)
        return head / top.clamp_min(1e-12) * level.unsqueeze(1)

    def save(self, path: Path) -> None:
        tensors = {name: buf.contiguous() for name, buf in self.named_buffers()}
        meta = {"kind": self.kind, "k": str(self.k), "scale": self.scale}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: Path) -> FeatureScore:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if "kind" not in meta:
            raise ValueError(f"{path}: not an opensig feature score file; rerun `opensig tune`")
        return cls(meta["kind"], load_file(str(path)), int(meta.get("k", 0)))

    def describe(self) -> dict:
        """What a reader of thresholds.json or the ONNX metadata needs to know about it."""
        uses_k = self.kind in ("knn", *USES_UNKNOWN)
        described = {"kind": self.kind, **({"k": self.k} if uses_k else {})}
        described["scale"] = self.scale
        if hasattr(self, "feature_weight"):
            described["feature_weight"] = round(float(self.feature_weight), 6)
        if hasattr(self, "calibration"):
            slope, log_u50 = self.calibration.tolist()
            described["calibration"] = {"u50": math.exp(log_u50), "k": slope}
        return described


def save_empty_score(path: Path) -> None:
    """The file of ``tune.feature_score: none``: no statistics, so nothing stale is left."""
    atomic_write(path, lambda tmp: save_file({}, str(tmp), metadata={"kind": "none"}))


def fit_feature_score(
    kind: str,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_head: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    k: int = 50,
    feature_weight: float = 0.5,
    unknown_features: np.ndarray | None = None,
) -> FeatureScore:
    """Fit the feature statistics on the known training images (and for ``USES_UNKNOWN``
    kinds on ``unknown_features``, the unknown training images'), the empirical CDFs on the
    known validation images (the head's max score, and each feature vote), then the
    calibration on every validation image, of the votes combined with ``feature_weight``.

    ``train_labels`` are class indices (unknown images left out by the caller);
    ``val_labels`` class indices with ``UNKNOWN`` (the CDFs are "how typical of a known
    image", the calibration "how likely a known image of its top class").
    """
    val_labels = np.asarray(val_labels)
    val_known = val_labels != UNKNOWN
    if not np.any(val_known):
        raise ValueError(
            "the val split has no image of a known class to calibrate the feature score on; "
            "raise data.val_fraction or set tune.feature_score: none"
        )
    if kind in USES_UNKNOWN and (unknown_features is None or len(unknown_features) == 0):
        raise ValueError(
            f"tune.feature_score: {kind} compares images with the unknown training images, "
            "and the train split has none: add data/unknown/<source>/ images (a source not in "
            "data.holdout_unknown) or use tune.feature_score: mahalanobis"
        )
    if kind in USES_UNKNOWN and k < 1:
        raise ValueError(f"tune.knn_k: must be at least 1, got {k}")
    extra = {}
    if kind in USES_UNKNOWN:
        extra = {"bank": normalise(train_features), "unknown_bank": normalise(unknown_features)}
    if kind in _NORMALISED:
        train_features = normalise(train_features)
    if kind in ("mahalanobis", "mahalanobis++", "rmd", *USES_UNKNOWN):
        means = class_means(train_features, train_labels, num_classes)
        whiten = whitening(train_features, train_labels, means)
        tensors = {"whiten": whiten, "centres": means @ whiten}
        if kind == "rmd":
            everyone = np.zeros(len(train_features), dtype=np.int64)
            centre = class_means(train_features, everyone, 1)
            bg_whiten = whitening(train_features, everyone, centre)
            tensors |= {"bg_whiten": bg_whiten, "bg_centre": centre @ bg_whiten}
    elif kind == "knn":
        if k < 1:
            raise ValueError(f"tune.knn_k: must be at least 1, got {k}")
        tensors = {"bank": train_features}
    else:
        raise ValueError(f"tune.feature_score {kind!r}: use one of {FEATURE_SCORES}")
    placeholder = torch.zeros(1)
    refs = {"ratio_ref": placeholder} if kind in USES_UNKNOWN else {}
    score = FeatureScore(
        kind,
        {
            **{n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in (tensors | extra).items()},
            **refs,
            "head_ref": placeholder,
            "feature_ref": placeholder,
            "feature_weight": torch.tensor(feature_weight),
        },
        k,
    )
    known = val_known
    with torch.no_grad():
        feats = torch.from_numpy(np.asarray(val_features, dtype=np.float32)[known])
        score.feature_ref = torch.from_numpy(reference(score.known_score(feats).numpy())).float()
        if refs:
            score.ratio_ref = torch.from_numpy(reference(score.ratio(feats).numpy())).float()
    score.head_ref = torch.from_numpy(reference(np.asarray(val_head)[known].max(axis=1))).float()
    with torch.no_grad():
        head = torch.from_numpy(np.asarray(val_head, dtype=np.float32))
        level = score.level(head, torch.from_numpy(np.asarray(val_features, dtype=np.float32)))
    right = known & (np.asarray(val_head).argmax(axis=1) == val_labels)
    score.register_buffer("calibration", torch.tensor(fit_calibration(level.numpy(), right)))
    return score


class Scorer(torch.nn.Module):
    """Network input -> per-class scores: the method's head scores, combined with the
    feature score when the model has one. The one scoring path of every caller."""

    def __init__(
        self, model: torch.nn.Module, method: Method, feature_score: FeatureScore | None = None
    ) -> None:
        super().__init__()
        self.model, self.method, self.feature_score = model, method, feature_score

    def head_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What tune fits the feature score on: head scores (N, K) and features (N, D)."""
        features, logits = features_and_logits(self.model, images)
        return self.method.scores(logits), features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.feature_score is None:
            return self.method.scores(self.model(images))
        head, features = self.head_and_features(images)
        return self.feature_score(head, features)
