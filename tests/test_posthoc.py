"""Post-hoc feature scores: hand-computed values, scipy's Mahalanobis distance, the combined
score's promises (argmax kept, [0, 1]), its calibration against Platt's method written with
scipy, older files scoring as before, and the safetensors round trip."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.spatial.distance import mahalanobis

from opensig.posthoc import (
    FeatureScore,
    calibrated,
    class_means,
    ecdf,
    fit_calibration,
    fit_feature_score,
    normalise,
    reference,
    whitening,
)


def test_class_means_by_hand_and_missing_class() -> None:
    features = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 4.0]])
    assert class_means(features, np.array([0, 0, 1]), 2).tolist() == [[1.0, 0.0], [4.0, 4.0]]
    with pytest.raises(ValueError, match=r"classes \[2\].*tune.feature_score: none"):
        class_means(features, np.array([0, 0, 1]), 3)


def test_whitened_distance_is_scipys_mahalanobis_with_the_pooled_covariance() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    features = rng.normal(size=(120, 4)) @ rng.normal(size=(4, 4)) + labels[:, None] * 3.0
    means = class_means(features, labels, 3)
    residuals = features - means[labels]
    inverse = np.linalg.inv(residuals.T @ residuals / len(features))
    whiten = whitening(features, labels, means)
    point = rng.normal(size=4)
    for mean in means:
        by_hand = mahalanobis(point, mean, inverse) ** 2
        assert np.sum(((point - mean) @ whiten) ** 2) == pytest.approx(by_hand, rel=1e-9)


def test_whitening_drops_directions_without_variance() -> None:
    # every image has 0 in the last coordinate: no variance there, and no infinite distance
    features = np.array([[0.0, 0.0], [2.0, 0.0], [5.0, 0.0], [7.0, 0.0]])
    labels = np.array([0, 0, 1, 1])
    whiten = whitening(features, labels, class_means(features, labels, 2))
    assert whiten.shape == (2, 1)
    assert np.isfinite(whiten).all()
    assert np.sum((np.array([3.0, 0.0]) - [1.0, 0.0]) @ whiten) ** 2 == pytest.approx(4.0)


def test_ecdf_by_hand() -> None:
    ref = torch.tensor([1.0, 2.0, 3.0])
    values = torch.tensor([0.0, 1.0, 2.5, 3.0, 4.0])
    tail = math.exp(-1.5)  # the tails' scale is the mean gap, (3 - 1) / 3: 1 away is 1.5 scales
    expected = [tail / 4, 1 / 4, (1 + 1.5) / 4, 3 / 4, (3 + 1 - tail) / 4]
    assert ecdf(values, ref).tolist() == pytest.approx(expected)


def test_ecdf_is_continuous_and_increasing() -> None:
    ref = torch.tensor([-2.0, 0.0, 0.5, 1.0, 5.0])
    values = torch.linspace(-10, 10, 2001)
    levels = ecdf(values, ref)
    assert (levels > 0).all() and (levels < 1).all()
    assert (levels[1:] > levels[:-1]).all()
    assert (levels[1:] - levels[:-1]).max() < 0.01  # no step: a small change moves it little


def test_reference_keeps_all_values_or_quantiles() -> None:
    assert reference(np.array([3.0, 1.0, 2.0])).tolist() == [1.0, 2.0, 3.0]
    many = reference(np.arange(101.0), max_points=11)
    assert many.tolist() == pytest.approx(np.arange(0.0, 101.0, 10.0).tolist())
    with pytest.raises(ValueError, match="at least one"):
        reference(np.array([]))


def test_normalise_keeps_zero_rows() -> None:
    assert normalise(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist() == [[0.6, 0.8], [0.0, 0.0]]


def _score(kind: str, **tensors: list) -> FeatureScore:
    refs = {"head_ref": [0.2, 0.6, 0.9], "feature_ref": [-4.0, -1.0, 0.0]}
    values = {name: torch.tensor(v) for name, v in {**refs, **tensors}.items()}
    return FeatureScore(kind, values, k=2)


def test_mahalanobis_known_score_by_hand() -> None:
    # identity whitening: minus the squared Euclidean distance to the nearest class centre
    score = _score("mahalanobis", whiten=[[1.0, 0.0], [0.0, 1.0]], centres=[[0.0, 0.0], [4.0, 0]])
    features = torch.tensor([[1.0, 1.0], [4.0, 3.0], [2.0, 0.0]])
    assert score.known_score(features).tolist() == [-2.0, -9.0, -4.0]


def test_knn_known_score_is_the_kth_cosine_similarity() -> None:
    bank = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    score = _score("knn", bank=bank)
    # (2, 0) -> unit (1, 0): similarities 1, 0, 0.6 -> 2nd highest 0.6
    # (0, 5) -> unit (0, 1): similarities 0, 1, 0.8 -> 2nd highest 0.8
    assert score.known_score(torch.tensor([[2.0, 0.0], [0.0, 5.0]])).tolist() == pytest.approx(
        [0.6, 0.8]
    )


def test_ratio_is_the_kth_similarity_to_known_minus_to_unknown_training_images() -> None:
    """``mahalanobis+ratio``'s second vote, by hand; checked against sklearn's neighbours on
    random features; and its CDF multiplies the Mahalanobis one in ``F_feature``."""
    from sklearn.neighbors import NearestNeighbors

    bank, unknown_bank = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], [[0.8, 0.6], [-1.0, 0.0]]
    whiten, centres = [[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0]]
    score = _score(
        "mahalanobis+ratio",
        whiten=whiten,
        centres=centres,
        bank=bank,
        unknown_bank=unknown_bank,
        ratio_ref=[-0.5, 0.0, 0.5],
    )
    # (2, 0) -> (1, 0): known 1, 0, 0.6 -> 2nd 0.6; unknown 0.8, -1 -> 2nd -1: ratio 1.6
    # (0, 5) -> (0, 1): known 0, 1, 0.8 -> 0.8; unknown 0.6, 0 -> 0: ratio 0.8
    features = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    assert score.ratio(features).tolist() == pytest.approx([1.6, 0.8])
    expected = ecdf(score.known_score(features), score.feature_ref) * ecdf(
        score.ratio(features), score.ratio_ref
    )
    assert torch.equal(score.feature_level(features), expected)
    assert score.describe()["k"] == 2

    rng = np.random.default_rng(5)
    known, unknown, test = (
        rng.normal(size=(40, 6)),
        rng.normal(size=(25, 6)),
        rng.normal(size=(9, 6)),
    )
    labels = np.repeat([0, 1], 20)
    fitted = fit_feature_score(
        "mahalanobis+ratio",
        known,
        labels,
        np.ones((1, 2)),
        test[:1],
        np.zeros(1),
        2,
        k=7,
        unknown_features=unknown,
    )

    def kth_similarity(reference: np.ndarray) -> np.ndarray:  # cosine = 1 - d^2 / 2 on units
        distances, _ = (
            NearestNeighbors(n_neighbors=7).fit(normalise(reference)).kneighbors(normalise(test))
        )
        return 1 - distances[:, -1] ** 2 / 2

    np.testing.assert_allclose(
        fitted.ratio(torch.from_numpy(test).float()).numpy(),
        kth_similarity(known) - kth_similarity(unknown),
        atol=1e-5,
    )


def test_combined_score_by_hand_keeps_the_argmax_and_stays_in_0_1() -> None:
    score = _score("mahalanobis", whiten=[[1.0, 0.0], [0.0, 1.0]], centres=[[0.0, 0.0]])
    head = torch.tensor([[0.3, 0.95], [0.7, 0.5]])
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # known scores 0 and -4
    combined = score(head, features)
    # head refs 0.2, 0.6, 0.9 (tail scale 0.7 / 3); feature refs -4, -1, 0
    # image 0: top 0.95 is past the last head ref: (1 + 2 + 1 - exp(-0.05 / (0.7 / 3))) / 4;
    # its known score 0 is the last feature ref: (1 + 2) / 4
    level0 = (4 - math.exp(-0.05 / (0.7 / 3))) / 4 * 3 / 4
    # image 1: top 0.7 is a third into the second gap: (1 + 1 + 1 / 3) / 4; known score -4
    # is the first feature ref: 1 / 4
    level1 = (2 + 1 / 3) / 4 * 1 / 4
    expected = [[0.3 / 0.95 * level0, level0], [level1, 0.5 / 0.7 * level1]]
    np.testing.assert_allclose(combined.numpy(), expected, rtol=1e-5)
    assert (combined.argmax(dim=1) == head.argmax(dim=1)).all()
    assert ((combined > 0) & (combined < 1)).all()


@pytest.mark.parametrize("weight", [0.0, 0.5, 0.8, 1.0])
def test_feature_weight_is_the_feature_scores_share_of_the_vote(weight: float) -> None:
    whiten, centres = [[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0]]
    score = _score("mahalanobis", whiten=whiten, centres=centres, feature_weight=weight)
    head = torch.tensor([[0.3, 0.95], [0.7, 0.5]])
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    # the two CDFs of the by-hand test above, image 0 and image 1
    f_head = np.array([(4 - math.exp(-0.05 / (0.7 / 3))) / 4, (2 + 1 / 3) / 4])
    f_feature = np.array([3 / 4, 1 / 4])
    expected = f_head ** (2 * (1 - weight)) * f_feature ** (2 * weight)
    np.testing.assert_allclose(score.level(head, features).numpy(), expected, rtol=1e-5)
    assert score.describe()["feature_weight"] == weight
    if weight == 0.5:  # the plain product, as a file from before the weight scores
        old = _score("mahalanobis", whiten=whiten, centres=centres)
        assert torch.equal(score.level(head, features), old.level(head, features))


def test_saved_and_loaded_scores_alike(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 30)
    features = rng.normal(size=(60, 8)) + labels[:, None]
    val_features = rng.normal(size=(20, 8))
    val_head = rng.uniform(size=(20, 2))
    val_labels = np.where(np.arange(20) < 15, 1, -1)  # 15 known, 5 unknown
    unknown = rng.normal(size=(10, 8)) - 1
    for kind in ("mahalanobis", "knn", "mahalanobis+ratio"):
        fitted = fit_feature_score(
            kind,
            features,
            labels,
            val_head,
            val_features,
            val_labels,
            2,
            k=5,
            unknown_features=unknown,
        )
        path = tmp_path / f"{kind}.safetensors"
        fitted.save(path)
        loaded = FeatureScore.load(path)
        assert loaded.describe() == fitted.describe()
        head, feats = torch.from_numpy(val_head).float(), torch.from_numpy(val_features).float()
        assert torch.equal(loaded(head, feats), fitted(head, feats))
        assert fitted.head_ref.numel() == 15  # the known validation images only


def test_fit_and_load_refuse_what_they_cannot_use(tmp_path: Path) -> None:
    features, labels = np.eye(4), np.array([0, 0, 1, 1])
    head = np.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="no image of a known class"):
        fit_feature_score("mahalanobis", features, labels, head, features, np.full(4, -1), 2)
    with pytest.raises(ValueError, match="knn_k"):
        fit_feature_score("knn", features, labels, head, features, np.zeros(4), 2, k=0)
    for no_unknown in (None, np.zeros((0, 4))):
        with pytest.raises(ValueError, match="mahalanobis\\+ratio compares images with the unk"):
            fit_feature_score(
                "mahalanobis+ratio",
                features,
                labels,
                head,
                features,
                np.zeros(4),
                2,
                unknown_features=no_unknown,
            )
    with pytest.raises(ValueError, match="feature_score 'cosine'"):
        fit_feature_score("cosine", features, labels, head, features, np.zeros(4), 2)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not an opensig feature score file"):
        FeatureScore.load(other)


def test_thresholds_file_names_its_feature_score_and_refuses_another(
    untrained_bundle: Path, tmp_path: Path
) -> None:
    from opensig.decision import FEATURE_SCORE_FILE, THRESHOLDS_FILE, write_thresholds
    from opensig.model import model_digest
    from opensig.predict import Bundle

    folder = tmp_path / "bundle"
    shutil.copytree(untrained_bundle, folder)
    thresholds, stats = folder / THRESHOLDS_FILE, folder / FEATURE_SCORE_FILE
    classes, digest = ["0", "1", "2"], model_digest(folder)
    write_thresholds(thresholds, classes, [0.5] * 3, "fixed", {}, model_sha256=digest)
    assert stats.is_file() and Bundle.load(folder).feature_score is None  # an empty file

    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(30, 512)), np.arange(30) % 3
    fitted = fit_feature_score(
        "mahalanobis", features, labels, rng.uniform(size=(30, 3)), features, labels, 3
    )
    write_thresholds(
        thresholds, classes, [0.5] * 3, "fixed", {}, model_sha256=digest, feature_score=fitted
    )
    assert json.loads(thresholds.read_text())["feature_score"]["kind"] == "mahalanobis"
    loaded = Bundle.load(folder).feature_score
    assert loaded is not None and torch.equal(loaded.whiten, fitted.whiten)

    other = fit_feature_score(
        "knn", features, labels, rng.uniform(size=(30, 3)), features, labels, 3
    )
    other.save(stats)  # statistics that are not the ones the thresholds were tuned on
    with pytest.raises(ValueError, match=r"not the feature score .* was tuned on"):
        Bundle.load(folder)
    stats.unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        Bundle.load(folder)


def _platt_by_scipy(x: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """Platt (1999) written out: minimise the log-loss against his targets with scipy."""
    from scipy.optimize import minimize

    n_pos, n_neg = positive.sum(), (~positive).sum()
    target = np.where(positive, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(params: np.ndarray) -> float:
        z = params[0] * x + params[1]
        return float(np.sum(np.logaddexp(0, z) - target * z))

    slope, intercept = minimize(loss, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    return -slope, intercept / -slope


def test_calibration_is_platts_fit_on_the_log_surprisal() -> None:
    rng = np.random.default_rng(0)
    known = rng.uniform(0.05, 1.0, 300) ** 2  # levels of known images: often high
    other = rng.uniform(0.0, 0.3, 200) ** 3  # of unknown ones: low, overlapping
    level = np.concatenate([known, other]).astype(np.float32)
    positive = np.arange(500) < 300
    slope, log_u50 = fit_calibration(level, positive)
    x = np.log(-np.log(level.astype(np.float64)))
    assert (slope, log_u50) == pytest.approx(_platt_by_scipy(x, positive), rel=1e-3)
    # p = 1 / (1 + (u / u50) ** k): a half at u50, by hand at u = 2 u50
    calibration = torch.tensor([slope, log_u50])
    at = torch.tensor([math.exp(-math.exp(log_u50)), math.exp(-2 * math.exp(log_u50))])
    assert calibrated(at, calibration).tolist() == pytest.approx(
        [0.5, 1 / (1 + 2**slope)], rel=1e-4
    )


def test_separable_validation_still_gives_a_finite_increasing_probability() -> None:
    level = np.array([0.9, 0.6, 0.3, 0.05, 1e-20, 1e-30, 0.0], dtype=np.float32)
    positive = np.array([True] * 4 + [False] * 3)
    slope, log_u50 = fit_calibration(level, positive)
    assert 0 < slope < 50 and np.isfinite(log_u50)
    p = calibrated(torch.from_numpy(level), torch.tensor([slope, log_u50]))
    assert (p[:-1] > p[1:]).all() and (p > 0).all() and (p < 1).all()  # ranks kept, no ties
    assert p[3] > 0.5 > p[4]  # the boundary lies between the two groups


def test_nothing_to_calibrate_on_says_so(caplog: pytest.LogCaptureFixture) -> None:
    level = np.array([0.9, 0.5, 0.01], dtype=np.float32)
    assert fit_calibration(level, np.ones(3, dtype=bool)) == pytest.approx(
        (1.0, math.log(-math.log(0.01)))
    )
    assert "cannot be calibrated" in caplog.text and "add unknown images" in caplog.text


def test_file_without_calibration_scores_as_before(tmp_path: Path) -> None:
    # A feature score saved by an older opensig: no calibration, no scale in its metadata.
    score = _score("mahalanobis", whiten=[[1.0, 0.0], [0.0, 1.0]], centres=[[0.0, 0.0]])
    path = tmp_path / "old.safetensors"
    tensors = {name: buf.contiguous() for name, buf in score.named_buffers()}
    save_file(tensors, str(path), metadata={"kind": "mahalanobis", "k": "2"})
    old = FeatureScore.load(path)
    assert old.scale == "level" and old.describe()["scale"] == "level"
    head = torch.tensor([[0.3, 0.95], [0.7, 0.5]])
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    level = old.level(head, features)
    expected = head / head.max(dim=1, keepdim=True).values * level.unsqueeze(1)
    assert torch.equal(old(head, features), expected)
    # the same statistics with a calibration: a strictly increasing map of the same level
    score.register_buffer("calibration", torch.tensor([2.0, 0.0]))
    new = score(head, features)
    assert score.scale == "probability" and (new.argmax(dim=1) == head.argmax(dim=1)).all()
    assert torch.allclose(new.max(dim=1).values, calibrated(level, score.calibration))


@pytest.mark.parametrize("kind", ["mahalanobis", "mahalanobis++", "rmd", "knn"])
def test_feature_scores_rank_as_pytorch_ood_does(kind: str) -> None:
    """An independent implementation (pytorch-ood 0.4.0, Apache-2.0) on the same features:
    the same ranking of images (its outlier score is the opposite of opensig's)."""
    detectors = pytest.importorskip("pytorch_ood.detector", reason="pip install 'opensig[bench]'")
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], 60)
    mixing = rng.normal(size=(6, 6))
    train = rng.normal(size=(180, 6)) @ mixing + labels[:, None] * 2.0 + 5.0
    test = rng.normal(size=(80, 6)) @ mixing * 1.5 + 5.0
    fitted = fit_feature_score(kind, train, labels, np.ones((1, 3)), test[:1], np.zeros(1), 3, k=5)
    ours = fitted.known_score(torch.from_numpy(test).float()).numpy()
    if kind == "knn":
        theirs_fit = detectors.KNN(None, k=5)
    else:
        theirs_fit = detectors.RMD(None) if kind == "rmd" else detectors.Mahalanobis(None)
    z, t = torch.from_numpy(train).float(), torch.from_numpy(test).float()
    if kind == "mahalanobis++":
        z, t = z / z.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    theirs = theirs_fit.fit_features(z, torch.from_numpy(labels)).predict_features(t)
    assert spearmanr(ours, -np.asarray(theirs, dtype=np.float64)).statistic > 0.999


@pytest.mark.parametrize(
    "kind", ["mahalanobis", "mahalanobis++", "rmd", "knn", "mahalanobis+ratio"]
)
def test_a_class_of_one_image_and_more_dimensions_than_images_give_finite_scores(
    kind: str,
) -> None:
    """Few images (a singular covariance, one image in a class): finite scores and finite
    thresholds, never a NaN."""
    from opensig.thresholds import tune_thresholds

    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 0, 1])  # class 1: one image; 4 images in 16 dimensions
    train = rng.normal(size=(4, 16)) + labels[:, None]
    val_features = rng.normal(size=(6, 16))
    val_head = rng.uniform(size=(6, 2))
    val_labels = np.array([0, 1, 0, -1, -1, 1])
    unknown = rng.normal(size=(2, 16))  # fewer unknown images than k
    fitted = fit_feature_score(
        kind, train, labels, val_head, val_features, val_labels, 2, k=3, unknown_features=unknown
    )
    scores = fitted(torch.from_numpy(val_head).float(), torch.from_numpy(val_features).float())
    assert torch.isfinite(scores).all()
    assert np.isfinite(tune_thresholds(scores.numpy(), val_labels, "f1")).all()
