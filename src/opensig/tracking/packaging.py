"""A bundle (weights, spec, thresholds, feature score) as an MLflow pyfunc model, logged "from
code" (:mod:`opensig.pyfunc_model`): nothing pickled, the opensig package as the model's code.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import opensig
from opensig.decision import THRESHOLDS_FILE, decision_files
from opensig.io import file_digest, write_json
from opensig.model import read_spec
from opensig.monitoring.log import MONITOR_FILE
from opensig.tracking.model_uri import BUNDLE_DIR

BUNDLE_FILES = ("weights.safetensors", "config.json")  # + decision_files(thresholds)
# The served model (MLflow runs it at load time): beside this package, in opensig/
PYFUNC_FILE = Path(__file__).parent.with_name("pyfunc_model.py")
# What the served model imports (the opensig package itself is logged as its code)
MODEL_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "albumentations",
    "pandas",
    "pyarrow",
    "fsspec",
    "pillow",
    "numpy",
    "scikit-learn",
    "pydantic",
    "pyyaml",
    "tqdm",
    "matplotlib",
)


def model_requirements() -> list[str]:
    """``name==version`` of each of MODEL_PACKAGES as installed now, as MLflow's own inference
    pins them: the served model gets the versions it was registered (and tested) with.

    The public version only: a local label (torch's ``+cu130``, ``+cpu``) names a build on
    PyTorch's own index, so ``torch==2.14.1+cpu`` fails where pip has only PyPI, while
    ``torch==2.14.1`` installs from PyPI and still matches a ``+cpu`` build when PyTorch's
    index is given (PEP 440 ignores local labels for a pin without one).
    """
    return [f"{name}=={version(name).partition('+')[0]}" for name in MODEL_PACKAGES]


def bundle_digest(model_dir: Path, thresholds: Path) -> str:
    """sha256 over the files a prediction depends on: weights, spec, thresholds and the
    feature score they were tuned on."""
    digest = hashlib.sha256()
    for path in [*(model_dir / name for name in BUNDLE_FILES), *decision_files(thresholds)]:
        digest.update(f"{path.name}:{file_digest(path)}\n".encode())
    return digest.hexdigest()


def model_signature(classes: list[str]) -> ModelSignature:
    """Inputs: image paths or raw bytes; outputs: label, score and one score per class.

    The ``multi_label`` param (a request's ``"params"``) adds ``labels``, as
    ``opensig predict --multi-label`` does; MLflow drops params a signature does not declare.
    """
    return ModelSignature(
        inputs=Schema(
            [ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)]
        ),
        outputs=Schema(
            [
                ColSpec("string", "path"),
                ColSpec("string", "label"),
                ColSpec("string", "labels", required=False),
                ColSpec("double", "score"),
                *[ColSpec("double", f"score_{c}") for c in classes],
                ColSpec("string", "error"),
            ]
        ),
        params=ParamSchema([ParamSpec("multi_label", "boolean", False)]),
    )


def bundle_folder(
    model_dir: Path, thresholds: Path, into: Path, log_dir: str | None, name: str
) -> Path:
    """The folder logged as the model's artifact; with a prediction ``log_dir``, a
    monitor.json that makes the served model log its predictions there (a local folder made
    absolute: the server runs elsewhere)."""
    bundle = into / BUNDLE_DIR
    shutil.copytree(model_dir, bundle)
    first, *rest = decision_files(thresholds)
    shutil.copy2(first, bundle / THRESHOLDS_FILE)
    for path in rest:  # the feature score, under the name thresholds.json gives it
        shutil.copy2(path, bundle / path.name)
    if log_dir:
        if "://" not in log_dir:
            log_dir = str(Path(log_dir).resolve())
        write_json(bundle / MONITOR_FILE, {"log_dir": log_dir, "model": name})
    return bundle


def log_model(model_dir: Path, thresholds: Path, registered_model: str, log_dir: str | None) -> str:
    """The bundle logged as the pyfunc model of the active run and registered under
    ``registered_model``; returns the new version."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The signature is given; an input example would make MLflow call the model at
        # logging time, which logs a prediction into the prediction log (monitor.log_dir).
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        bundle = bundle_folder(model_dir, thresholds, Path(tmp), log_dir, registered_model)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={BUNDLE_DIR: str(bundle)},
            code_paths=[str(Path(opensig.__file__).parent)],
            pip_requirements=model_requirements(),
            signature=model_signature(read_spec(model_dir).classes),
            registered_model_name=registered_model,
        )
    return str(info.registered_model_version)
