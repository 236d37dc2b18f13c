"""Batch inference: a bundle (weights + spec + thresholds) turns images into labels.

The same code serves ``opensig predict``, the tune and evaluate stages (through
``score_sources``) and the MLflow pyfunc, so a registered model answers exactly as it
was evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from opensig.data.dataset import ImageDataset, loader_workers, model_input
from opensig.data.images import ImageSource
from opensig.data.prefetch import overlapped
from opensig.decision import THRESHOLDS_FILE, read_thresholds
from opensig.labels import LABEL_SEP, UNKNOWN, UNKNOWN_LABEL
from opensig.methods import get_method
from opensig.model import ModelSpec, load_model_dir, resolve_device
from opensig.posthoc import FeatureScore, Scorer
from opensig.progress import image_bar
from opensig.thresholds import decide, decide_multi

log = logging.getLogger(__name__)


def _images(
    spec: ModelSpec,
    sources: Sequence[ImageSource],
    device: torch.device,
    batch_size: int,
    num_workers: int | str,
) -> DataLoader:
    """Batches of decoded, resized images, decoded in worker processes on GPU (on CPU, in
    the thread ``overlapped`` runs it in where a core is spare) so the model does not wait
    for the files."""
    dataset = ImageDataset(sources, None, spec.image_size, spec.in_chans)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=loader_workers(num_workers, device),
        pin_memory=device.type == "cuda",
    )


@torch.no_grad()
def run_scorer(
    scorer: Scorer,
    spec: ModelSpec,
    sources: Sequence[ImageSource],
    batch_size: int = 256,
    progress: bool = True,
    num_workers: int | str = "auto",
    features: bool = False,
) -> tuple[list[np.ndarray], list[str]]:
    """Outputs for images, plus one error string per image ('' if fine): the per-class
    scores (N, K), or with ``features`` the head scores and the penultimate features.

    Batched, in fp32 (thresholds were tuned on fp32 scores).
    """
    device = next(scorer.parameters()).device
    outputs: list[list[np.ndarray]] = []
    errors: list[str] = []
    scorer.eval()
    loader = _images(spec, sources, device, batch_size, num_workers)
    with (
        image_bar(len(loader.dataset), "scoring", show=progress) as bar,
        overlapped(loader, device) as batches,
    ):
        for batch in batches:
            images = model_input(batch["image"], spec, device)
            out = scorer.head_and_features(images) if features else (scorer(images),)
            outputs.append([o.float().cpu().numpy() for o in out])
            errors.extend(batch["error"])
            bar.update(len(batch["error"]))
    if not outputs:
        widths = (spec.num_classes, 0) if features else (spec.num_classes,)
        return [np.zeros((0, w), dtype=np.float32) for w in widths], errors
    return [np.concatenate(parts) for parts in zip(*outputs, strict=True)], errors


def score_sources(
    model: torch.nn.Module,
    spec: ModelSpec,
    sources: Sequence[ImageSource],
    batch_size: int = 256,
    progress: bool = True,
    num_workers: int | str = "auto",
    feature_score: FeatureScore | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Per-class scores (N, K) for images, plus one error string per image ('' if fine)."""
    scorer = Scorer(model, get_method(spec.method), feature_score)
    (scores,), errors = run_scorer(scorer, spec, sources, batch_size, progress, num_workers)
    return scores, errors


@dataclass
class Bundle:
    """A ready-to-use classifier: model, its spec, one threshold per class and the feature
    score the thresholds were tuned on (None: the head's scores as they are)."""

    model: torch.nn.Module
    spec: ModelSpec
    thresholds: np.ndarray
    feature_score: FeatureScore | None = None

    @classmethod
    def load(
        cls,
        model_dir: Path,
        thresholds: Path | None = None,
        device: str = "auto",
        force: bool = False,
    ) -> Bundle:
        """The model in ``model_dir`` with its thresholds (``model_dir/thresholds.json`` unless
        given); ``force`` accepts thresholds recorded as tuned for another model."""
        model_dir = Path(model_dir)
        model, spec = load_model_dir(model_dir, resolve_device(device))
        thresholds = Path(thresholds) if thresholds else model_dir / THRESHOLDS_FILE
        if not thresholds.is_file():
            raise FileNotFoundError(
                f"{thresholds}: no thresholds for model {model_dir}; pass --thresholds "
                "(e.g. artifacts/thresholds.json) or use a registered model"
            )
        values, feature_score = read_thresholds(thresholds, spec.classes, model_dir, force)
        if feature_score is not None:
            feature_score.to(next(model.parameters()).device)
        return cls(model, spec, values, feature_score)

    def score(
        self,
        sources: Sequence[ImageSource],
        batch_size: int = 256,
        progress: bool = True,
        num_workers: int | str = "auto",
    ) -> tuple[np.ndarray, list[str]]:
        """Per-class scores (N, K), as the thresholds expect them, and per-image errors."""
        return score_sources(
            self.model, self.spec, sources, batch_size, progress, num_workers, self.feature_score
        )

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
        scores, errors = self.score(sources, batch_size, progress, num_workers)
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
