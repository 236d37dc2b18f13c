"""The model: a timm backbone with a K-wide head, and its on-disk form.

A model directory holds ``weights.safetensors`` (no pickle: loading it runs no code) and
``config.json`` (the ModelSpec: backbone, classes, method and preprocessing). Everything
that rebuilds a model (tune, evaluate, predict, the MLflow pyfunc) reads the spec from
there, so the class list and the preprocessing are defined exactly once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, load_model, save_model

from opensig.backbones import backbone_problem
from opensig.io import atomic_write, file_digest, inside, link_or_copy, read_json, write_json

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "config.json"


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights needed to rebuild and feed the model."""

    backbone: str
    classes: list[str]
    method: str
    num_outputs: int
    image_size: int
    in_chans: int
    mean: list[float]
    std: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def create_model(
    backbone: str,
    num_outputs: int,
    in_chans: int = 3,
    pretrained: bool = False,
    pretrained_file: Path | None = None,
) -> torch.nn.Module:
    """``timm.create_model`` with a fresh head; ``pretrained_file`` loads local weights offline."""
    kwargs: dict = {"num_classes": num_outputs, "in_chans": in_chans}
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained_file: {path} not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    problem = backbone_problem(backbone)
    if problem:
        raise ValueError(f"model.backbone: {problem}")
    try:
        return timm.create_model(backbone, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if pretrained_file is not None and "weights_only" in str(err):
            # timm loads .pth files with torch.load(weights_only=True): no code from a pickle
            raise ValueError(
                f"model.pretrained_file: {pretrained_file} is not a plain weights file and was "
                "not unpickled (it would run code); use a .safetensors file or a state_dict"
            ) from None
        raise


def features_and_logits(
    model: torch.nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The penultimate features (N, D) and the logits (N, outputs) of one forward pass.

    timm's split of ``forward``: the pooled features before the classifier, then the
    classifier on them, so the logits are those ``model(images)`` gives.
    """
    features = model.forward_head(model.forward_features(images), pre_logits=True)
    return features, model.get_classifier()(features)


def build_spec(
    model: torch.nn.Module,
    backbone: str,
    classes: list[str],
    method: str,
    num_outputs: int,
    image_size: int,
    in_chans: int,
) -> ModelSpec:
    """Take mean/std from the backbone's pretrained config so local weights see their inputs."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = list(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = list(cfg.get("std", (0.229, 0.224, 0.225)))
    if in_chans == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return ModelSpec(backbone, list(classes), method, num_outputs, image_size, in_chans, mean, std)


def check_input_size(model: torch.nn.Module, image_size: int, in_chans: int) -> None:
    """Fail before training, naming the key, when the backbone cannot take this input size."""
    model.eval()
    try:
        with torch.no_grad():
            model(
                torch.zeros(
                    1, in_chans, image_size, image_size, device=next(model.parameters()).device
                )
            )
    except RuntimeError as err:
        raise ValueError(
            f"model.image_size: {image_size} px is too small for this backbone ({err}); "
            "raise model.image_size or pick another model.backbone"
        ) from None


def coarse_input_warning(model: torch.nn.Module, backbone: str, image_size: int) -> str | None:
    """A warning when the backbone downsamples the image to a single pixel: its last stage
    then sees no layout at all. Small images (28 px Fashion-MNIST, 8 px digits) are
    scored better upsampled past the backbone's downsampling (bench/README.md: Recipe
    ablations); None when the size is past it or the backbone does not say (e.g. a ViT)."""
    info = getattr(model, "feature_info", None)
    try:
        reduction = int(info[-1]["reduction"])
    except (TypeError, LookupError, ValueError):
        return None
    if image_size > reduction:
        return None
    return (
        f"model.image_size: {image_size} px is no larger than {backbone}'s downsampling "
        f"({reduction}x), so its last feature map is 1x1; small images score better "
        f"upsampled past it, e.g. {reduction + 8} px (bench/README.md: Recipe ablations)"
    )


def save_model_dir(directory: Path, model: torch.nn.Module | Path, spec: ModelSpec) -> None:
    """Write weights and spec atomically, so a reader never sees a half-written model.

    ``model`` may be a safetensors file already written (a training checkpoint): it is
    hard-linked where possible, so a big model's weights are not written twice.
    """
    directory = Path(directory)
    if isinstance(model, Path):
        link_or_copy(model, directory / WEIGHTS_FILE)
    else:
        unwrapped = getattr(model, "module", model)
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_model(unwrapped, str(tmp)))
    write_json(directory / SPEC_FILE, asdict(spec))


def confine(directory: Path) -> Path:
    """``directory``, after checking that no file in it leads outside it (by ``..`` or a link).

    Applied to model folders from a registry or a colleague: one whose weights link
    elsewhere (``weights.safetensors -> ~/.ssh/...``) must not make us read other files.
    Not applied to the project's own ``artifacts/model``, where DVC may link files into
    its cache (``cache.type: symlink``).
    """
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if inside(path, directory, follow_links=True) is None:
            raise ValueError(
                f"{path} leads to {path.resolve()}, outside the model folder {directory}: "
                "refusing to load this model; use a folder whose files are really inside it"
            )
    return directory


def check_model_dir(directory: Path) -> Path:
    """``directory``, once it holds a model's files: else an error naming what is missing."""
    directory = Path(directory)
    missing = [name for name in (WEIGHTS_FILE, SPEC_FILE) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory}: not a model folder (no {' or '.join(missing)}); `opensig train` "
            "writes one (artifacts/model), and predict also takes a models:/ URI"
        )
    return directory


def model_digest(directory: Path) -> str:
    """sha256 over the weights and the spec: which model a thresholds file was tuned for
    (another model with the same classes, e.g. another image size, scores differently)."""
    digest = hashlib.sha256()
    for name in (WEIGHTS_FILE, SPEC_FILE):
        digest.update(f"{name}:{file_digest(check_model_dir(directory) / name)}\n".encode())
    return digest.hexdigest()


def read_spec(directory: Path) -> ModelSpec:
    return ModelSpec(**read_json(check_model_dir(directory) / SPEC_FILE))


def load_model_dir(
    directory: Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the architecture from the spec and load the safetensors weights (eval mode)."""
    directory = Path(directory)
    spec = read_spec(directory)
    model = create_model(spec.backbone, spec.num_outputs, spec.in_chans)
    load_model(model, str(directory / WEIGHTS_FILE), device=str(device))
    return model.to(device).eval(), spec


def match_head_rows(
    old: torch.Tensor, old_classes: list[str], new: torch.Tensor, new_classes: list[str]
) -> torch.Tensor:
    """A head parameter (weight or bias: one row per output) for ``new_classes``: each class's
    row is copied from ``old`` where ``old_classes`` has it, a new class keeps its row of
    ``new`` (fresh initialisation). Rows after the classes (K+1's garbage output) are matched
    by their position after the classes."""
    rows = new.clone()
    index = {name: i for i, name in enumerate(old_classes)}
    for i, name in enumerate(new_classes):
        if name in index:
            rows[i] = old[index[name]]
    for k in range(min(len(old) - len(old_classes), len(new) - len(new_classes))):
        rows[len(new_classes) + k] = old[len(old_classes) + k]
    return rows


def warm_start(net: torch.nn.Module, source: Path, spec: ModelSpec) -> list[str]:
    """Load the model in ``source`` into ``net``: the backbone as is, the head's rows matched
    by class name (`match_head_rows`). Returns the classes that start from fresh rows."""
    old = read_spec(source)
    fields = ("backbone", "in_chans", "method")
    if any(getattr(old, k) != getattr(spec, k) for k in fields):

        def describe(s: ModelSpec) -> str:
            return ", ".join(f"{k} {getattr(s, k)}" for k in fields)

        raise ValueError(
            f"train.init_from: {source} holds a model with {describe(old)}, this training has "
            f"{describe(spec)}: start from a model of the same model.backbone, model.in_chans "
            "and train.method, or set train.init_from: null"
        )
    weights = load_file(str(source / WEIGHTS_FILE))
    head = net.get_classifier()
    prefix = next(name for name, module in net.named_modules() if module is head) + "."
    state = net.state_dict()
    for key, value in state.items():
        if key.startswith(prefix):
            state[key] = match_head_rows(weights[key], old.classes, value, spec.classes)
        else:
            state[key] = weights[key]
    net.load_state_dict(state)
    return [name for name in spec.classes if name not in old.classes]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda requested but no CUDA device is available")
    return torch.device(name)
