"""Export a bundle to ONNX, for runtimes without Python, torch or opensig.

The graph starts where opensig's per-image transforms end and ends where the decision rule
begins: its input is the resized uint8 pixels (N, H, W, C), exactly what
``eval_transform`` yields per image, and it applies ``model_input`` (layout, float, mean
and std), the network and the method's per-class scores. So normalisation is not a step an
integrator can get wrong, and the scores are those ``score_sources`` gives. What the graph
cannot hold (classes, thresholds, the decision rule, preprocessing facts) is in its
``metadata_props``, one JSON value per key.

Uses torch's default exporter (``dynamo=True``, built on ``torch.export``; it needs
``onnxscript``): the TorchScript exporter (``dynamo=False``) is deprecated since torch 2.9.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

import opensig
from opensig.data.dataset import model_input
from opensig.decision import score_scale
from opensig.io import atomic_write
from opensig.labels import UNKNOWN_LABEL
from opensig.methods import get_method
from opensig.posthoc import Scorer
from opensig.predict import Bundle

log = logging.getLogger(__name__)

OPSET = 18  # onnxruntime >= 1.14 runs it; pinned so an export does not change with torch
INPUT_NAME, OUTPUT_NAME = "images", "scores"
DECISION_RULE = (
    "class k is a candidate when scores[k] >= thresholds[k]; no candidate: unknown; "
    "else the candidate with the highest score (a tie goes to the lowest k)"
)
INPUT_DOC = (
    "uint8 (N, image_size, image_size, in_chans): the image decoded as RGB (L when in_chans "
    "is 1) and resized to image_size x image_size; normalisation is in the graph"
)
OUTPUT_DOC = (
    "float32 (N, K): per-class scores in [0, 1], in the order of classes, on the scale "
    "score_scale names (probability: the head's and the feature score's vote, calibrated; "
    "head: the head's own scores); everything is in the graph"
)


class ScoringGraph(torch.nn.Module):
    """Resized uint8 NHWC pixels -> per-class scores, as ``score_sources`` computes them
    (the method's head scores, combined with the feature score when the bundle has one)."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__()
        self.spec = bundle.spec
        self.scorer = Scorer(bundle.model, get_method(bundle.spec.method), bundle.feature_score)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.scorer(model_input(images, self.spec, images.device))


def metadata(bundle: Bundle) -> dict[str, str]:
    """What a caller needs besides the graph, as JSON strings (ONNX metadata is str -> str)."""
    spec = bundle.spec
    values = {
        "classes": spec.classes,
        "thresholds": [float(t) for t in bundle.thresholds],
        "decision_rule": DECISION_RULE,
        "unknown_label": UNKNOWN_LABEL,
        "image_size": spec.image_size,
        "in_chans": spec.in_chans,
        "mean": spec.mean,
        "std": spec.std,
        "method": spec.method,
        "feature_score": (
            bundle.feature_score.describe() if bundle.feature_score else {"kind": "none"}
        ),
        "score_scale": score_scale(bundle.feature_score),
        "backbone": spec.backbone,
        "input": INPUT_DOC,
        "output": OUTPUT_DOC,
        "opensig_version": opensig.__version__,
    }
    return {key: json.dumps(value) for key, value in values.items()}


def export_onnx(bundle: Bundle, out: Path) -> Path:
    """Write ``bundle`` as one self-contained ONNX file (weights inside), atomically."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter imports it; fail here, clearly)
    except ImportError as err:
        raise RuntimeError(
            f"ONNX export needs the 'export' extra ({err.name} is missing): "
            "pip install 'opensig[export]'"
        ) from None
    spec = bundle.spec
    graph = ScoringGraph(bundle).eval()
    device = next(bundle.model.parameters()).device
    # Batch 2, not 1: torch.export would take a size-1 dimension for a constant.
    sample = torch.zeros(2, spec.image_size, spec.image_size, spec.in_chans, dtype=torch.uint8)
    program = torch.onnx.export(
        graph,
        (sample.to(device),),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=OPSET,
        external_data=False,
        verbose=False,
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata(bundle))
    atomic_write(Path(out), lambda tmp: onnx.save_model(proto, str(tmp)))
    log.info(
        "wrote %s: %s uint8 (batch, %d, %d, %d) -> %s (batch, %d)",
        out,
        INPUT_NAME,
        spec.image_size,
        spec.image_size,
        spec.in_chans,
        OUTPUT_NAME,
        spec.num_classes,
    )
    return Path(out)
