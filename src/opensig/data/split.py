"""Hash-stable train/val/test splits, with held-out unknown sources kept for testing only."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from opensig.labels import LABEL_SEP, UNKNOWN_LABEL

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# Training a network from scratch needs a few hundred images per class: below that it often
# stays near chance on real photos (a 3-class shapes set reached macro-F1 0.37), while a
# pretrained backbone copes with far fewer.
MIN_TRAIN_PER_CLASS = 300
# A rate measured on n images has a standard error of up to 0.5/sqrt(n): about 0.09 for a
# class's 30 test images, 0.05 for 100 unknowns. Below these, test metrics move by more than
# two models usually differ, from one split to another.
MIN_TEST_PER_CLASS = 30
MIN_TEST_UNKNOWN = 100
_LISTED = 5  # classes named in a warning; the rest are counted


def _unit_interval(content_hash: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{content_hash}".encode()).hexdigest()
    return int(digest[:16], 16) / 2**64


def assign_splits(
    records: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    holdout_sources: Sequence[str],
    seed: int = 0,
) -> pd.DataFrame:
    """Return a copy of `records` with a `split` column (train/val/test) and a `novel` column.

    An image's split depends only on its content hash, the seed and the fractions: it maps to
    u = sha256(f"{seed}:{hash}")[:16 hex] / 2**64 in [0, 1), and goes to test if
    u < test_fraction, else to val if u < test_fraction + val_fraction, else to train. Adding
    or removing images therefore never moves another image to a different split, and since
    every class uses the same fractions the split is stratified in expectation (not exactly:
    a class with few images can end up with none in val or test; see `split_summary`).

    Unknown images whose `source` is in `holdout_sources` are novel: they always go to test,
    so the model is never trained or tuned on them, and `novel` is True for them only.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1 to leave images for training, "
            f"got {val_fraction} + {test_fraction}"
        )
    if isinstance(holdout_sources, str):
        raise TypeError(f"holdout_sources must be a list of names, not {holdout_sources!r}")

    # numpy masks throughout: the records' index may have duplicates (e.g. after a concat)
    is_unknown = (records["label"] == UNKNOWN_LABEL).to_numpy()
    found = sorted(records.loc[is_unknown, "source"].unique())
    check_contradictions(records.loc[~is_unknown, "label"], found, holdout_sources)
    missing = [s for s in holdout_sources if s not in found]
    if missing:
        raise ValueError(
            f"data.holdout_unknown names unknown source(s) {missing} that do not exist; "
            f"sources found under unknown/: {found}"
        )

    u = np.array([_unit_interval(h, seed) for h in records["hash"]])
    novel = is_unknown & records["source"].isin(list(holdout_sources)).to_numpy()
    split = np.where(
        u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train")
    )
    out = records.copy()
    out["split"] = np.where(novel, "test", split)
    out["novel"] = novel
    return out


def check_contradictions(
    labels: pd.Series, unknown_sources: Sequence[str], holdout_sources: Sequence[str]
) -> None:
    """Refuse a name that is both a class and a kind of unknown: the model would be trained
    to answer it and tuned and evaluated to reject it (a held-out source that became a
    class once its images were reviewed), and every figure would mislead without a word."""
    classes = set(labels.str.split(LABEL_SEP).explode())
    both = sorted(classes & (set(unknown_sources) | set(holdout_sources)))
    if not both:
        return
    name = both[0]
    where = [f"known/{name}/"]
    where += [f"unknown/{name}/"] if name in unknown_sources else []
    where += ["data.holdout_unknown"] if name in holdout_sources else []
    more = f" (and {len(both) - 1} more: {both[1:]})" if len(both) > 1 else ""
    raise ValueError(
        f"{name!r} is both a class and an unknown source ({' and '.join(where)}){more}: "
        f"move the images of unknown/{name}/ into known/{name}/ (`opensig review import "
        f"--from-unknown {name}` does it and records it) or rename one, and take {name!r} "
        "out of data.holdout_unknown"
    )


def _per_class(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (image, class): a multi-label image ("cat|dog") counts for each class."""
    return df.assign(label=df["label"].str.split(LABEL_SEP)).explode("label")


def split_summary(df: pd.DataFrame) -> dict:
    """Count images per split and label, and warn about classes missing from a split.

    Returns {"counts": {split: {label: n}}, "novel": n, "warnings": [...]}. Non-novel unknowns
    are checked like classes, since threshold tuning needs them in val. Warnings are logged too.
    A multi-label image counts once for each of its classes.
    """
    df = _per_class(df)
    sizes = df.groupby(["split", "label"]).size()
    labels = sorted(df["label"].unique())
    counts = {s: {lab: int(sizes.get((s, lab), 0)) for lab in labels} for s in SPLITS}

    seen = df[~df["novel"].to_numpy()]
    seen_sizes = seen.groupby(["split", "label"]).size()
    warnings = []
    for label in sorted(seen["label"].unique()):
        for split in SPLITS:
            if seen_sizes.get((split, label), 0) == 0:
                if label == UNKNOWN_LABEL:
                    warnings.append(f"no {split} images of unknowns from non-held-out sources")
                else:
                    warnings.append(f"class '{label}' has no {split} images")
    for message in warnings:
        log.warning(message)
    return {"counts": counts, "novel": int(df["novel"].sum()), "warnings": warnings}


def check_trainable(df: pd.DataFrame) -> None:
    """Fail, naming them, on classes without a train image: outputs the model never learns.

    With few images a class can also miss val or test (the split is by hash, not quota);
    that only warns (:func:`split_summary`): its threshold stays 0.5 and test metrics lack it.
    """
    known = _per_class(df[df["label"] != UNKNOWN_LABEL])
    totals = known.groupby("label").size()
    trained = known[known["split"] == "train"].groupby("label").size()
    missing = {label: int(n) for label, n in totals.items() if trained.get(label, 0) == 0}
    if missing:
        listed = ", ".join(
            f"'{label}' ({n} image(s), none in train)" for label, n in missing.items()
        )
        raise ValueError(
            f"class(es) {listed}: add images (a class needs several so that train, val and "
            "test each get some) or remove the folder"
        )


def _class_counts(rows: pd.DataFrame) -> pd.Series:
    """Images per known class in ``rows``, fewest first."""
    known = _per_class(rows[rows["label"] != UNKNOWN_LABEL])
    return known.groupby("label").size().sort_values(kind="stable")


def _listed(counts: pd.Series) -> str:
    named = ", ".join(f"'{label}' ({n})" for label, n in counts.head(_LISTED).items())
    more = len(counts) - _LISTED
    return named + (f" and {more} more" if more > 0 else "")


def small_train_warning(rows: pd.DataFrame, pretrained: bool) -> str | None:
    """Why training from scratch on the train split ``rows`` may learn little, or None when
    the backbone starts from pretrained weights or every class has enough images."""
    few = _class_counts(rows)
    few = few[few < MIN_TRAIN_PER_CLASS]
    if pretrained or few.empty:
        return None
    return (
        f"train split: under {MIN_TRAIN_PER_CLASS} images in class(es) {_listed(few)}, with no "
        "pretrained weights: a network trained from scratch on so few images often stays "
        "near chance; set model.pretrained: true (downloads the weights) or "
        "model.pretrained_file: <a local weights file> (offline; docs/configuration.md)"
    )


def small_test_warnings(rows: pd.DataFrame) -> list[str]:
    """Which metrics of the test split ``rows`` rest on too few images to mean much."""
    warnings = []
    few = _class_counts(rows)
    few = few[few < MIN_TEST_PER_CLASS]
    if not few.empty:
        warnings.append(
            f"test split: under {MIN_TEST_PER_CLASS} images in class(es) {_listed(few)}: "
            "their scores and macro_f1 are rough; add images or raise data.test_fraction"
        )
    unknown = int((rows["label"] == UNKNOWN_LABEL).sum())
    novel = int(rows["novel"].sum())
    if 0 < unknown < MIN_TEST_UNKNOWN:
        warnings.append(
            f"test split: only {unknown} unknown images (under {MIN_TEST_UNKNOWN}): "
            "unknown_recall, auroc, fpr95 and oscr are rough; add unknown images or raise "
            "data.test_fraction"
        )
    if 0 < novel < MIN_TEST_UNKNOWN:
        warnings.append(
            f"test split: only {novel} held-out unknown images (under {MIN_TEST_UNKNOWN}): "
            "the novel.* metrics are rough; add images of the data.holdout_unknown sources"
        )
    return warnings
