"""MLflow: log a pipeline run, register its model, and move the aliases.

Aliases replace MLflow's old stages: every new version becomes ``challenger``; it becomes
``champion`` when there is none yet, or when it beats the champion on ``promote.metric``
by ``promote.min_delta``, both measured on the current test split. The comparison is
recorded as tags on the new version so a promotion can always be explained.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

import opensig
from opensig.config import Config, MlflowConfig
from opensig.model import read_spec
from opensig.predict import BUNDLE_DIR, THRESHOLDS_FILE

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"
LOWER_IS_BETTER = {"fpr95", "ece"}
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_REQUIREMENTS = [
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "albumentations",
    "pandas",
    "pillow",
    "numpy",
    "scikit-learn",
    "pydantic",
    "pyyaml",
    "tqdm",
    "matplotlib",
]


def tracking_uri(cfg: MlflowConfig) -> str:
    """params, else $MLFLOW_TRACKING_URI, else local SQLite (the registry needs a database)."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(mapping: dict, prefix: str = "") -> dict:
    """Nested dict -> {'a.b': value}; how params and metrics appear in MLflow."""
    flat: dict = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def provenance_tags() -> dict[str, str]:
    """Git commit, the data.dvc hash and the dvc.lock hash: what exactly produced this model."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return out.stdout.strip()

    data_md5 = None
    if Path("data.dvc").is_file():
        outs = (yaml.safe_load(Path("data.dvc").read_text()) or {}).get("outs") or [{}]
        data_md5 = outs[0].get("md5")
    tags = {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None
        if (status := git("status", "--porcelain")) is None
        else str(bool(status)),
        "data_dvc_md5": data_md5,
        "dvc_lock_sha256": _file_sha256(Path("dvc.lock")),
        "opensig_version": opensig.__version__,
    }
    return {k: v for k, v in tags.items() if v is not None}


@dataclass
class Registration:
    name: str
    version: str
    run_id: str
    aliases: list[str]
    promoted: bool
    comparison: dict

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def model_signature(classes: list[str]) -> ModelSignature:
    """Inputs: image paths or raw bytes; outputs: label, score and one score per class."""
    return ModelSignature(
        inputs=Schema(
            [ColSpec("string", "path", required=False), ColSpec("binary", "image", required=False)]
        ),
        outputs=Schema(
            [
                ColSpec("string", "path"),
                ColSpec("string", "label"),
                ColSpec("double", "score"),
                *[ColSpec("double", f"score_{c}") for c in classes],
                ColSpec("string", "error"),
            ]
        ),
    )


def _bundle_folder(model_dir: Path, thresholds: Path, into: Path) -> Path:
    bundle = into / BUNDLE_DIR
    shutil.copytree(model_dir, bundle)
    shutil.copy2(thresholds, bundle / THRESHOLDS_FILE)
    return bundle


@contextmanager
def logged_run(
    cfg: Config,
    metrics: dict,
    artifacts: list[Path],
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run holding the params, metrics, report files and provenance tags."""
    mlflow.set_tracking_uri(tracking_uri(cfg.mlflow))
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(flatten(cfg.model_dump(mode="json")))
        mlflow.log_metrics(
            {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
        )
        mlflow.set_tags({**provenance_tags(), **(tags or {})})
        for path in artifacts:
            if path.is_file():
                mlflow.log_artifact(str(path), artifact_path="reports")
        yield run


def log_and_register(
    cfg: Config,
    metrics: dict,
    model_dir: Path,
    thresholds: Path,
    artifacts: list[Path],
) -> tuple[str, str]:
    """One MLflow run with the pyfunc model, registered. Returns (run id, model version)."""
    with logged_run(cfg, metrics, artifacts) as run, tempfile.TemporaryDirectory() as tmp:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={BUNDLE_DIR: str(_bundle_folder(model_dir, thresholds, Path(tmp)))},
            code_paths=[str(Path(opensig.__file__).parent)],
            pip_requirements=MODEL_REQUIREMENTS,
            signature=model_signature(read_spec(model_dir).classes),
            registered_model_name=cfg.mlflow.registered_model,
        )
    return run.info.run_id, str(info.registered_model_version)


def _champion_version(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def metric_value(metrics: dict, name: str) -> float | None:
    """``name`` may be nested, e.g. ``novel.auroc``; None when undefined (e.g. no unknowns)."""
    return flatten(metrics).get(name)


def compare(
    metric: str, challenger: float | None, champion: float | None, min_delta: float
) -> tuple[bool, float | None, str]:
    """Does the challenger beat the champion by more than ``min_delta``? (promoted, gain, why)."""
    if challenger is None or champion is None:
        return False, None, f"{metric} is undefined on the test split; champion kept"
    lower_is_better = metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER
    gain = champion - challenger if lower_is_better else challenger - champion
    promoted = gain > min_delta + 1e-12  # float noise is not a win
    return promoted, gain, f"gain {gain:+.4f} {'>' if promoted else '<='} min_delta {min_delta}"


def promote(
    cfg: Config,
    version: str,
    challenger_value: float | None,
    champion_value_of: Callable[[str], float | None],
) -> tuple[bool, dict]:
    """Set ``challenger`` on ``version``; set ``champion`` if it wins. Records why, as tags."""
    client = MlflowClient(tracking_uri(cfg.mlflow))
    name, metric, delta = cfg.mlflow.registered_model, cfg.promote.metric, cfg.promote.min_delta
    client.set_registered_model_alias(name, CHALLENGER, version)
    champion = _champion_version(client, name)
    comparison = {"metric": metric, "min_delta": delta, "challenger_value": challenger_value}
    if champion is None:
        promoted, comparison["reason"] = True, "no champion yet"
    else:
        champion_value = champion_value_of(champion)
        promoted, gain, comparison["reason"] = compare(
            metric, challenger_value, champion_value, delta
        )
        comparison.update(champion_version=champion, champion_value=champion_value, gain=gain)
    comparison["decision"] = "promoted" if promoted else "kept champion"
    for key, value in comparison.items():
        client.set_model_version_tag(name, version, f"promote.{key}", str(value))
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    log.info(
        "model %s version %s: %s (%s)", name, version, comparison["decision"], comparison["reason"]
    )
    return promoted, comparison


def aliases_of(cfg: Config, version: str) -> list[str]:
    client = MlflowClient(tracking_uri(cfg.mlflow))
    return sorted(client.get_model_version(cfg.mlflow.registered_model, version).aliases)
