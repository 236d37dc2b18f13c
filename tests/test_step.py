"""The training step: one forward + loss for training, validation and the speed benchmark,
and one way of averaging the loss over an epoch."""

from __future__ import annotations

import pytest
import torch
from tqdm.auto import tqdm

from opensig.config import AugmentConfig
from opensig.data.augment import BatchAugment
from opensig.data.dataset import model_input
from opensig.methods import get_method
from opensig.model import ModelSpec
from opensig.step import EpochLoss, StepOptions, TrainingStep
from opensig.thresholds import UNKNOWN
from opensig.train import Distributed, _evaluate_loss, _train_epoch

SIZE, CHANS, CLASSES = 4, 3, 3


def _spec(method: str, outputs: int) -> ModelSpec:
    classes = [str(k) for k in range(CLASSES)]
    return ModelSpec("hand", classes, method, outputs, SIZE, CHANS, [0.5] * CHANS, [0.25] * CHANS)


def _step(method_name: str, **options) -> TrainingStep:
    """A step over a linear model (no batch norm, no dropout: train and eval forwards agree)."""
    torch.manual_seed(0)
    method = get_method(method_name)
    outputs = method.num_outputs(CLASSES)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE * CHANS, outputs))
    spec = _spec(method.name, outputs)
    return TrainingStep(net, method, spec, torch.device("cpu"), StepOptions(**options))


def _batch(labels: list[int], seed: int = 0) -> dict:
    """A loader batch as the datasets give it: uint8 NHWC images, labels, read errors."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(labels), SIZE, SIZE, CHANS), generator=generator)
    return {
        "image": images.to(torch.uint8),
        "label": torch.tensor(labels),
        "error": [""] * len(labels),
    }


def test_with_ema_decay_validation_runs_the_moving_average_of_the_weights() -> None:
    """After each optimizer step the average moves towards the weights by 1 - decay, the
    decay warming up as 1 - (1 + n)^-3/4 (n: steps before this one) up to ``ema_decay``."""
    step = _step("sigmoid_bce", ema_decay=0.5)
    first = [p.detach().clone() for p in step.net.parameters()]
    optimizer = torch.optim.SGD(step.net.parameters(), lr=0.5)
    images, labels = step.prepare(_batch([0, 1, UNKNOWN, 2]))
    average = first
    for n in range(3):
        step.train().update(step(images, labels)["loss"], optimizer)
        decay = 0.0 if n == 0 else min(1 - (1 + n) ** -0.75, 0.5)
        average = [
            a * decay + p.detach() * (1 - decay)
            for a, p in zip(average, step.net.parameters(), strict=True)
        ]
    ema = list(step.evaluated.parameters())
    assert step.evaluated is not step.net and step.updates == 3
    assert not torch.equal(ema[0], next(step.net.parameters()))
    for got, expected in zip(ema, average, strict=True):
        torch.testing.assert_close(got, expected)
    out = step.eval()(images, labels)  # validation: the average's forward
    torch.testing.assert_close(out["logits"], step.evaluated(images))

    resumed = _step("sigmoid_bce", ema_decay=0.5)  # a restart: the average loaded by the
    resumed.evaluated.load_state_dict(step.evaluated.state_dict())  # caller, then the rest
    resumed.load_resume_state(step.resume_state())
    assert resumed.updates == 3
    assert all(
        torch.equal(a, b)
        for a, b in zip(resumed.net.parameters(), step.net.parameters(), strict=True)
    )
    assert _step("sigmoid_bce").resume_state() == {}  # no average: the weights are all


@pytest.mark.parametrize("method", ["sigmoid_bce", "softmax_kplus1", "softmax_eos"])
def test_the_steps_loss_is_the_methods_loss_on_a_hand_batch(method: str) -> None:
    step = _step(method, label_smoothing=0.1, unknown_weight=3.0)
    batch = _batch([0, 2, UNKNOWN, 1, UNKNOWN])
    images, labels = step.prepare(batch)
    assert torch.equal(images, model_input(batch["image"], step.spec, step.device))
    assert images.is_contiguous(memory_format=torch.channels_last)
    for mode in (True, False):  # no synthetic unknowns asked for: the two modes agree
        out = step.train(mode)(images, labels)
        expected = step.method.loss(step.net(images), labels, smoothing=0.1, unknown_weight=3.0)
        torch.testing.assert_close(out["loss"], expected, rtol=0, atol=0)
        assert out["weight"].item() == 1 + 1 + 3 + 1 + 3
        assert torch.equal(out["labels"], labels)


def test_the_layout_is_the_steps() -> None:
    step = _step("sigmoid_bce", channels_last=False)
    images, _ = step.prepare(_batch([0, 1]))
    assert images.is_contiguous() and step.options.layout == "contiguous"


def test_train_and_val_losses_are_the_same_weighted_mean() -> None:
    """With unknown_weight 3, batches of different make-up, averaged over an epoch in train
    mode (no augmentation, no learning) and in val mode: both are sum(l_i w_i) / sum(w_i)."""
    step = _step("sigmoid_bce", unknown_weight=3.0)
    batches = [_batch([0, 1, 2, UNKNOWN], 1), _batch([UNKNOWN, UNKNOWN, 0], 2), _batch([1], 3)]
    optimizer = torch.optim.SGD(step.net.parameters(), lr=0.0)  # the weights stay as they are
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    train = _train_epoch(step, batches, optimizer, scheduler, tqdm(disable=True))
    val = _evaluate_loss(step, batches, Distributed())

    with torch.no_grad():
        per_image, weights = [], []
        for batch in batches:
            images, labels = step.prepare(batch)
            for image, label in zip(images, labels, strict=True):
                per_image.append(step.method.loss(step.net(image[None]), label[None]).item())
                weights.append(3.0 if label == UNKNOWN else 1.0)
    expected = sum(x * w for x, w in zip(per_image, weights, strict=True)) / sum(weights)
    assert train.mean() == pytest.approx(expected, rel=1e-6)
    assert val == pytest.approx(expected, rel=1e-6)
    assert train.mean() == pytest.approx(val, rel=1e-12)
    assert train.sums[2].item() == 8  # images seen, for images/s
    per_image_mean = sum(per_image) / len(per_image)  # what the train loss used to be
    assert abs(per_image_mean - expected) > 1e-3


def test_an_empty_epoch_has_no_loss() -> None:
    assert torch.isnan(torch.tensor(EpochLoss(torch.device("cpu")).mean()))


def test_synthetic_unknowns_are_blended_in_training_only_and_for_methods_with_unknowns() -> None:
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    for method, mode, blended in [
        ("sigmoid_bce", True, True),
        ("sigmoid_bce", False, False),
        ("sigmoid_bce_known_only", True, False),
    ]:
        for kind in ("mixed_unknowns", "rotated_unknowns"):
            step = _step(method, **{kind: 0.5}).train(mode)
            images, targets = step.prepare(_batch(labels))
            with torch.no_grad():
                out = step(images, targets)
            assert (out["labels"] == UNKNOWN).any().item() is blended, (method, mode, kind)
            assert torch.equal(targets, torch.tensor(labels))  # the inputs are left as they are


def test_a_batch_with_an_unreadable_image_stops_training() -> None:
    batch = _batch([0, 1])
    batch["error"] = ["", "cannot identify image file"]
    with pytest.raises(RuntimeError, match=r"1 training image.*could not be read.*rerun ingest"):
        _step("sigmoid_bce").prepare(batch)


def test_the_augmentation_runs_in_training_mode_only() -> None:
    method = get_method("sigmoid_bce")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE * CHANS, CLASSES))
    settings = AugmentConfig(rotate=30.0, brightness_contrast=0.3).model_dump()
    augment = BatchAugment(**settings, seed=1)
    spec = _spec(method.name, CLASSES)
    step = TrainingStep(net, method, spec, torch.device("cpu"), augment=augment)
    batch = _batch([0, 1, 2, 0])
    plain = model_input(batch["image"], step.spec, step.device)
    evaluated, _ = step.eval().prepare(batch)
    assert torch.equal(evaluated, plain)
    trained, _ = step.train().prepare(batch)
    assert trained.shape == plain.shape and trained.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(trained, plain)
    assert not torch.equal(step.prepare(batch)[0], trained)  # new draws for every batch
    augment.seed(1)
    assert torch.equal(step.prepare(batch)[0], trained)  # the draws are the seeded generator's
    again = BatchAugment(**settings, seed=1)
    assert torch.equal(model_input(batch["image"], step.spec, step.device, augment=again), trained)
