"""assign_splits / split_summary on synthetic records (splits only look at hash, label, source)."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from opensig.data.split import (
    MIN_TRAIN_PER_CLASS,
    assign_splits,
    small_test_warnings,
    small_train_warning,
    split_summary,
)


def _records(n: int, start: int = 0) -> pd.DataFrame:
    """Fake records: labels cycle cat, dog, unknown; unknowns come from two sources."""
    rows = []
    for i in range(start, start + n):
        label = ["cat", "dog", "unknown"][i % 3]
        source = label if label != "unknown" else ["street", "park"][i % 2]
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        rows.append({"path": f"p/{i}.png", "hash": digest, "label": label, "source": source})
    return pd.DataFrame(rows)


def test_split_follows_the_documented_formula() -> None:
    df = assign_splits(_records(50), val_fraction=0.2, test_fraction=0.1, holdout_sources=[])
    for row in df.itertuples():
        digest = hashlib.sha256(f"0:{row.hash}".encode()).hexdigest()
        u = int(digest[:16], 16) / 2**64
        assert row.split == ("test" if u < 0.1 else "val" if u < 0.3 else "train")


def test_adding_images_never_moves_old_ones() -> None:
    old = assign_splits(_records(1000), 0.2, 0.1, [], seed=3)
    grown = pd.concat([_records(1000, start=1000), _records(1000)]).sample(frac=1, random_state=0)
    new = assign_splits(grown, 0.2, 0.1, [], seed=3).set_index("path")
    assert (new.loc[old["path"], "split"].to_numpy() == old["split"].to_numpy()).all()


def test_seed_changes_the_split() -> None:
    a = assign_splits(_records(300), 0.2, 0.1, [], seed=0)
    b = assign_splits(_records(300), 0.2, 0.1, [], seed=1)
    assert (a["split"] != b["split"]).any()


def test_fractions_are_roughly_respected_per_label() -> None:
    df = assign_splits(_records(2000), val_fraction=0.2, test_fraction=0.1, holdout_sources=[])
    shares = df.groupby("label")["split"].value_counts(normalize=True)
    for label in ("cat", "dog", "unknown"):
        # ~667 images per label: 4 standard deviations of a binomial share is under 0.07.
        assert shares[label, "test"] == pytest.approx(0.1, abs=0.05)
        assert shares[label, "val"] == pytest.approx(0.2, abs=0.07)
        assert shares[label, "train"] == pytest.approx(0.7, abs=0.07)


def test_holdout_sources_go_to_test_only_and_are_novel() -> None:
    records = _records(600)
    df = assign_splits(records, 0.2, 0.1, holdout_sources=["street"])
    street = (df["label"] == "unknown") & (df["source"] == "street")
    assert street.sum() == 100
    assert (df.loc[street, "split"] == "test").all()
    assert df["novel"].equals(street)
    both = assign_splits(records, 0.2, 0.1, holdout_sources=["street", "park"])
    assert both["novel"].equals(both["label"] == "unknown")
    assert set(both.loc[both["label"] == "cat", "split"]) == {"train", "val", "test"}
    assert "split" not in records.columns  # the input is left alone


def test_a_class_that_is_also_an_unknown_source_is_refused() -> None:
    records = _records(60)
    records.loc[records["source"] == "park", "source"] = "cat"  # known/cat/ and unknown/cat/
    with pytest.raises(ValueError, match=r"'cat' is both a class.*known/cat/ and unknown/cat/"):
        assign_splits(records, 0.2, 0.1, holdout_sources=[])
    # a held-out source whose images were imported as a class, the folder left behind
    with pytest.raises(ValueError, match=r"unknown/cat/ and data\.holdout_unknown.*review import"):
        assign_splits(records, 0.2, 0.1, holdout_sources=["cat"])
    # held out by name only: said before "no such source"
    with pytest.raises(ValueError, match=r"'dog' is both .* \(known/dog/ and data\.holdout"):
        assign_splits(_records(60), 0.2, 0.1, holdout_sources=["dog"])


def test_unknown_holdout_name_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"data\.holdout_unknown.*'parks'.*'street'"):
        assign_splits(_records(30), 0.2, 0.1, holdout_sources=["street", "parks"])


def test_holdout_given_as_a_string_is_an_error() -> None:
    with pytest.raises(TypeError):
        assign_splits(_records(30), 0.2, 0.1, holdout_sources="street")


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.5, 0.5), (0.2, 1.0)])
def test_bad_fractions(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        assign_splits(_records(30), val, test, [])


def test_summary_counts_and_warnings(caplog) -> None:
    # concat keeps index 0 twice: neither function may rely on a unique index
    records = pd.concat([_records(300), _records(1, start=10_000).assign(label="rare")])
    df = assign_splits(records, 0.2, 0.1, holdout_sources=["street"])
    summary = split_summary(df)
    counts = summary["counts"]
    assert set(counts) == {"train", "val", "test"}
    for label in ("cat", "dog", "unknown", "rare"):
        assert sum(counts[s][label] for s in counts) == (df["label"] == label).sum()
    assert summary["novel"] == 50
    rare_split = df.loc[df["label"] == "rare", "split"].item()
    missing = [s for s in ("train", "val", "test") if s != rare_split]
    assert summary["warnings"] == [f"class 'rare' has no {s} images" for s in missing]
    logged = [r.message for r in caplog.records]
    assert all(w in logged for w in summary["warnings"])


def test_summary_warns_when_training_unknowns_are_missing_from_a_split() -> None:
    records = _records(300)
    only_street = records[(records["label"] != "unknown") | (records["source"] == "street")]
    # the only unknown source is held out: none are left to train or tune on
    warnings = split_summary(assign_splits(only_street, 0.2, 0.1, ["street"]))["warnings"]
    assert warnings == []
    unknowns = records[records["label"] == "unknown"].head(1)
    mixed = pd.concat([records[records["label"] != "unknown"], unknowns])
    warnings = split_summary(assign_splits(mixed, 0.2, 0.1, []))["warnings"]
    assert len(warnings) == 2
    assert all("unknowns from non-held-out sources" in w for w in warnings)


def _split_rows(counts: dict[str, int], novel: int = 0) -> pd.DataFrame:
    """Rows of one split: ``counts`` images per label, plus ``novel`` held-out unknowns."""
    labels = [label for label, n in counts.items() for _ in range(n)]
    return pd.DataFrame(
        {
            "label": labels + ["unknown"] * novel,
            "novel": [False] * len(labels) + [True] * novel,
        }
    )


def test_small_train_split_warns_without_pretrained_weights() -> None:
    rows = _split_rows({"circle": 120, "square": 299, "triangle": 300, "unknown": 50})
    warning = small_train_warning(rows, pretrained=False)
    assert warning is not None
    assert "'circle' (120), 'square' (299), with no pretrained weights" in warning
    assert "triangle" not in warning
    assert "model.pretrained: true" in warning and "model.pretrained_file" in warning
    assert small_train_warning(rows, pretrained=True) is None
    enough = _split_rows({"circle": MIN_TRAIN_PER_CLASS, "square": 1000})
    assert small_train_warning(enough, pretrained=False) is None


def test_small_train_warning_counts_multi_label_images_per_class_and_lists_five() -> None:
    rows = _split_rows({f"c{i}": 10 + i for i in range(8)} | {"c0|c1": 400})
    warning = small_train_warning(rows, pretrained=False)
    assert warning is not None
    assert "'c2' (12), 'c3' (13), 'c4' (14), 'c5' (15), 'c6' (16) and 1 more," in warning
    assert (
        "c0" not in warning and "c1" not in warning
    )  # 410 images: the multi-label ones count for both classes


def test_small_test_split_warns_per_metric_group() -> None:
    assert small_test_warnings(_split_rows({"a": 30, "b": 40, "unknown": 100}, novel=100)) == []
    few_class, few_unknown, few_novel = small_test_warnings(
        _split_rows({"a": 29, "b": 40, "unknown": 60}, novel=30)
    )
    assert few_class.startswith("test split: under 30 images in class(es) 'a' (29):")
    assert "only 90 unknown images (under 100): unknown_recall, auroc" in few_unknown
    assert "only 30 held-out unknown images" in few_novel and "novel.*" in few_novel
    # no held-out source at all: no novel metrics to warn about
    assert len(small_test_warnings(_split_rows({"a": 30, "unknown": 99}))) == 1
