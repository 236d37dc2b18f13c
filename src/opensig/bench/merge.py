"""Bench results of one protocol and recipe, run apart, joined into one table.

Why: on 2 cores a bench table of three heads x three seeds takes more than an hour, and a
session (or a machine) may end before it does. Run the heads or the seeds apart (``--method``,
``--work``, ``--out``), then merge: the joined file is what one run of every head would have
written (summary, paired differences from the default, cross-check, class splits), so
``opensig bench compare`` and the tables read it as any other. Only runs of the same protocol
and the same settings are joined, and no run may be in two files: a merge never mixes recipes
or silently keeps one of two figures.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from opensig.bench.common import MACHINE_KEYS
from opensig.bench.compare import PAIR, check_protocol, load_results, setting_changes
from opensig.bench.openset import write_results
from opensig.io import read_json


def merge(paths: list[Path], out: Path) -> str:
    """Join the runs of ``paths`` (``opensig bench openset`` results) and write the joined
    result under ``out``; returns its Markdown table."""
    if len(paths) < 2:
        raise ValueError("bench merge: pass two or more openset_<dataset>*.json files")
    metas, runs, checks = [], [], []
    for path in paths:
        meta, rows = load_results(path)
        metas.append(meta)
        runs.append(rows.assign(**{"from": str(path)}))
        checks.append(pd.DataFrame(read_json(Path(path)).get("cross_check", [])))
    first = paths[0]
    for path, meta in zip(paths[1:], metas[1:], strict=True):
        check_protocol(first, metas[0], path, meta, "merge")
        changes = setting_changes(metas[0], meta)
        if changes:
            key, old, new = changes[0]
            raise ValueError(
                f"{path}: `{key}` is {new!r}, {first} has {old!r}; merge runs of one recipe "
                "(`opensig bench compare` pairs two recipes)"
            )
    joined = pd.concat(runs, ignore_index=True)
    twice = joined[joined.duplicated(PAIR, keep=False)]
    if not twice.empty:
        run = twice.iloc[0]
        where = sorted(twice[(twice[PAIR] == run[PAIR]).all(axis=1)]["from"])
        raise ValueError(
            f"the run of class split {run['split']}, seed {run['seed']}, {run['method']} + "
            f"{run['feature_score']} is in {' and '.join(where)}; merge files of other "
            "methods or seeds, or leave one of them out"
        )
    meta = {key: value for key, value in metas[0].items() if key not in MACHINE_KEYS}
    meta["seeds"] = sorted({seed for m in metas for seed in m.get("seeds", [])})
    meta["feature_scores"] = (
        list(dict.fromkeys(score for m in metas for score in m.get("feature_scores") or [])) or None
    )
    meta["merged_from"] = [  # a merged file's own parts, or the file and where it ran
        part
        for path, m in zip(paths, metas, strict=True)
        for part in m.get("merged_from")
        or [{"file": str(path), **{key: m.get(key) for key in MACHINE_KEYS}}]
    ]
    _, table = write_results(
        out, meta, joined.drop(columns="from"), pd.concat(checks, ignore_index=True)
    )
    return table
