"""Tests for model creation, the on-disk model directory and device selection."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model

from opensig.model import (
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelSpec,
    build_spec,
    coarse_input_warning,
    create_model,
    load_model_dir,
    match_head_rows,
    read_spec,
    resolve_device,
    save_model_dir,
    warm_start,
)

BACKBONE = "test_resnet"  # a tiny timm test model: fast on CPU
SIZE = 32


def _spec(model: torch.nn.Module, classes: list[str], in_chans: int = 3) -> ModelSpec:
    return build_spec(model, BACKBONE, classes, "sigmoid_bce", len(classes), SIZE, in_chans)


@pytest.mark.parametrize(("num_outputs", "in_chans"), [(3, 3), (5, 1)])
def test_create_model_outputs(num_outputs: int, in_chans: int) -> None:
    torch.manual_seed(0)
    model = create_model(BACKBONE, num_outputs, in_chans=in_chans).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, SIZE, SIZE))
    assert out.shape == (2, num_outputs)


def test_build_spec_mean_std() -> None:
    model = create_model(BACKBONE, 2)
    spec = _spec(model, ["a", "b"])
    assert spec.num_classes == 2
    assert spec.mean == list(model.pretrained_cfg["mean"])
    assert spec.std == list(model.pretrained_cfg["std"])
    gray = _spec(create_model(BACKBONE, 2, in_chans=1), ["a", "b"], in_chans=1)
    assert len(gray.mean) == 1 and len(gray.std) == 1


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(BACKBONE, 3).eval()
    spec = _spec(model, ["cat", "dog", "owl"])
    directory = tmp_path / "model"
    save_model_dir(directory, model, spec)

    assert sorted(p.name for p in directory.iterdir()) == sorted([WEIGHTS_FILE, SPEC_FILE])
    assert not any(p.suffix in {".pt", ".pth", ".pkl", ".bin"} for p in directory.iterdir())
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as handle:
        assert "fc.weight" in set(handle.keys())
    assert json.loads((directory / SPEC_FILE).read_text()) == asdict(spec)
    assert read_spec(directory) == spec

    loaded, loaded_spec = load_model_dir(directory)
    assert loaded_spec == spec
    assert not loaded.training
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_model_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=SPEC_FILE):
        load_model_dir(tmp_path / "nothing")


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match=r"model\.backbone") as info:
        create_model("definitely_not_a_timm_model", 3)
    assert "definitely_not_a_timm_model" in str(info.value)


def test_misspelt_backbone_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"model\.backbone: 'resnet19' .* did you mean .*resnet18"):
        create_model("resnet19", 3)


def test_pretrained_file_loads_offline(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_model(BACKBONE, 4)
    weights = tmp_path / "backbone.safetensors"
    save_model(source, str(weights))

    torch.manual_seed(2)
    fresh = create_model(BACKBONE, 4)
    torch.manual_seed(2)
    loaded = create_model(BACKBONE, 4, pretrained_file=weights)

    key = "layer1.0.conv1.weight"
    src_tensor = source.state_dict()[key]
    assert not torch.equal(fresh.state_dict()[key], src_tensor)
    assert torch.equal(loaded.state_dict()[key], src_tensor)
    assert torch.equal(loaded.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"])


@pytest.mark.parametrize("in_chans", [3, 1])
def test_pretrained_file_from_a_checkpoint_gets_a_head_for_the_classes(
    tmp_path: Path, in_chans: int
) -> None:
    """docs/configuration.md's offline recipe: timm turns a training checkpoint (1000-class ImageNet
    head, EMA weights) into a plain safetensors file; the backbone comes from it, the head
    is new and as wide as the project's classes."""
    torch.manual_seed(1)
    imagenet = create_model(BACKBONE, 1000)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in imagenet.state_dict().items()}
    checkpoint = tmp_path / "checkpoint.pth"
    trained = {"epoch": 90, "state_dict": imagenet.state_dict(), "state_dict_ema": ema}
    torch.save(trained, checkpoint)
    converted = timm.create_model(BACKBONE, checkpoint_path=str(checkpoint))  # the recipe
    weights = tmp_path / "backbone.safetensors"
    save_file(converted.state_dict(), str(weights))

    loaded = create_model(BACKBONE, 3, in_chans, pretrained_file=weights).state_dict()
    key = "layer1.0.conv1.weight"
    assert torch.equal(loaded[key], ema[key])  # timm keeps the EMA copy of a checkpoint
    assert loaded["fc.weight"].shape == (3, ema["fc.weight"].shape[1])
    first = ema["conv1.0.weight"]
    assert torch.allclose(
        loaded["conv1.0.weight"], first if in_chans == 3 else first.sum(dim=1, keepdim=True)
    )


def test_pretrained_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained_file") as info:
        create_model(BACKBONE, 3, pretrained_file=missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    ("backbone", "size", "warned"),
    [("resnet18", 32, True), ("resnet18", 33, False), ("vit_tiny_patch16_224", 32, False)],
)
def test_a_backbone_that_downsamples_the_image_to_one_pixel_is_warned_of(
    backbone: str, size: int, warned: bool
) -> None:
    """resnet18 downsamples 32x: at 32 px its last map is 1x1 (checked by a forward pass),
    at 33 px 2x2; a ViT says nothing of a reduction that would mean the same."""
    net = create_model(backbone, 2, 1)
    warning = coarse_input_warning(net, backbone, size)
    assert (warning is not None) == warned
    if backbone == "resnet18":
        with torch.no_grad():
            side = net.eval().forward_features(torch.zeros(1, 1, size, size)).shape[-1]
        assert side == (1 if warned else 2)
    if warned:
        assert warning.startswith("model.image_size: 32 px is no larger than resnet18's")
        assert "(32x)" in warning and "40 px" in warning


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_resolve_device_cuda_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match=r"train\.device"):
        resolve_device("cuda")


def test_match_head_rows_by_class_name() -> None:
    old = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])  # classes a, b, c
    fresh = torch.full((4, 2), -1.0)  # classes c, a, new, b
    rows = match_head_rows(old, ["a", "b", "c"], fresh, ["c", "a", "new", "b"])
    assert rows.tolist() == [[3.0, 3.0], [1.0, 1.0], [-1.0, -1.0], [2.0, 2.0]]
    assert fresh.tolist() == [[-1.0, -1.0]] * 4  # the fresh rows are not changed in place
    # biases are rows too; K+1's garbage output follows the classes in both heads
    bias = match_head_rows(
        torch.tensor([1.0, 2.0, 9.0]), ["a", "b"], torch.zeros(4), ["b", "x", "a"]
    )
    assert bias.tolist() == [2.0, 0.0, 1.0, 9.0]


def test_warm_start_loads_the_backbone_and_matches_the_head(untrained_bundle: Path) -> None:
    old_net, old_spec = load_model_dir(untrained_bundle)  # classes 0, 1, 2
    classes = ["2", "0", "9", "1"]
    net = create_model("resnet10t", len(classes), 3)
    spec = build_spec(net, "resnet10t", classes, "sigmoid_bce", len(classes), 16, 3)
    fresh_row = net.get_classifier().weight[2].detach().clone()
    assert warm_start(net, untrained_bundle, spec) == ["9"]
    old_head, head = old_net.get_classifier(), net.get_classifier()
    for i, name in enumerate(classes):
        if name == "9":
            assert torch.equal(head.weight[i], fresh_row)
        else:
            j = old_spec.classes.index(name)
            assert torch.equal(head.weight[i], old_head.weight[j])
            assert torch.equal(head.bias[i], old_head.bias[j])
    assert torch.equal(net.conv1[0].weight, old_net.conv1[0].weight)  # the backbone as is
    other = create_model("resnet18", len(classes), 3)
    spec18 = build_spec(other, "resnet18", classes, "sigmoid_bce", len(classes), 16, 3)
    with pytest.raises(ValueError, match=r"train.init_from: .* backbone resnet10t.*resnet18"):
        warm_start(other, untrained_bundle, spec18)
