"""MLflow: log a pipeline run, register its model, and move the aliases.

Aliases replace MLflow's old stages: every new version becomes ``challenger``; it becomes
``champion`` when there is none yet, or when it beats the champion on ``promote.metric``
by ``promote.min_delta``, both measured on the current test split. The comparison is
recorded as tags on the new version so a promotion can always be explained.

Registration is idempotent: the run is tagged with the bundle's content digest before the
model is registered, so re-running after a failure (server down, alias call lost) reuses
the version already made instead of adding a duplicate. HTTP retries and timeouts are
bounded by ``mlflow.retries`` / ``mlflow.timeout``, and every URI or MLflow message that
opensig logs or re-raises is redacted (a tracking URI may carry credentials).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import LifecycleStage, Metric, Param, Run, RunStatus
from mlflow.environment_variables import (
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT
from PIL import Image

import opensig
from opensig.config import Config, MlflowConfig, MonitorConfig
from opensig.decision import THRESHOLDS_FILE, decision_files
from opensig.io import env_defaults, file_digest, write_json
from opensig.model import read_spec
from opensig.monitoring.log import MONITOR_FILE
from opensig.plots import picture_tables
from opensig.predict import BUNDLE_DIR, tracking_store
from opensig.redaction import redact

if TYPE_CHECKING:  # the gate calls a judge, built by evaluation, that register hands it
    from opensig.evaluation import ChampionJudge

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"  # then a relative path, or a fourth / and an absolute one
DEFAULT_TRACKING_URI = f"{SQLITE_PREFIX}mlflow.db"
CHAMPION, CHALLENGER = "champion", "challenger"
LOWER_IS_BETTER = {"fpr95", "ece"}
DIGEST_TAG = "bundle_sha256"  # run tag: what makes a re-run find its earlier registration
BUNDLE_FILES = ("weights.safetensors", "config.json")  # + decision_files(thresholds)
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
BACKOFF_FACTOR = 1  # seconds; waits 0, 2, 4, ... between retries (MLflow's default is 2)
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
    """params, else $MLFLOW_TRACKING_URI, else local SQLite (the registry needs a database).

    A relative SQLite path is made absolute here: MLflow keeps one store per URI string for
    the life of the process, so a process that changes folder (a notebook, the bench, a test
    suite) would otherwise keep reading the first folder's database.
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    path = uri.removeprefix(SQLITE_PREFIX)
    if uri.startswith(SQLITE_PREFIX) and not path.startswith(("/", ":memory:")):
        return f"{SQLITE_PREFIX}{Path(path).resolve()}"
    return uri


def _uri_source(cfg: MlflowConfig) -> str:
    if cfg.tracking_uri:
        return "mlflow.tracking_uri in params.yaml"
    return "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default"


@contextmanager
def http_limits(cfg: MlflowConfig) -> Iterator[None]:
    """Bound MLflow's HTTP retries and timeouts, unless the user set them in the environment.

    MLflow reads these variables on every request; its defaults (7 retries with exponential
    backoff, 120 s per request) can hang a stage for many minutes on a dead server. Also
    stops MLflow printing run links when the URI holds credentials (it prints them as is),
    and drawing its artifact bars into the stage's log (log_model copies the bundle with
    MLflow's download code).
    """
    settings = {
        MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: str(cfg.retries),
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name: str(BACKOFF_FACTOR),
        MLFLOW_HTTP_REQUEST_TIMEOUT.name: str(cfg.timeout),
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name: "false",
    }
    uri = tracking_uri(cfg)
    if redact(uri) != uri:
        settings[MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name] = "true"
    with env_defaults(settings):
        yield


def check_reachable(cfg: MlflowConfig) -> str:
    """The tracking URI, once one cheap call succeeded: fail before logging anything."""
    uri = tracking_uri(cfg)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # any failure here means the same thing to the user
        tries = (
            f" after {MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()} retries, "
            f"{MLFLOW_HTTP_REQUEST_TIMEOUT.get()} s timeout each"
            if uri.startswith(("http://", "https://"))
            else ""
        )
        raise RuntimeError(
            f"cannot reach the MLflow tracking store {redact(uri)} (from {_uri_source(cfg)})"
            f"{tries}: {redact(str(err))}. "
            "Start the tracking server, or fix mlflow.tracking_uri in params.yaml or "
            "$MLFLOW_TRACKING_URI."
        ) from None  # the chained error would print the unredacted URI with -v
    log.info("MLflow tracking store: %s", redact(uri))
    return uri


@contextmanager
def connected(cfg: MlflowConfig) -> Iterator[str]:
    """Bounded HTTP, a reachable store, and MLflow errors as one redacted RuntimeError.

    The CLI turns RuntimeError into one log line and exit code 2 instead of a traceback.
    """
    with http_limits(cfg):
        uri = check_reachable(cfg)
        try:
            yield uri
        except MlflowException as err:
            raise RuntimeError(
                f"MLflow at {redact(uri)} failed: {redact(err.message)}. Re-run the stage once "
                "the store is back: a version already registered for this bundle is reused, "
                "not duplicated."
            ) from None


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


def bundle_digest(model_dir: Path, thresholds: Path) -> str:
    """sha256 over the files a prediction depends on: weights, spec, thresholds and the
    feature score they were tuned on."""
    digest = hashlib.sha256()
    for path in [*(model_dir / name for name in BUNDLE_FILES), *decision_files(thresholds)]:
        digest.update(f"{path.name}:{file_digest(path)}\n".encode())
    return digest.hexdigest()


def _data_version() -> str | None:
    """The md5 that data.dvc records for data/ (None outside a DVC project)."""
    if not Path("data.dvc").is_file():
        return None
    outs = (yaml.safe_load(Path("data.dvc").read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


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
        "data_dvc_md5": _data_version(),
        "dvc_lock_sha256": file_digest(lock) if (lock := Path("dvc.lock")).is_file() else None,
        "dvc_experiment": os.environ.get(DVC_EXP_NAME),
        "opensig_version": opensig.__version__,
    }
    return {k: v for k, v in tags.items() if v is not None}


def run_name(cfg: Config) -> str:
    """Readable and unique: method, backbone, image size and a digest of the logged params
    and the data version, after the DVC experiment's name when `dvc exp run` runs the stage.
    Two runs share a name only when they share params and data (a rerun)."""
    content = {"params": run_params(cfg, LOGGED_SECTIONS), "data": _data_version()}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:7]
    parts = [
        os.environ.get(DVC_EXP_NAME),
        cfg.train.method,
        cfg.model.backbone,
        f"{cfg.model.image_size}px",
        digest,
    ]
    return " ".join(part for part in parts if part)


def training_experiment(client: MlflowClient, name: str) -> str:
    """The id of the experiment ``name``, made if missing, marked as model training (MLflow's
    experiment-kind tag) unless someone chose its kind already."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
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


def _bundle_folder(
    model_dir: Path, thresholds: Path, into: Path, monitor: MonitorConfig, name: str
) -> Path:
    """The folder logged as the model's artifact; with ``monitor.log_dir`` set, a
    monitor.json that makes the served model log its predictions there (a local folder made
    absolute: the server runs elsewhere)."""
    bundle = into / BUNDLE_DIR
    shutil.copytree(model_dir, bundle)
    first, *rest = decision_files(thresholds)
    shutil.copy2(first, bundle / THRESHOLDS_FILE)
    for path in rest:  # the feature score, under the name thresholds.json gives it
        shutil.copy2(path, bundle / path.name)
    if monitor.log_dir:
        log_dir = monitor.log_dir
        if "://" not in log_dir:
            log_dir = str(Path(log_dir).resolve())
        write_json(bundle / MONITOR_FILE, {"log_dir": log_dir, "model": name})
    return bundle


def run_params(cfg: Config, sections: tuple[str, ...] | None = None) -> dict[str, str]:
    """The params as MLflow stores them (strings), all or those of ``sections``. Never the
    tracking URI: useless as a param, and it may carry credentials."""
    dump = cfg.model_dump(mode="json", exclude={"mlflow": {"tracking_uri"}})
    chosen = {name: value for name, value in dump.items() if sections is None or name in sections}
    return {key: str(value) for key, value in flatten(chosen).items()}


def _existing_run(client: MlflowClient, run_id: str) -> Run | None:
    """The run, or None when the store has no run of that id (any other failure raises)."""
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


class TrainingRun:
    """The MLflow run a training reports its epochs to (an :class:`opensig.train.EpochLog`);
    register later logs the metrics, reports and model into that same run.

    A tracking store that is down must not stop a training: it is tried with the bounded
    retries of ``mlflow.retries`` / ``mlflow.timeout``, and any failure is one warning after
    which the training goes on unlogged (register then logs into a run of its own).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
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
        self._limits.enter_context(http_limits(self.cfg.mlflow))
        with self._tolerated("starting the training run"):
            self._client = client = MlflowClient(check_reachable(self.cfg.mlflow))
            name = self.cfg.mlflow.experiment
            experiment_id = training_experiment(client, name)
            run = _existing_run(client, saved_id) if saved_id else None
            if (
                run is not None
                and run.info.experiment_id == experiment_id
                and run.info.lifecycle_stage == LifecycleStage.ACTIVE
            ):
                client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            else:
                run = client.create_run(
                    experiment_id, run_name=run_name(self.cfg), tags=provenance_tags()
                )
            params = run_params(self.cfg, TRAIN_SECTIONS)
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            logged = {m.step for m in client.get_metric_history(run.info.run_id, EPOCH_METRICS[0])}
            self.run_id = run.info.run_id
            self._log([row for row in history if row["epoch"] not in logged])
            log.info("MLflow: training run %s in experiment %s", self.run_id, name)
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
    cfg: Config,
    metrics: dict,
    artifacts: list[Path],
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run holding the params a person compares (:data:`LOGGED_SECTIONS`), the
    metrics (counts as tags), report files and provenance tags: a new run named by
    :func:`run_name`, or ``run_id`` resumed (the training's run, which keeps its name).

    The one place that decides how files are logged: PNGs as pictures (:func:`_log_picture`),
    the others under reports/. MLflow's fluent API needs a global tracking URI: it is put
    back after (:func:`tracking_store`), so in-process callers (bench, notebooks, tests) do
    not inherit this store.
    """
    with tracking_store(tracking_uri(cfg.mlflow)):
        client = MlflowClient()
        mlflow.set_experiment(experiment_id=training_experiment(client, cfg.mlflow.experiment))
        name = None if run_id else run_name(cfg)
        with mlflow.start_run(run_id=run_id, run_name=name) as run:
            values, counts = split_counts(metrics)
            mlflow.log_params(run_params(cfg, LOGGED_SECTIONS))
            mlflow.log_metrics(values)
            mlflow.set_tags({**provenance_tags(), **counts, **(tags or {})})
            tables = {a.path for a in client.list_artifacts(run.info.run_id, TABLES_DIR)}
            for path in artifacts:
                if path.is_file() and path.suffix == ".png":
                    _log_picture(path, tables)
                elif path.is_file():
                    mlflow.log_artifact(str(path), artifact_path="reports")
            yield run


def _training_run(cfg: Config, run_id: str | None, digest: str) -> str | None:
    """``run_id``, the training's run, when this registration may complete it; else None.

    It has to be in this store and experiment and not deleted, hold no other bundle (a run
    holds one registered model: its digest tag is how a re-run finds that model), and hold
    no other value of a param logged now (MLflow never changes a logged param). Settings that
    are not logged (``mlflow``, ``promote``, ``retrain``) never break the link: a new
    ``mlflow.registered_model`` still completes the training's run.
    """
    if run_id is None:
        return None
    client = MlflowClient(tracking_uri(cfg.mlflow))
    run = _existing_run(client, run_id)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    params = run_params(cfg, LOGGED_SECTIONS)
    if run is None or run.info.lifecycle_stage != LifecycleStage.ACTIVE:
        why = "not in this tracking store, or deleted"
    elif experiment is None or run.info.experiment_id != experiment.experiment_id:
        why = f"not in the experiment {cfg.mlflow.experiment}"
    elif run.data.tags.get(DIGEST_TAG, digest) != digest:
        why = "it holds another registered bundle"
    elif changed := sorted(k for k, v in run.data.params.items() if params.get(k, v) != v):
        why = f"params changed since training: {', '.join(changed)}"
    else:
        return run_id
    log.info("register: a new MLflow run, not the training's run %s (%s)", run_id, why)
    return None


def log_and_register(
    cfg: Config,
    metrics: dict,
    model_dir: Path,
    thresholds: Path,
    artifacts: list[Path],
    train_run: str | None = None,
) -> tuple[str, str]:
    """One MLflow run with the pyfunc model, registered. Returns (run id, model version).

    The run is the training's (``train_run``) when it can be (:func:`_training_run`), so
    that one run holds the epochs, the metrics and the model.
    """
    digest = bundle_digest(model_dir, thresholds)
    tags = {DIGEST_TAG: digest}  # set before log_model registers: a re-run then finds it
    with (
        logged_run(
            cfg, metrics, artifacts, tags=tags, run_id=_training_run(cfg, train_run, digest)
        ) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={
                BUNDLE_DIR: str(
                    _bundle_folder(
                        model_dir, thresholds, Path(tmp), cfg.monitor, cfg.mlflow.registered_model
                    )
                )
            },
            code_paths=[str(Path(opensig.__file__).parent)],
            pip_requirements=MODEL_REQUIREMENTS,
            signature=model_signature(read_spec(model_dir).classes),
            registered_model_name=cfg.mlflow.registered_model,
        )
    return run.info.run_id, str(info.registered_model_version)


def find_registered(cfg: Config, digest: str) -> tuple[str, str] | None:
    """(run id, version) of the oldest version of this model logged from a run tagged
    with ``digest`` in the configured experiment; None if there is none."""
    client = MlflowClient(tracking_uri(cfg.mlflow))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.{DIGEST_TAG} = '{digest}'"
    )
    name = cfg.mlflow.registered_model
    versions = [
        v
        for run in runs
        for v in client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    ]
    if not versions:
        return None
    oldest = min(versions, key=lambda v: int(v.version))
    return oldest.run_id, str(oldest.version)


def _require_logged_metric(client: MlflowClient, name: str, version: str, metric: str) -> None:
    """A champion must be explainable: its run has to carry the metric it was chosen on."""
    run_id = client.get_model_version(name, version).run_id
    logged = client.get_run(run_id).data.metrics if run_id else {}
    if (logged_as := mlflow_metric_name(metric)) not in logged:
        raise RuntimeError(
            f"model {name} version {version}: its run {run_id} has no {metric!r} metric "
            f"({logged_as!r} in MLflow: not logged, or undefined on the test split), so it "
            f"cannot become {CHAMPION}; "
            "the alias was not moved. Log the metric on that run (or delete the version and "
            "re-run register), or pick another promote.metric."
        )


def _champion_version(client: MlflowClient, name: str) -> str | None:
    """The champion's version; None when there is none yet, or no such model yet."""
    # Read from the model, not by catching an alias lookup error: a server that fails to
    # answer must not look like "no champion yet" (that would promote any challenger).
    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    return None if version is None else str(version)


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


def class_sets(classes: Sequence[str], champion_classes: Sequence[str]) -> dict:
    """How the champion's classes differ from today's: part of every comparison, so that a
    promotion across class sets (new data, a class added by review) explains itself."""
    lacks = sorted(set(classes) - set(champion_classes))
    extra = sorted(set(champion_classes) - set(classes))
    return {
        "class_sets": "differ" if lacks or extra else "same",
        "champion_lacks": lacks,  # today's classes the champion cannot name
        "champion_extra": extra,  # the champion's classes today's data no longer has
    }


@dataclass
class Decision:
    """The gate's verdict, reached before anything is registered or re-aliased."""

    promoted: bool
    comparison: dict
    already_champion: bool = False


def judge(
    cfg: Config,
    challenger_value: float | None,
    classes: Sequence[str],
    registered_version: str | None,
    judge_champion: ChampionJudge,
) -> Decision:
    """Challenger vs champion, with every check that can fail: the champion's download and
    evaluation (``judge_champion``, e.g. :func:`opensig.evaluation.champion_judge`), and the
    metric a promotion rests on. ``registered_version``: this bundle's version when it is
    registered already (a re-run), else None."""
    client = MlflowClient(tracking_uri(cfg.mlflow))
    name, metric, delta = cfg.mlflow.registered_model, cfg.promote.metric, cfg.promote.min_delta
    champion = _champion_version(client, name)
    comparison: dict = {"metric": metric, "min_delta": delta, "challenger_value": challenger_value}
    if champion is not None and champion == registered_version:
        comparison.update(reason="already the champion", decision="already champion")
        return Decision(True, comparison, already_champion=True)
    if champion is None:
        promoted, comparison["reason"] = True, "no champion yet"
    else:
        try:
            champion_metrics, champion_classes = judge_champion(champion, classes)
        except (MlflowException, OSError, ValueError, RuntimeError) as err:
            message = err.message if isinstance(err, MlflowException) else str(err)
            raise RuntimeError(
                f"model {name}: the champion, version {champion}, could not be judged on the "
                f"current test split ({redact(message)}); nothing was registered and no alias "
                f"moved. Repair or delete that version, or move the {CHAMPION} alias, then "
                "re-run register."
            ) from None
        champion_value = metric_value(champion_metrics, metric)
        promoted, gain, comparison["reason"] = compare(
            metric, challenger_value, champion_value, delta
        )
        comparison.update(champion_version=champion, champion_value=champion_value, gain=gain)
        comparison.update(class_sets(classes, champion_classes))
    comparison["decision"] = "promoted" if promoted else "kept champion"
    if promoted and registered_version is not None:
        _require_logged_metric(client, name, registered_version, metric)
    elif promoted and challenger_value is None:
        raise RuntimeError(
            f"{metric} is undefined on the test split (reports/metrics.json), so this model "
            f"cannot become {CHAMPION}; nothing was registered. Pick another promote.metric, "
            "or give the test split the images it needs."
        )
    return Decision(promoted, comparison)


def apply(cfg: Config, version: str, decision: Decision) -> None:
    """Record the comparison as ``promote.*`` tags and move the aliases: ``challenger`` to
    ``version``, and ``champion`` too when it won. The last step of a registration."""
    client = MlflowClient(tracking_uri(cfg.mlflow))
    name, comparison = cfg.mlflow.registered_model, decision.comparison
    if not decision.already_champion:
        client.set_registered_model_alias(name, CHALLENGER, version)
        for key, value in comparison.items():
            text = ", ".join(value) if isinstance(value, list) else str(value)
            client.set_model_version_tag(name, version, f"promote.{key}", text)
        if decision.promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
    log.info(
        "model %s version %s: %s (%s)", name, version, comparison["decision"], comparison["reason"]
    )


def register_and_promote(
    cfg: Config,
    metrics: dict,
    model_dir: Path,
    thresholds: Path,
    artifacts: list[Path],
    train_run: str | None,
    judge_champion: ChampionJudge,
) -> Registration:
    """Register the bundle and move the aliases, in an order that fails safe: the gate
    (:func:`judge`) runs before anything is registered or re-aliased, so a failing champion
    evaluation or a missing metric leaves the registry as it was.

    Idempotent: a bundle already registered under this name (same content digest) reuses
    its run and version instead of adding a duplicate.
    """
    name = cfg.mlflow.registered_model
    classes = read_spec(model_dir).classes  # first: no model folder is named as such
    found = find_registered(cfg, bundle_digest(model_dir, thresholds))
    if found:
        log.info(
            "model %s: this bundle is already registered as version %s (run %s)",
            name,
            found[1],
            found[0],
        )
    decision = judge(
        cfg,
        metric_value(metrics, cfg.promote.metric),
        classes,
        found[1] if found else None,
        judge_champion,
    )
    run_id, version = found or log_and_register(
        cfg, metrics, model_dir, thresholds, artifacts, train_run
    )
    apply(cfg, version, decision)
    aliases = aliases_of(cfg, version)
    return Registration(name, version, run_id, aliases, decision.promoted, decision.comparison)


def aliases_of(cfg: Config, version: str) -> list[str]:
    client = MlflowClient(tracking_uri(cfg.mlflow))
    return sorted(client.get_model_version(cfg.mlflow.registered_model, version).aliases)
