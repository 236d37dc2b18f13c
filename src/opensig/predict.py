"""Batch inference: a bundle (weights + spec + thresholds) turns images into labels.

The same code serves ``opensig predict``, the tune and evaluate stages (through
``score_sources``) and the MLflow pyfunc, so a registered model answers exactly as it
was evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from opensig.data.dataset import ImageDataset, eval_transform, loader_workers, model_input
from opensig.data.images import ImageSource
from opensig.data.scan import LABEL_SEP, UNKNOWN_LABEL, display, walk_files
from opensig.io import atomic_write, env_defaults, read_json, write_json
from opensig.methods import get_method
from opensig.model import ModelSpec, confine, load_model_dir, resolve_device
from opensig.progress import image_bar
from opensig.thresholds import UNKNOWN, decide, decide_multi

log = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"
BUNDLE_DIR = "bundle"  # the folder name inside a logged MLflow model's artifacts


@torch.no_grad()
def score_sources(
    model: torch.nn.Module,
    spec: ModelSpec,
    sources: Sequence[ImageSource],
    batch_size: int = 256,
    progress: bool = True,
    num_workers: int | str = "auto",
) -> tuple[np.ndarray, list[str]]:
    """Per-class scores (N, K) for images, plus one error string per image ('' if fine).

    Batched, in fp32 (thresholds were tuned on fp32 scores), with decoding in worker
    processes on GPU so the model does not wait for the files.
    """
    device = next(model.parameters()).device
    method = get_method(spec.method)
    dataset = ImageDataset(
        sources, None, eval_transform(spec), spec.in_chans, min_size=spec.image_size
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=loader_workers(num_workers, device),
        pin_memory=device.type == "cuda",
    )
    scores, errors = [], []
    model.eval()
    with image_bar(len(dataset), "scoring", show=progress) as bar:
        for batch in loader:
            logits = model(model_input(batch["image"], spec, device))
            scores.append(method.scores(logits).cpu().numpy())
            errors.extend(batch["error"])
            bar.update(len(batch["error"]))
    empty = np.zeros((0, spec.num_classes), dtype=np.float32)
    return (np.concatenate(scores) if scores else empty), errors


def write_thresholds(
    path: Path, classes: Sequence[str], values: np.ndarray, strategy: str, options: dict
) -> None:
    write_json(
        path,
        {
            "strategy": strategy,
            "options": options,
            "thresholds": {c: float(v) for c, v in zip(classes, values, strict=True)},
        },
    )


def read_thresholds(path: Path, classes: Sequence[str]) -> np.ndarray:
    """Thresholds in the model's class order; a mismatch means files from two different runs."""
    by_class = read_json(path)["thresholds"]
    if sorted(by_class) != sorted(classes):
        raise ValueError(
            f"{path}: thresholds are for classes {sorted(by_class)}, "
            f"the model has {list(classes)}; rerun `opensig tune`"
        )
    return np.array([by_class[c] for c in classes], dtype=np.float64)


@dataclass
class Bundle:
    """A ready-to-use classifier: model, its spec and one threshold per class."""

    model: torch.nn.Module
    spec: ModelSpec
    thresholds: np.ndarray

    @classmethod
    def load(cls, model_dir: Path, thresholds: Path | None = None, device: str = "auto") -> Bundle:
        model_dir = Path(model_dir)
        thresholds = Path(thresholds) if thresholds else model_dir / THRESHOLDS_FILE
        if not thresholds.is_file():
            raise FileNotFoundError(
                f"{thresholds}: no thresholds for model {model_dir}; pass --thresholds "
                "(e.g. artifacts/thresholds.json) or use a registered model"
            )
        model, spec = load_model_dir(model_dir, resolve_device(device))
        return cls(model, spec, read_thresholds(thresholds, spec.classes))

    def predict(
        self,
        sources: Sequence[ImageSource],
        names: Sequence[str] | None = None,
        batch_size: int = 256,
        progress: bool = True,
        num_workers: int | str = "auto",
        multi_label: bool = False,
    ) -> pd.DataFrame:
        """One row per image: path, label (class or 'unknown'), score, score_<class>, error.

        ``multi_label`` adds ``labels``: every class that passes its threshold (``a|b``), or
        'unknown'. ``label`` stays the single best class, so both readings are there.
        """
        scores, errors = score_sources(
            self.model, self.spec, sources, batch_size, progress, num_workers
        )
        decided = decide(scores, self.thresholds)
        classes = np.array([*self.spec.classes, UNKNOWN_LABEL], dtype=object)
        labels = classes[np.where(decided == UNKNOWN, len(self.spec.classes), decided)]
        top = np.where(decided == UNKNOWN, scores.argmax(axis=1) if len(scores) else 0, decided)
        failed = np.array([bool(e) for e in errors], dtype=bool)
        frame = pd.DataFrame(
            {
                "path": list(names) if names is not None else [str(s) for s in sources],
                "label": np.where(failed, None, labels),
                "score": np.where(failed, np.nan, scores[np.arange(len(scores)), top]),
            }
        )
        for k, name in enumerate(self.spec.classes):
            frame[f"score_{name}"] = np.where(failed, np.nan, scores[:, k])
        if multi_label:
            names = np.array(self.spec.classes, dtype=object)
            sets = [
                None if bad else LABEL_SEP.join(names[row]) or UNKNOWN_LABEL
                for bad, row in zip(failed, decide_multi(scores, self.thresholds), strict=True)
            ]
            frame.insert(2, "labels", sets)
        frame["error"] = errors
        return frame


def resolve_model_dir(model: str, tracking_uri: str | None = None) -> Path:
    """A local bundle folder, a local MLflow model, or an MLflow URI -> a local bundle folder.

    ``tracking_uri`` is the MLflow server or store that resolves ``models:/`` and ``runs:/``.
    """
    local = Path(model)
    if local.exists():
        return confine(local) / "artifacts" / BUNDLE_DIR if (local / "MLmodel").is_file() else local
    if "://" in model or model.startswith(("models:/", "runs:/")):
        import mlflow  # heavy import, only for registry URIs
        from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

        # MLflow draws its download bar even into logs (a Prefect run's, a stage's)
        with env_defaults({MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name: "false"}):
            downloaded = Path(
                # models:/ aliases resolve in the registry store: the same one, or MLflow would
                # silently use its default registry (./mlflow.db) instead
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model, tracking_uri=tracking_uri, registry_uri=tracking_uri
                )
            )
        return confine(downloaded) / "artifacts" / BUNDLE_DIR
    raise FileNotFoundError(f"--model {model}: neither a folder nor a models:/ or runs:/ URI")


def collect_images(inputs: Iterable[Path]) -> tuple[list[Path], list[dict]]:
    """Files to predict, and entries not predicted (hidden files, folder loops) with reasons.

    Folders are walked like ingest walks data/ (symlinks followed once); files named on the
    command line are kept as given, so a missing one becomes an error row, not a crash.
    """
    found: list[Path] = []
    left_out: list[dict] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            found.append(item)
            continue
        files, problems = walk_files(item)
        left_out.extend(problems)
        for f in files:
            if any(part.startswith(".") for part in f.relative_to(item).parts):
                left_out.append({"path": display(f), "reason": "hidden file (not predicted)"})
            else:
                found.append(f)
    return found, left_out


def with_left_out(frame: pd.DataFrame, left_out: list[dict]) -> pd.DataFrame:
    """Prediction rows plus one error row per entry not predicted: nothing goes unmentioned."""
    if not left_out:
        return frame
    rows = pd.DataFrame({"path": [e["path"] for e in left_out]})
    rows["error"] = [e["reason"] for e in left_out]
    return pd.concat([frame, rows], ignore_index=True)[list(frame.columns)]


def write_predictions(frame: pd.DataFrame, out: Path) -> None:
    """CSV or JSON lines by the file's suffix."""
    if out.suffix == ".jsonl":
        atomic_write(out, lambda tmp: frame.to_json(tmp, orient="records", lines=True))
    elif out.suffix == ".csv":
        atomic_write(out, lambda tmp: frame.to_csv(tmp, index=False))
    else:
        raise ValueError(f"--out {out}: use a .csv or .jsonl file")
