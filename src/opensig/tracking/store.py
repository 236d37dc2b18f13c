"""The connection to MLflow's tracking store: which store, bounded HTTP, a reachability check
before anything is logged, and MLflow errors as one redacted line."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.environment_variables import (
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from opensig.config import MlflowConfig
from opensig.io import env_defaults
from opensig.redaction import redact
from opensig.workspace import shared_path

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"  # then a relative path, or a fourth / and an absolute one
DEFAULT_TRACKING_URI = f"{SQLITE_PREFIX}mlflow.db"
BACKOFF_FACTOR = 1  # seconds; waits 0, 2, 4, ... between retries (MLflow's default is 2)


def tracking_uri(cfg: MlflowConfig) -> str:
    """params, else $MLFLOW_TRACKING_URI, else local SQLite (the registry needs a database).

    A relative SQLite path is made absolute here: MLflow keeps one store per URI string for
    the life of the process, so a process that changes folder (a notebook, the bench, a test
    suite) would otherwise keep reading the first folder's database. In a DVC experiment's
    temporary copy (``dvc exp run --temp``, ``--queue``) it is the project's database, not
    one deleted with the copy (:func:`opensig.workspace.shared_path`).
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return resolve_sqlite(uri, shared_path(Path(".")))


def resolve_sqlite(uri: str, folder: Path) -> str:
    """A relative SQLite path made absolute against ``folder``; any other URI as it is."""
    path = uri.removeprefix(SQLITE_PREFIX)
    if uri.startswith(SQLITE_PREFIX) and not path.startswith(("/", ":memory:")):
        return f"{SQLITE_PREFIX}{(folder / path).resolve()}"
    return uri


def project_store(cfg: MlflowConfig, project: Path, uri: str | None = None) -> MlflowConfig:
    """The store of a flow on ``project``: ``uri`` if given, else params'; a relative SQLite
    path of either (or the default) against the project, as its commands read it when DVC
    runs them there, since a flow's worker may run in any folder. $MLFLOW_TRACKING_URI is
    the process's own setting: read as every command reads it."""
    chosen = uri or cfg.tracking_uri
    if chosen is None and os.environ.get("MLFLOW_TRACKING_URI"):
        return cfg
    chosen = resolve_sqlite(chosen or DEFAULT_TRACKING_URI, project)
    return MlflowConfig.model_validate({**cfg.model_dump(), "tracking_uri": chosen})


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


@contextmanager
def global_store(uri: str | None) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` (if any) for a while, then put back with
    the $MLFLOW_TRACKING_URI that setting it exports. The fluent API, and the registry
    lookup of a ``models:/`` download, read only the global URI (else ./mlflow.db)."""
    if uri is None:
        yield
        return
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets it


def missing(err: MlflowException) -> bool:
    """Does MLflow's error say that what was asked for does not exist (and nothing worse)?"""
    return err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def existing_run(client: MlflowClient, run_id: str) -> Run | None:
    """The run, or None when the store has no run of that id (any other failure raises)."""
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if missing(err):
            return None
        raise
