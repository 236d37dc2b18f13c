"""Sort predicted images into ``DIR/<label>/[<score bucket>/]`` folders, safely.

The tool people reach for after predict: "put the cats here, the unknowns there". Sources
are never moved, renamed or overwritten: each image is copied (or hard-linked) into a file
created exclusively, so an existing file of the same name gets a ``-1``, ``-2``... sibling
instead of being replaced. A CSV beside the folders says what went where, and why an image
did not go anywhere.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from opensig.io import atomic_write, copy_new, free_names, inside
from opensig.labels import LABEL_SEP

log = logging.getLogger(__name__)

MANIFEST = "sorted.csv"
COLUMNS = ["source", "destination", "label", "how", "score", "error"]


def parse_buckets(text: str | None) -> list[float]:
    """``"0.5,0.8"`` -> [0.5, 0.8]: strictly increasing cut points inside (0, 1)."""
    if not text:
        return []
    try:
        cuts = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--buckets {text!r}: use scores between 0 and 1, e.g. 0.5,0.8") from None
    if any(not 0 < c < 1 for c in cuts) or cuts != sorted(set(cuts)):
        raise ValueError(f"--buckets {text!r}: use increasing scores between 0 and 1, e.g. 0.5,0.8")
    return cuts


def bucket_name(score: float, cuts: Sequence[float]) -> str:
    """The score range folder a score falls in, e.g. ``score_0.50-0.80`` (lower bound included)."""
    edges = [0.0, *cuts, 1.0]
    i = bisect.bisect_right(cuts, score)
    return f"score_{edges[i]:.2f}-{edges[i + 1]:.2f}"


def check_destination(out: Path, inputs: Sequence[Path]) -> None:
    """The sorted folder must not sit inside an input folder: the copies would be predicted
    (and sorted again) on the next run over that folder."""
    for folder in (Path(p) for p in inputs if Path(p).is_dir()):
        if inside(out, folder, follow_links=True) is not None:
            raise ValueError(
                f"--sort-into {out} is inside the input folder {folder.resolve()}: pick a folder "
                "outside it"
            )


def _place(source: Path, folder: Path, link: bool) -> tuple[Path, str]:
    """Hard-link or copy ``source`` into ``folder`` under a name no file has yet."""
    folder.mkdir(parents=True, exist_ok=True)
    if link:
        for name in free_names(source.name):
            try:
                os.link(source, folder / name)
                return folder / name, "link"
            except FileExistsError:
                continue
            except OSError as err:  # another file system, or links not allowed: copy instead
                log.warning("cannot hard-link %s (%s): copying it", source, err.strerror)
                break
    return copy_new(source, folder), "copy"


def _free_name(folder: Path, name: str) -> Path:
    return next(folder / n for n in free_names(name) if not (folder / n).exists())


def sort_into(
    frame: pd.DataFrame, out: Path, link: bool = False, cuts: Sequence[float] = ()
) -> pd.DataFrame:
    """Place every predicted image of ``frame`` (predict's output) under ``out``.

    A row's ``labels`` column (multi-label predict: ``a|b``) places it in each of its
    classes; otherwise its ``label``. Rows with an error are listed, not placed. Returns,
    and writes to ``out/sorted.csv`` (``sorted-1.csv``... if taken), one row per
    placement or failure.
    """
    rows = []
    for rec in frame.to_dict("records"):
        base = {"source": rec["path"], "score": rec["score"]}
        if rec["error"]:
            rows.append({**base, "destination": "", "label": "", "how": "", "error": rec["error"]})
            continue
        for name in str(rec.get("labels") or rec["label"]).split(LABEL_SEP):
            folder = out / name / (bucket_name(rec["score"], cuts) if cuts else "")
            dest, how = _place(Path(rec["path"]), folder, link)
            rows.append(
                {**base, "destination": dest.as_posix(), "label": name, "how": how, "error": ""}
            )
    placed = pd.DataFrame(rows, columns=COLUMNS)
    manifest = _free_name(out, MANIFEST)
    atomic_write(manifest, lambda tmp: placed.to_csv(tmp, index=False))
    done = placed[placed["destination"] != ""]
    log.info(
        "sorted %d image(s) into %s (%s); %d not sorted; what went where: %s",
        len(done),
        out,
        ", ".join(f"{k}: {v}" for k, v in done["label"].value_counts().sort_index().items()),
        len(placed) - len(done),
        manifest,
    )
    return placed
