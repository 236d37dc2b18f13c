"""The rotation task (``train.rotation_loss``): turned copies, the head beside the network,
its loss, and how the training step trains it and leaves it out of what it saves."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from opensig.config import TrainConfig, load_config
from opensig.data.manifest import read_manifest
from opensig.methods import get_method
from opensig.model import ModelSpec, load_model_dir
from opensig.rotation_task import WithRotationHead, rotation_loss, turned_copies
from opensig.stages import HERE, ingest
from opensig.step import StepOptions, TrainingStep
from opensig.thresholds import UNKNOWN
from opensig.train import _optimizer, _train_epoch, train_model
from tests.conftest import write_params

SIZE, CLASSES = 32, 3


def test_turned_copies_are_the_chosen_images_turned_by_their_quarter_turns() -> None:
    torch.manual_seed(0)
    images = torch.rand(8, 2, 5, 5)
    copies, turns = turned_copies(images, share=0.5)
    assert copies.shape == (4, 2, 5, 5) and turns.shape == (4,)
    assert set(turns.tolist()) <= {1, 2, 3}
    for copy, k in zip(copies, turns.tolist(), strict=True):
        upright = torch.rot90(copy, -k, dims=(-2, -1))  # turned back, it is one of the images
        assert sum(torch.equal(upright, image) for image in images) == 1
        assert not any(torch.equal(copy, image) for image in images)
    many = turned_copies(torch.rand(300, 1, 3, 3), share=1.0)[1]
    assert len(many) == 300 and {1, 2, 3} == set(many.tolist())
    assert all(abs((many == k).sum().item() - 100) < 30 for k in (1, 2, 3))  # evenly drawn
    assert torch.equal(images, images.clone())  # the batch itself is left as it is


def test_turned_copies_need_square_images() -> None:
    with pytest.raises(ValueError, match=r"train.rotation_loss.*square.*\(4, 6\).*set it to 0"):
        turned_copies(torch.rand(4, 1, 4, 6))


def test_the_rotation_loss_is_cross_entropy_with_the_upright_images_at_turn_zero() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    turns = torch.tensor([3])  # two upright images, then one copy turned three times
    expected = F.cross_entropy(logits, torch.tensor([0, 0, 3]))
    torch.testing.assert_close(rotation_loss(logits, turns), expected)
    by_hand = (
        -(
            torch.log_softmax(logits[0], 0)[0]
            + torch.log_softmax(logits[1], 0)[0]
            + torch.log_softmax(logits[2], 0)[3]
        )
        / 3
    )
    torch.testing.assert_close(rotation_loss(logits, turns), by_hand)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=CLASSES, in_chans=1)


def test_the_head_sits_on_the_penultimate_features_and_leaves_the_logits_alone() -> None:
    model = WithRotationHead(_net()).eval()
    assert model.head.in_features == model.net.num_features and model.head.out_features == 4
    images, copies = torch.rand(3, 1, SIZE, SIZE), torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        logits, turn_logits = model(images, copies)
        torch.testing.assert_close(logits, model.net(images))  # batch norm in eval mode
        features = model.net.forward_head(
            model.net.forward_features(torch.cat([images, copies])), pre_logits=True
        )
        torch.testing.assert_close(turn_logits, model.head(features))
        torch.testing.assert_close(model(images), model.net(images))
    wide = timm.create_model("mobilenetv3_small_050", num_classes=CLASSES)
    assert WithRotationHead(wide).head.in_features == wide.head_hidden_size != wide.num_features


def _step(rotation: float, method: str = "sigmoid_bce") -> TrainingStep:
    meth = get_method(method)
    outputs = meth.num_outputs(CLASSES)
    spec = ModelSpec("resnet10t", ["a", "b", "c"], meth.name, outputs, SIZE, 1, [0.5], [0.25])
    options = StepOptions(rotation_loss=rotation, channels_last=False)
    return TrainingStep(_net(), meth, spec, torch.device("cpu"), options)


def _batch(labels: list[int]) -> dict:
    images = torch.randint(0, 256, (len(labels), SIZE, SIZE, 1), dtype=torch.uint8)
    return {"image": images, "label": torch.tensor(labels), "error": [""] * len(labels)}


def test_the_step_adds_the_weighted_rotation_loss_in_training_only() -> None:
    step = _step(0.5)
    images, labels = step.prepare(_batch([0, 1, 2, UNKNOWN]))
    assert isinstance(step.trained, WithRotationHead) and step.trained.net is step.net
    torch.manual_seed(3)
    out = step.train()(images, labels)
    torch.manual_seed(3)  # the same draw, by hand
    copies, turns = turned_copies(images)
    logits, turn_logits = step.trained(images, copies)
    class_loss = step.method.loss(logits, labels, unknown_weight=1.0)
    torch.testing.assert_close(out["class_loss"], class_loss)
    torch.testing.assert_close(out["loss"], class_loss + 0.5 * rotation_loss(turn_logits, turns))
    assert out["logits"].shape == (4, CLASSES) and torch.equal(out["labels"], labels)
    with torch.no_grad():
        val = step.eval()(images, labels)  # validation: the method's loss alone
    torch.testing.assert_close(val["loss"], val["class_loss"])
    torch.testing.assert_close(val["logits"], step.net(images))


def test_training_updates_the_head_and_saves_and_resumes_it_but_not_in_the_model() -> None:
    step = _step(1.0)
    optimizer, scheduler = _optimizer(
        step.trained, TrainConfig(lr=0.01, epochs=1, warmup_epochs=0), 2
    )
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in step.trained.head.parameters()} <= trained
    before = [p.detach().clone() for p in step.trained.head.parameters()]
    batches = [_batch([0, 1, 2, UNKNOWN, 0, 1]), _batch([2, 0, UNKNOWN, 1])]
    losses = _train_epoch(step, batches, optimizer, scheduler, tqdm(disable=True))
    after = list(step.trained.head.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert losses.sums[2].item() == 10  # the epoch's images; the copies are not counted
    assert set(step.evaluated.state_dict()) == set(_net().state_dict())  # what is saved

    resumed = _step(1.0)
    resumed.load_resume_state(step.resume_state())
    for a, b in zip(resumed.trained.head.parameters(), after, strict=True):
        assert torch.equal(a, b)
    plain = _step(0.0)  # off: the optimizer trains the net alone, nothing more to resume
    assert plain.trained is plain.net and plain.resume_state() == {}


def test_a_training_with_the_rotation_task_saves_the_plain_network(
    tmp_path: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole training loop with the task on: the optimizer trains the head, and the saved
    model is the network alone, loaded strictly as predict, serving and ONNX load it."""
    for folder in sorted(p for p in digits_data.glob("*/*") if p.is_dir()):
        target = tmp_path / "data" / folder.relative_to(digits_data)
        target.mkdir(parents=True)
        for image in sorted(folder.iterdir())[:8]:
            shutil.copy(image, target / image.name)
    write_params(
        tmp_path, {"model": {"image_size": 32}, "train": {"epochs": 2, "rotation_loss": 0.5}}
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    ingest(cfg)
    result = train_model(
        cfg, read_manifest(HERE.manifest, cfg.data.root), HERE.model_dir, HERE.last_dir
    )
    assert len(result.history) == 2
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    model, spec = load_model_dir(HERE.model_dir, torch.device("cpu"))  # strict: no head keys
    assert not any(key.startswith("head.") for key in model.state_dict())
    assert model(torch.rand(2, spec.in_chans, 32, 32)).shape == (2, spec.num_classes)
