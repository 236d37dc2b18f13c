"""ONNX export: onnxruntime gives opensig's scores and, with the stored thresholds, its labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from opensig.cli import app
from opensig.data.dataset import ImageDataset
from opensig.decision import write_thresholds
from opensig.labels import UNKNOWN
from opensig.methods import get_method
from opensig.model import build_spec, create_model, model_digest, save_model_dir
from opensig.predict import Bundle
from opensig.thresholds import decide

ort = pytest.importorskip("onnxruntime", reason="pip install 'opensig[export]'")

CLASSES = ["0", "1", "2"]


@pytest.fixture(scope="module", params=["sigmoid_bce", "softmax_kplus1"])
def bundle_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (untrained) resnet10t bundle; softmax_kplus1 has an extra output to drop."""
    method = request.param
    folder = tmp_path_factory.mktemp(method)
    torch.manual_seed(0)
    outputs = get_method(method).num_outputs(len(CLASSES))
    net = create_model("resnet10t", outputs, 3)
    save_model_dir(folder, net, build_spec(net, "resnet10t", CLASSES, method, outputs, 16, 3))
    write_thresholds(
        folder / "thresholds.json",
        CLASSES,
        [0.5] * 3,
        "fixed",
        {"value": 0.5},
        model_sha256=model_digest(folder),
    )
    return folder


@pytest.fixture(scope="module")
def images(digits_data: Path) -> list[Path]:
    return (
        sorted((digits_data / "known").rglob("*.png"))[::60]
        + sorted((digits_data / "unknown").rglob("*.png"))[::90]
    )


def pixels(bundle: Bundle, sources: list[Path]) -> np.ndarray:
    """The exported graph's input: what ImageDataset yields per image, stacked."""
    spec = bundle.spec
    dataset = ImageDataset(sources, None, spec.image_size, spec.in_chans)
    return np.stack([dataset[i]["image"].numpy() for i in range(len(dataset))])


def test_onnx_scores_and_labels_match_the_bundle(
    bundle_dir: Path, images: list[Path], tmp_path: Path
) -> None:
    """The head's scores in the graph (an untrained net: its features are too alike for a
    feature score; tests/e2e/test_pipeline.py exports trained models with one)."""
    bundle = Bundle.load(bundle_dir, device="cpu")
    scores, errors = bundle.score(images, progress=False)
    assert not any(errors)
    # Each class's threshold halfway between two scores near its upper quartile: the labels
    # mix classes and unknown, and no score is so close to one that float noise could flip it.
    ranked = np.sort(scores, axis=0)
    cut = 3 * len(ranked) // 4
    chosen = (ranked[cut - 1] + ranked[cut]) / 2
    assert np.abs(scores - chosen).min() > 1e-5
    write_thresholds(
        bundle_dir / "thresholds.json",
        CLASSES,
        chosen,
        "test",
        {},
        model_sha256=model_digest(bundle_dir),
    )
    bundle = Bundle.load(bundle_dir, device="cpu")
    out = tmp_path / "model.onnx"

    result = CliRunner().invoke(app, ["export", "--model", str(bundle_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["classes"] == CLASSES
    assert meta["thresholds"] == pytest.approx(chosen.tolist())
    assert meta["method"] == bundle.spec.method and meta["backbone"] == "resnet10t"
    assert meta["feature_score"] == {"kind": "none"}
    assert (meta["image_size"], meta["in_chans"]) == (16, 3)
    assert meta["mean"] == bundle.spec.mean and meta["std"] == bundle.spec.std
    assert "unknown" in meta["decision_rule"]
    [graph_input] = session.get_inputs()
    assert graph_input.name == "images" and graph_input.type == "tensor(uint8)"
    assert graph_input.shape[1:] == [16, 16, 3]
    assert [o.name for o in session.get_outputs()] == ["scores"]

    batch = pixels(bundle, images)
    onnx_scores = session.run(None, {graph_input.name: batch})[0]
    assert onnx_scores.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(onnx_scores, scores, atol=1e-4)
    one = session.run(None, {graph_input.name: batch[:1]})[0]  # the batch axis is dynamic
    np.testing.assert_allclose(one, scores[:1], atol=1e-4)

    decided = decide(onnx_scores, np.array(meta["thresholds"]))
    labels = [CLASSES[k] if k != UNKNOWN else "unknown" for k in decided]
    expected = bundle.predict(images, progress=False)["label"].tolist()
    assert labels == expected
    assert "unknown" in labels and set(labels) - {"unknown"}


def test_export_refuses_an_unknown_format(tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(
        app, ["export", "--model", str(tmp_path), "--format", "torchscript", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "--format" in result.output and "'onnx'" in result.output
    assert not out.exists()


def test_export_names_a_missing_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "nothing"
    result = CliRunner().invoke(
        app, ["export", "--model", str(missing), "--out", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 2
    assert "export failed" in caplog.text and str(missing) in caplog.text
