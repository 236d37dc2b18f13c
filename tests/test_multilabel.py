"""Multi-label data: the labels CSV, multi-hot targets, tuning, metrics and predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from opensig.data.labels_csv import scan_csv
from opensig.data.manifest import is_multi_label, known_classes, label_targets, multi_hot
from opensig.data.split import check_trainable, split_summary
from opensig.methods import sample_weights, sigmoid_targets
from opensig.metrics import multilabel_metrics
from opensig.predict import Bundle
from opensig.thresholds import _ovr_f1_thresholds, decide_multi, tune_thresholds

CLASSES = ["cat", "dog", "owl"]
LABELS = ["cat|dog", "dog", "unknown", "owl", "cat|owl", "unknown"]


def test_manifest_labels_to_targets() -> None:
    frame = pd.DataFrame({"label": LABELS})
    assert known_classes(frame) == CLASSES
    assert is_multi_label(LABELS) and not is_multi_label(["cat", "unknown"])
    expected = [[1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 1], [0, 0, 0]]
    assert multi_hot(LABELS, CLASSES).tolist() == expected
    assert label_targets(["dog", "unknown"], CLASSES, multi_label=False).tolist() == [1, -1]
    assert label_targets(["dog"], CLASSES, multi_label=True).tolist() == [[0, 1, 0]]
    with pytest.raises(ValueError, match=r"\['cow'\] are not among"):
        multi_hot(["cat|cow"], CLASSES)


def test_multi_hot_targets_smoothing_and_unknown_weights() -> None:
    labels = torch.tensor(multi_hot(LABELS, CLASSES))
    targets = sigmoid_targets(labels, 3, smoothing=0.1)
    assert targets[0].tolist() == pytest.approx([0.9, 0.9, 0.1])
    assert targets[2].tolist() == pytest.approx([0.1, 0.1, 0.1])  # unknown: all "no"
    assert sample_weights(labels, 3.0).tolist() == [1, 1, 3, 1, 1, 3]


def test_split_checks_count_each_class_of_a_multi_label_image() -> None:
    frame = pd.DataFrame(
        {
            "label": ["cat|dog", "dog", "cat", "unknown"],
            "split": ["train", "train", "val", "val"],
            "novel": [False] * 4,
        }
    )
    check_trainable(frame)  # cat and dog both have a train image
    summary = split_summary(frame)
    assert summary["counts"]["train"]["cat"] == 1 and summary["counts"]["train"]["dog"] == 2
    with pytest.raises(ValueError, match="'owl'"):
        check_trainable(pd.concat([frame, pd.DataFrame([{"label": "owl", "split": "test"}])]))


def _scores_and_targets(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, (200, 3))
    scores = np.clip(targets * 0.5 + rng.normal(0.25, 0.2, (200, 3)), 0, 1)
    return scores, targets


def test_multilabel_metrics_match_scikit_learn() -> None:
    scores, targets = _scores_and_targets()
    thresholds = np.array([0.5, 0.4, 0.6])
    metrics = multilabel_metrics(scores, targets, thresholds, CLASSES)
    preds = (scores >= thresholds).astype(int)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, average=None, zero_division=0
    )
    for k, name in enumerate(CLASSES):
        row = metrics["per_class"][name]
        assert row["precision"] == pytest.approx(precision[k])
        assert row["recall"] == pytest.approx(recall[k])
        assert row["f1"] == pytest.approx(f1[k])
        assert row["support"] == support[k]
    assert metrics["macro_f1"] == pytest.approx(f1_score(targets, preds, average="macro"))
    assert metrics["micro_f1"] == pytest.approx(f1_score(targets, preds, average="micro"))
    assert metrics["subset_accuracy"] == pytest.approx(accuracy_score(targets, preds))
    unknown = targets.sum(axis=1) == 0
    assert metrics["n_unknown"] == unknown.sum()
    assert metrics["unknown_recall"] == pytest.approx((preds[unknown].sum(axis=1) == 0).mean())


def test_multilabel_tuning_is_per_class_f1_and_decisions_are_independent() -> None:
    scores, targets = _scores_and_targets(1)
    thresholds = tune_thresholds(scores, targets, "f1")
    np.testing.assert_array_equal(thresholds, _ovr_f1_thresholds(scores, targets))
    for k in range(3):  # no other threshold on the grid beats the tuned one for its class
        best = f1_score(targets[:, k], scores[:, k] >= thresholds[k])
        for t in np.unique(scores[:, k]):
            assert f1_score(targets[:, k], scores[:, k] >= t) <= best + 1e-12
    assert decide_multi([[0.9, 0.7, 0.1]], [0.5, 0.5, 0.5]).tolist() == [[True, True, False]]
    assert tune_thresholds(scores, targets, "precision", target_precision=0.9).shape == (3,)


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def test_labels_csv_rows_are_kept_or_reported(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(5):
        _png(root / "img" / f"{i}.png", i)
    _png(root / "street" / "u.png", 9)
    (root / "labels.csv").write_text(
        "path,labels\n"
        "img/0.png,cat|dog\n"
        "img/1.png, dog | cat \n"  # spaces and order do not matter
        "img/2.png,owl\n"
        "street/u.png,\n"  # empty: an unknown image, source 'street'
        "img/3.png,unknown\n"  # reserved word
        "../outside.png,cat\n"
        "img/missing.png,dog\n"
        "img/4.png,cat\n"
    )
    result = scan_csv(root, root / "labels.csv")
    rows = result.records.set_index("path")
    assert result.classes == CLASSES
    assert rows.loc[f"{root.as_posix()}/img/1.png", "label"] == "cat|dog"
    assert rows.loc[f"{root.as_posix()}/street/u.png", ["label", "source"]].tolist() == [
        "unknown",
        "street",
    ]
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in result.skipped}
    assert "not a class" in reasons["3.png"]
    assert "outside the data folder" in reasons["outside.png"]
    assert "not found" in reasons["missing.png"]
    counts = result.counts()
    assert counts["found"] == 8 == sum(v for k, v in counts.items() if k != "found")


def test_labels_csv_without_its_columns_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,classes\na.png,cat\n")
    with pytest.raises(ValueError, match=r"labels\.csv: missing column\(s\) \['path', 'labels'\]"):
        scan_csv(tmp_path, tmp_path / "labels.csv")


def test_predict_multi_label_lists_every_passing_class(
    untrained_bundle: Path, digits_data: Path
) -> None:
    bundle = Bundle.load(untrained_bundle, device="cpu")
    bundle.thresholds[:] = [0.0, 0.0, 1.1]  # classes 0 and 1 always pass, 2 never
    files = sorted((digits_data / "known" / "0").iterdir())[:3]
    frame = bundle.predict(files, progress=False, multi_label=True)
    assert list(frame["labels"]) == ["0|1"] * 3
    bundle.thresholds[:] = 1.1
    assert (
        list(bundle.predict(files, progress=False, multi_label=True)["labels"]) == ["unknown"] * 3
    )
