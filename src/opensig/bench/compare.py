"""Two `opensig bench openset` results, paired: did a recipe change help, beyond the seeds?

A recipe change (more epochs, another learning rate, an augmentation) is judged by running
the bench twice, once per recipe, on the same protocol and seeds. Each (class split, seed,
method, feature score) run of the candidate is paired with the same run of the base, so the
differences are measured on the same class split and training seed, and the table gives the
mean and 95% t-interval of the candidate minus the base. The protocol, the data budget and
the seeds must match; the settings that differ (what is being compared) are listed, and
where each ran: the same seed on other CPU kernels or threads is another network
(bench/README.md, *Same seed, another machine*), so pairs from two paths share little.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from opensig.bench.common import MACHINE_KEYS
from opensig.bench.openset import ROW, interval_columns, paired_markdown
from opensig.io import read_json

COMPARED = {  # result key -> header
    "known_accuracy": "known acc",
    "macro_f1": "macro-F1",
    "val_auroc": "val AUROC",
    "novel.auroc": "novel AUROC",
    "novel.fpr95": "novel FPR95",
    "novel.oscr": "novel OSCR",
}
PAIR = ["split", "seed", *ROW]  # what one run is
PROTOCOL_KEYS = ("dataset", "near", "random_splits", "class_splits", "per_class", "test_per_class")
NOT_SETTINGS = {*MACHINE_KEYS, "seeds", "feature_scores", "merged_from"}


def load_results(path: Path) -> tuple[dict, pd.DataFrame]:
    """A bench result file's settings and its runs; one clear error if it is not one."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: not found; pass a file `opensig bench openset` wrote "
            "(bench/results/openset_<dataset>*.json)"
        )
    try:
        saved = read_json(Path(path))
        meta, runs = saved["meta"], pd.DataFrame(saved["runs"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path}: not an `opensig bench openset` result (openset_<dataset>*.json): {err}"
        ) from None
    missing = [key for key in (*PAIR, *COMPARED) if key not in runs.columns]
    if missing:
        raise ValueError(f"{path}: runs lack {missing}; re-run `opensig bench openset`")
    return meta, runs


def _flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings as ``a.b`` keys, so that one changed value names itself."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_protocol(first: Path, first_meta: dict, path: Path, meta: dict, verb: str) -> None:
    """One clear error where two result files were measured on different protocols."""
    for key in PROTOCOL_KEYS:
        if meta.get(key) != first_meta.get(key):
            raise ValueError(
                f"{path}: {key} is {meta.get(key)!r}, {first} has {first_meta.get(key)!r}; "
                f"{verb} runs of one protocol"
            )


def setting_changes(base: dict, candidate: dict) -> list[tuple[str, object, object]]:
    """(key, base value, candidate value) for every setting that differs, environment aside."""
    a, b = _flat(base), _flat(candidate)
    return [
        (key, a.get(key), b.get(key))
        for key in sorted(a.keys() | b.keys())
        if key not in NOT_SETTINGS and a.get(key) != b.get(key)
    ]


def compare_runs(base: pd.DataFrame, candidate: pd.DataFrame) -> pd.DataFrame:
    """Per (method, feature score) in both: candidate minus base over the runs of the same
    class split and seed, mean and 95% t-interval per :data:`COMPARED` key."""
    joined = candidate.merge(base, on=PAIR, suffixes=("", "_base"))
    rows = []
    for (method, score), group in joined.groupby(ROW, sort=False):
        diff = pd.DataFrame(
            {key: group[key].astype(float) - group[f"{key}_base"].astype(float) for key in COMPARED}
        )
        rows.append(
            {"method": method, "feature_score": score, "pairs": len(group)}
            | interval_columns(diff, COMPARED)
        )
    return pd.DataFrame(rows).set_index(ROW) if rows else pd.DataFrame()


def ran_on(meta: dict) -> list[str]:
    """The floating-point paths (machine, CPU kernels, threads) a result ran on: a merged
    file's parts', each once, in order; ``not recorded`` for results older than the record."""
    parts = meta.get("merged_from") or [meta]
    described = (
        f"{part.get('machine')}, {part['cpu_capability']}, {part.get('threads')} threads"
        if part.get("cpu_capability")
        else f"{part.get('machine')}, kernels and threads not recorded"
        for part in parts
    )
    return list(dict.fromkeys(described))


def compare(base_path: Path, candidate_path: Path) -> str:
    """The Markdown comparison of two bench result files (candidate minus base)."""
    base_meta, base = load_results(base_path)
    cand_meta, candidate = load_results(candidate_path)
    check_protocol(base_path, base_meta, candidate_path, cand_meta, "compare")
    paired = compare_runs(base, candidate)
    if paired.empty:
        raise ValueError(
            f"{base_path} and {candidate_path} share no (class split, seed, method, feature "
            "score) run; run the bench with the same --seeds and --method"
        )
    changes = setting_changes(base_meta, cand_meta)
    lines = [f"Candidate {candidate_path} minus base {base_path}, paired by class split and seed."]
    lines += ["", "Settings that differ (base -> candidate):", ""]
    lines += [f"- `{key}`: {old!r} -> {new!r}" for key, old, new in changes] or ["- none"]
    base_paths, cand_paths = ran_on(base_meta), ran_on(cand_meta)
    lines += ["", f"Ran on: base {'; '.join(base_paths)}; candidate {'; '.join(cand_paths)}."]
    paths = {*base_paths, *cand_paths}
    if len(paths) > 1 or any(path.endswith("not recorded") for path in paths):
        lines += [
            "Not one recorded floating-point path: a seed trained elsewhere is another "
            "network, so a pair shares little; read an interval that barely misses zero as level."
        ]
    lines += ["", "Paired differences: mean [95% interval]", ""]
    return "\n".join(lines) + "\n" + paired_markdown(paired, COMPARED)
