"""One training step, written once: a batch -> the model's input -> forward -> loss.

``TrainingStep`` is what the training pass, the validation pass and the speed benchmark's
in-memory limit all run (modelled on timm's ``task/classification.py``, whose
``task(x, y)["loss"]`` it mirrors, and on lightning-hydra-template's ``model_step``). It owns:

- the model: the module itself (``net``), what the training forward runs through
  (``model``: ``net``, or its DistributedDataParallel / ``torch.compile`` wrapper) and what
  validation runs and training saves (``evaluated``: ``net``, or with ``train.ema_decay``
  the exponential moving average of its weights, timm's ``ModelEmaV3``, updated after
  every optimizer step);
- the training method (targets and loss) and the loss options (label smoothing, the weight
  of an unknown image);
- autocast (bf16 on a GPU that has it, else fp16 with a grad scaler; off on CPU) and the
  memory layout (channels-last or contiguous) of the model and its input;
- the augmentation (``opensig.data.augment``): applied to a whole batch, on the device, in
  training mode only;
- the synthetic unknowns (``train.mixed_unknowns``: blends of two classes;
  ``train.rotated_unknowns``: known images turned a quarter turn): put into a batch
  in training mode only, and only for methods that train on unknown images;
- the rotation task (``train.rotation_loss``, ``opensig.rotation_task``): in training mode,
  turned copies of half the batch and a head that learns their turn, its loss added to the
  method's with that weight.

Losses are averaged one way, in training and in validation alike: the weighted mean per
unit of weight over every image of the epoch, ``sum_i(loss_i * w_i) / sum_i(w_i)``, where
``w_i`` is 1 for a known image and ``train.unknown_weight`` for an unknown one (what each
batch's loss already is, accumulated over the epoch by ``EpochLoss``). The train and val
curves in train_history.csv, loss.png and MLflow are thus the same quantity: the method's
loss, without the rotation task's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from timm.utils.model_ema import ModelEmaV3

from opensig.config import TrainConfig
from opensig.data.augment import BatchAugment
from opensig.data.dataset import model_input
from opensig.methods import Method, mix_unknowns, rotate_unknowns, sample_weights
from opensig.model import ModelSpec
from opensig.rotation_task import WithRotationHead, rotation_loss, turned_copies


@dataclass(frozen=True)
class StepOptions:
    """The train params a step uses (``train.amp``, ``channels_last``, ``label_smoothing``,
    ``unknown_weight``, ``mixed_unknowns``, ``ema_decay``, ``rotated_unknowns``,
    ``rotation_loss``)."""

    amp: bool = True
    channels_last: bool = True
    label_smoothing: float = 0.0
    unknown_weight: float = 1.0
    mixed_unknowns: float = 0.0
    ema_decay: float = 0.0
    rotated_unknowns: float = 0.0
    rotation_loss: float = 0.0

    @property
    def layout(self) -> str:
        """The memory layout of the model and its input: channels_last or contiguous."""
        return "channels_last" if self.channels_last else "contiguous"

    @classmethod
    def of(cls, train: TrainConfig) -> StepOptions:
        return cls(
            train.amp,
            train.channels_last,
            train.label_smoothing,
            train.unknown_weight,
            train.mixed_unknowns,
            train.ema_decay,
            train.rotated_unknowns,
            train.rotation_loss,
        )


def _autocast(
    device: torch.device, enabled: bool
) -> tuple[AbstractContextManager, torch.amp.GradScaler | None]:
    """bf16 autocast where the GPU has it, else fp16 (with a grad scaler); off on CPU."""
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


class TrainingStep:
    """Forward and loss of one batch, the same in training and validation.

    ``step(images, labels)`` takes the model's input (``prepare`` makes it from a loader
    batch) and returns a dict: ``loss`` (what backward needs: ``class_loss`` plus, in
    training, the rotation task's), ``class_loss`` (the method's loss, the batch's weighted
    mean), ``weight`` (the batch's sum of sample weights), ``logits`` and ``labels`` (after
    any synthetic unknowns). ``update`` runs backward and the optimizer step through the grad
    scaler. ``train()`` / ``eval()`` switch the mode: training runs ``model``, blends
    synthetic unknowns and needs gradients; validation runs ``net`` (under ``no_grad``, the
    caller's).

    The net is moved to ``device`` in the step's memory layout; ``trained`` is what the
    optimizer updates (the net, with the rotation head if there is one); ``wrap`` (DDP,
    ``torch.compile``) then gives the module the training forward runs through. ``augment``
    transforms training batches in ``prepare`` (its draws are seeded by the caller).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        method: Method,
        spec: ModelSpec,
        device: torch.device,
        options: StepOptions = StepOptions(),
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        augment: BatchAugment | None = None,
    ) -> None:
        self.method, self.spec, self.device, self.options = method, spec, device, options
        self.memory_format = (
            torch.channels_last if options.channels_last else torch.contiguous_format
        )
        self.net = net.to(device, memory_format=self.memory_format)
        self.trained = (
            WithRotationHead(self.net).to(device) if options.rotation_loss > 0 else self.net
        )
        self.model = wrap(self.trained) if wrap is not None else self.trained
        self.autocast, self.scaler = _autocast(device, options.amp)
        self.augment = augment
        self.training = True
        self.ema = _average(self.net, options.ema_decay)
        self.updates = 0  # optimizer steps taken: the EMA's decay warms up with them

    @property
    def evaluated(self) -> torch.nn.Module:
        """What validation runs and training saves: the weights' moving average, if kept."""
        return self.ema.module if self.ema is not None else self.net

    def train(self, mode: bool = True) -> TrainingStep:
        self.training = mode
        if mode:
            self.model.train()
        else:
            self.net.eval()
            self.evaluated.eval()
        return self

    def eval(self) -> TrainingStep:
        return self.train(False)

    def prepare(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch (uint8 NHWC images, labels, read errors) -> input (augmented in
        training mode) and labels on the device; a batch with an unreadable image stops
        training."""
        bad = [e for e in batch["error"] if e]
        if bad:
            raise RuntimeError(
                f"{len(bad)} training image(s) could not be read ({bad[0]}); rerun ingest"
            )
        augment = self.augment if self.training else None
        images = model_input(
            batch["image"], self.spec, self.device, self.options.channels_last, augment
        )
        return images, batch["label"].to(self.device, non_blocking=True)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        rotation = self.training and self.options.rotation_loss > 0
        if rotation:  # copies of the images as they came: upright, before synthetic unknowns
            copies, turns = turned_copies(images)
        if self.training and self.method.uses_unknown:
            images, labels = mix_unknowns(images, labels, self.options.mixed_unknowns)
            images, labels = rotate_unknowns(images, labels, self.options.rotated_unknowns)
        with self.autocast:
            if rotation:
                logits, turn_logits = self.model(
                    images, copies.contiguous(memory_format=self.memory_format)
                )
            else:
                logits = (self.model if self.training else self.evaluated)(images)
        class_loss = self.method.loss(
            logits,
            labels,
            smoothing=self.options.label_smoothing,
            unknown_weight=self.options.unknown_weight,
        )
        loss = class_loss
        if rotation:
            loss = class_loss + self.options.rotation_loss * rotation_loss(turn_logits, turns)
        weight = sample_weights(labels, self.options.unknown_weight).sum()
        return {
            "loss": loss,
            "class_loss": class_loss,
            "weight": weight,
            "logits": logits,
            "labels": labels,
        }

    def update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimizer step, through the fp16 grad scaler when there is one."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        self.updates += 1
        if self.ema is not None:
            self.ema.update(self.net, step=self.updates)

    def resume_state(self) -> dict:
        """What a resumed training needs besides the saved (``evaluated``) weights: with an
        EMA, the trained weights themselves and the step count its decay warms up with; with
        the rotation task, its head."""
        state = {}
        if self.ema is not None:
            state |= {"trained": self.net.state_dict(), "updates": self.updates}
        if isinstance(self.trained, WithRotationHead):
            state["rotation_head"] = self.trained.head.state_dict()
        return state

    def load_resume_state(self, state: dict) -> None:
        """Put back what ``resume_state`` gave (the saved weights are loaded by the caller)."""
        if self.ema is not None:
            self.net.load_state_dict(state["trained"])
            self.updates = state["updates"]
        if isinstance(self.trained, WithRotationHead):
            self.trained.head.load_state_dict(state["rotation_head"])


def _average(net: torch.nn.Module, decay: float) -> ModelEmaV3 | None:
    """The moving average of ``net``'s weights and buffers, or None (``decay`` 0).

    The decay warms up (1 - (1 + step)^-3/4, capped at ``decay``: timm's recipe for runs of
    under 10k steps), so a short training averages over its last steps, not its random start.
    """
    if decay == 0.0:
        return None
    return ModelEmaV3(net, decay=decay, use_warmup=True, warmup_power=0.75)


class EpochLoss:
    """An epoch's loss, ``sum_i(loss_i * w_i) / sum_i(w_i)`` over its images, summed on the
    device (no host sync per step): (weighted loss, weight, images) in float64."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, out: dict[str, torch.Tensor]) -> None:
        """Add a step's output: its mean loss times its weight is its weighted loss sum."""
        self.sums[0] += out["class_loss"].detach() * out["weight"]
        self.sums[1] += out["weight"]
        self.sums[2] += len(out["labels"])

    def mean(self) -> float:
        """The loss so far (a host sync: for a progress bar, not every step)."""
        return mean_loss(*self.sums[:2].tolist())


def mean_loss(weighted_sum: float, weight: float) -> float:
    """The weighted mean, nan when nothing was weighed (an empty split)."""
    return weighted_sum / weight if weight else float("nan")
