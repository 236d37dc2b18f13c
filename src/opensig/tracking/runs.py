"""MLflow runs: the training run that each epoch reports to, and the logging of a pipeline run
(params, metrics, reports, pictures, provenance) that register and the bench share."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import LifecycleStage, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT
from PIL import Image

import opensig
from opensig.config import Config, MlflowConfig
from opensig.io import file_digest
from opensig.plots import picture_tables
from opensig.redaction import redact
from opensig.tracking.store import (
    SQLITE_PREFIX,
    check_reachable,
    existing_run,
    global_store,
    http_limits,
)
from opensig.workspace import shared_path

log = logging.getLogger(__name__)

TRAIN_SECTIONS = ("data", "model", "train")  # the params a trained model depends on
LOGGED_SECTIONS = (*TRAIN_SECTIONS, "tune")  # the params a person compares runs by
EPOCH_METRICS = ("train_loss", "val_loss", "lr", "images_per_s")  # logged with step = epoch
# metrics.json keys measured against every unknown image; logged as openset/<key>
OPENSET_METRICS = ("auroc", "fpr95", "oscr", "unknown_recall")
PICTURE_KEY = "pictures/{}"  # image key of a PNG: the chart view shows the pictures together
TABLES_DIR = "tables"  # run folder of the pictures' data (mlflow.log_table)
# MLflow's experiment-kind tag (the UI's "experiment type"): opensig trains models
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
DVC_EXP_NAME = "DVC_EXP_NAME"  # set by `dvc exp run` for the stages it runs


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


def data_version() -> str | None:
    """The md5 that data.dvc records for data/ (None outside a DVC project)."""
    if not Path("data.dvc").is_file():
        return None
    outs = (yaml.safe_load(Path("data.dvc").read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def log_data_input(client: MlflowClient, run_id: str, context: str) -> None:
    """The data version (data.dvc's md5) as the run's MLflow dataset input, so the runs
    table's *Datasets* column names it (``data`` and the md5); nothing outside DVC."""
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    md5 = data_version()
    if md5 is None:
        return
    # MLflow registers its local-folder source class at import, under no public name
    local = next(c for c in get_registered_sources() if c._get_source_type() == "local")
    source = local(Path("data").resolve().as_posix())
    dataset = MetaDataset(source, name="data", digest=md5.removesuffix(".dir")[:36])
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])


def provenance_tags() -> dict[str, str]:
    """Git commit (also as MLflow's own tag, which the run page shows), the data.dvc hash,
    the dvc.lock hash and the DVC experiment: what exactly produced this model."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    tags = {
        "git_commit": commit,
        MLFLOW_GIT_COMMIT: commit,
        "git_dirty": None
        if (status := git("status", "--porcelain")) is None
        else str(bool(status)),
        "data_dvc_md5": data_version(),
        "dvc_lock_sha256": file_digest(lock) if (lock := Path("dvc.lock")).is_file() else None,
        "dvc_experiment": os.environ.get(DVC_EXP_NAME),
        "opensig_version": opensig.__version__,
    }
    return {k: v for k, v in tags.items() if v is not None}


def run_params(cfg: Config, sections: tuple[str, ...] | None = None) -> dict[str, str]:
    """The params as MLflow stores them (strings), all or those of ``sections``. Never the
    tracking URI: useless as a param, and it may carry credentials."""
    dump = cfg.model_dump(mode="json", exclude={"mlflow": {"tracking_uri"}})
    chosen = {name: value for name, value in dump.items() if sections is None or name in sections}
    return {key: str(value) for key, value in flatten(chosen).items()}


def run_name(cfg: Config) -> str:
    """Readable and unique: a digest of the logged params and the data version, then the
    method, backbone and image size, after the DVC experiment's name when `dvc exp run` runs
    the stage. Two runs share a name only when they share params and data (a rerun)."""
    content = {"params": run_params(cfg, LOGGED_SECTIONS), "data": data_version()}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:7]
    parts = [  # what tells runs apart first: the UI cuts long names off at the end
        os.environ.get(DVC_EXP_NAME),
        digest,
        cfg.train.method,
        cfg.model.backbone,
        f"{cfg.model.image_size}px",
    ]
    return " ".join(part for part in parts if part)


@dataclass(frozen=True)
class RunSpec:
    """How a pipeline run shows in MLflow, read once from the config: the experiment, the
    run's name (:func:`run_name`) and the params it logs."""

    experiment: str
    name: str
    params: dict[str, str]

    @classmethod
    def of(cls, cfg: Config, sections: tuple[str, ...] = LOGGED_SECTIONS) -> RunSpec:
        return cls(cfg.mlflow.experiment, run_name(cfg), run_params(cfg, sections))


def _artifact_root(client: MlflowClient) -> str | None:
    """Where a new experiment of a local SQLite store keeps its files: ``mlruns/`` of the
    project (MLflow's default is below the working folder, which in a DVC experiment's
    temporary copy is deleted with it); a server's store decides for itself (None)."""
    if not client.tracking_uri.startswith(SQLITE_PREFIX):
        return None
    return shared_path(Path("mlruns")).resolve().as_uri()


def training_experiment(client: MlflowClient, name: str) -> str:
    """The id of the experiment ``name``, made if missing, marked as model training (MLflow's
    experiment-kind tag) unless someone chose its kind already."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
        return client.create_experiment(name, _artifact_root(client), tags)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def mlflow_metric_name(key: str) -> str:
    """A metrics.json key (``macro_f1``, ``novel.auroc``) as logged to MLflow. The chart view
    groups metrics by what precedes their last '/': ``novel/…`` (held-out unknowns) and
    ``openset/…`` (every unknown) come first, the closed-set ones stay under Model metrics."""
    return f"openset/{key}" if key in OPENSET_METRICS else key.replace(".", "/")


def split_counts(metrics: dict) -> tuple[dict[str, float], dict[str, str]]:
    """(MLflow metrics, tags): counts (ints in metrics.json, e.g. ``n_known``) become tags,
    so the chart view shows rates only; undefined metrics (None) are left out."""
    logged, counts = {}, {}
    for key, value in flatten(metrics).items():
        if isinstance(value, int):
            counts[key] = str(value)
        elif isinstance(value, float):
            logged[mlflow_metric_name(key)] = value
    return logged, counts


class TrainingRun:
    """The MLflow run a training reports its epochs to (an :class:`opensig.train.EpochLog`);
    register later logs the metrics, reports and model into that same run.

    A tracking store that is down must not stop a training: it is tried with the bounded
    retries of ``mlflow.retries`` / ``mlflow.timeout``, and any failure is one warning after
    which the training goes on unlogged (register then logs into a run of its own).
    """

    def __init__(self, store: MlflowConfig, spec: RunSpec) -> None:
        self.store, self.spec = store, spec
        self.run_id: str | None = None
        self._client: MlflowClient  # made in start(): on rank 0 only, once bounded
        self._limits = ExitStack()

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.run_id is not None:
            status = RunStatus.FINISHED if kind is None else RunStatus.KILLED
            with self._tolerated("closing the training run"):
                self._client.set_terminated(self.run_id, RunStatus.to_string(status))
        self._limits.close()

    @contextmanager
    def _tolerated(self, doing: str) -> Iterator[None]:
        try:
            yield
        except Exception as err:  # whatever tracking does, the training goes on
            message = err.message if isinstance(err, MlflowException) else str(err)
            log.warning(
                "MLflow: %s failed, training goes on without MLflow logging: %s",
                doing,
                redact(message),
            )
            self.run_id = None

    def start(self, saved_id: str | None, history: list[dict]) -> str | None:
        """Resume the run of a stopped training (``saved_id``) or create one; log the
        training's params and the epochs in ``history`` that the run lacks."""
        self._limits.enter_context(http_limits(self.store))
        with self._tolerated("starting the training run"):
            self._client = client = MlflowClient(check_reachable(self.store))
            experiment_id = training_experiment(client, self.spec.experiment)
            run = existing_run(client, saved_id) if saved_id else None
            if (
                run is not None
                and run.info.experiment_id == experiment_id
                and run.info.lifecycle_stage == LifecycleStage.ACTIVE
            ):
                client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            else:
                run = client.create_run(
                    experiment_id, run_name=self.spec.name, tags=provenance_tags()
                )
            params = [Param(k, v) for k, v in self.spec.params.items()]
            client.log_batch(run.info.run_id, params=params)
            log_data_input(client, run.info.run_id, "training")
            logged = {m.step for m in client.get_metric_history(run.info.run_id, EPOCH_METRICS[0])}
            self.run_id = run.info.run_id
            self._log([row for row in history if row["epoch"] not in logged])
            log.info("MLflow: training run %s in experiment %s", self.run_id, self.spec.experiment)
        return self.run_id

    def log_epoch(self, row: dict) -> None:
        if self.run_id is not None:
            with self._tolerated(f"logging epoch {row['epoch']}"):
                self._log([row])

    def _log(self, rows: list[dict]) -> None:
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(r[key]), now, r["epoch"]) for r in rows for key in EPOCH_METRICS
        ]
        self._client.log_batch(self.run_id, metrics=metrics)


def _log_picture(path: Path, existing: set[str]) -> None:
    """A PNG at the top of the run's artifacts (the Compare page shows the files there side by
    side for the runs compared), as an image keyed ``pictures/<name>`` (the chart view's
    image cards), and its data as tables under tables/ (rows that line up across runs, for
    the artifact view). A table already logged is not logged again: MLflow would append."""
    mlflow.log_artifact(str(path))
    with Image.open(path) as image:
        mlflow.log_image(image, key=PICTURE_KEY.format(path.stem), synchronous=True)
    for name, table in picture_tables(path).items():
        if (artifact := f"{TABLES_DIR}/{name}.json") not in existing:
            mlflow.log_table(table, artifact_file=artifact)


@contextmanager
def logged_run(
    tracking_uri: str,
    spec: RunSpec,
    metrics: dict,
    artifacts: list[Path],
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in ``tracking_uri`` holding ``spec``'s params, the metrics (counts as
    tags), report files and provenance tags: a new run named ``spec.name``, or ``run_id``
    resumed (the training's run, which keeps its name).

    The one place that decides how files are logged: PNGs as pictures (:func:`_log_picture`),
    the others under reports/. MLflow's fluent API needs a global tracking URI: it is put
    back after (:func:`global_store`), so in-process callers (bench, notebooks, tests) do
    not inherit this store.
    """
    with global_store(tracking_uri):
        client = MlflowClient()
        mlflow.set_experiment(experiment_id=training_experiment(client, spec.experiment))
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else spec.name) as run:
            values, counts = split_counts(metrics)
            mlflow.log_params(spec.params)
            mlflow.log_metrics(values)
            mlflow.set_tags({**provenance_tags(), **counts, **(tags or {})})
            log_data_input(client, run.info.run_id, "evaluation")
            tables = {a.path for a in client.list_artifacts(run.info.run_id, TABLES_DIR)}
            for path in artifacts:
                if path.is_file() and path.suffix == ".png":
                    _log_picture(path, tables)
                elif path.is_file():
                    mlflow.log_artifact(str(path), artifact_path="reports")
            yield run
