"""Model references as predict, train's warm start, register's gate and the prediction log
take them: a local bundle folder, a local MLflow model, or a ``models:/`` / ``runs:/`` URI
resolved in a tracking store. The one ``models:/`` parser is :class:`RegisteredModelUri`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException

from opensig.config import MlflowConfig
from opensig.io import env_defaults
from opensig.model import confine, model_digest
from opensig.redaction import redact
from opensig.tracking.store import global_store, http_limits, missing
from opensig.tracking.store import tracking_uri as configured_uri

BUNDLE_DIR = "bundle"  # the folder name inside a logged MLflow model's artifacts
MODELS_SCHEME = "models:/"


@dataclass(frozen=True)
class RegisteredModelUri:
    """``models:/name/version``, ``models:/name@alias`` or ``models:/name/<stage>``."""

    name: str
    version: str | None = None  # digits, when the URI names a version
    alias: str | None = None
    stage: str | None = None  # an old-style stage (e.g. Production): resolved by MLflow itself

    @classmethod
    def parse(cls, uri: str) -> RegisteredModelUri | None:
        """The parts of a ``models:/`` URI; None for anything else (a folder, ``runs:/``)."""
        if not uri.startswith(MODELS_SCHEME):
            return None
        name, _, suffix = uri.removeprefix(MODELS_SCHEME).partition("/")
        name, _, alias = name.partition("@")
        if suffix.isdigit():
            return cls(name, version=suffix)
        return cls(name, alias=alias or None, stage=suffix or None)

    def resolve_version(self, client: MlflowClient) -> str | None:
        """The version number this URI names now (an alias looked up); None for a stage."""
        if self.alias:
            return str(client.get_model_version_by_alias(self.name, self.alias).version)
        return self.version


def client_for(uri: str | None) -> MlflowClient:
    """A client of one store for both tracking and registry (MLflow would otherwise take the
    registry from the global URI)."""
    return MlflowClient(uri, registry_uri=uri)


def model_identity(
    model: str, bundle_dir: Path, tracking_uri: str | None = None
) -> tuple[str, str]:
    """(model, model_version) as the prediction log records them: the registered name and
    version of a ``models:/name/version`` or ``models:/name@alias`` URI (an alias looked up
    in ``tracking_uri``), else ``model`` as given (a folder, a runs:/ URI) and the bundle's
    ``model_digest``."""
    registered = RegisteredModelUri.parse(model)
    if registered is not None:
        version = registered.resolve_version(client_for(tracking_uri))
        if version is not None:
            return registered.name, version
    return model, model_digest(bundle_dir)


def resolve_model_dir(model: str, tracking_uri: str | None = None) -> Path:
    """A local bundle folder, a local MLflow model, or an MLflow URI -> a local bundle folder.

    ``tracking_uri`` is the MLflow server or store that resolves ``models:/`` and ``runs:/``.
    """
    local = Path(model)
    if local.exists():
        return confine(local) / "artifacts" / BUNDLE_DIR if (local / "MLmodel").is_file() else local
    if "://" in model or model.startswith((MODELS_SCHEME, "runs:/")):
        try:
            # models:/ names resolve in the registry of the global tracking URI, whatever
            # download_artifacts' registry_uri says (else ./mlflow.db): global_store sets it.
            # MLflow draws its download bar even into logs (a Prefect run's, a stage's).
            with (
                global_store(tracking_uri),
                env_defaults({MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name: "false"}),
            ):
                downloaded = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=model, tracking_uri=tracking_uri, registry_uri=tracking_uri
                    )
                )
        except MlflowException as err:
            where = redact(tracking_uri or mlflow.get_tracking_uri())
            registered = RegisteredModelUri.parse(model)
            found = registry_entries(registered, tracking_uri) if registered else None
            raise FileNotFoundError(
                f"--model {model}: not found in {where}: {found}"
                if found
                else f"--model {model}: {redact(err.message)} (tracking store {where})"
            ) from None
        return confine(downloaded) / "artifacts" / BUNDLE_DIR
    raise FileNotFoundError(
        f"--model {model}: no such folder, and not a models:/ or runs:/ URI; pass a model "
        "folder (e.g. artifacts/model) or a registered model (e.g. models:/opensig@champion)"
    )


def local_bundle(model: str, store: MlflowConfig) -> Path:
    """:func:`resolve_model_dir` in the configured store, with its bounded HTTP: a dead
    tracking server fails in seconds, not minutes."""
    with http_limits(store):
        return resolve_model_dir(model, configured_uri(store))


def registry_entries(
    model: RegisteredModelUri, tracking_uri: str | None, shown: int = 20
) -> str | None:
    """What the registry holds instead of ``model`` (a models:/ URI that did not resolve): the
    registered models, or that model's aliases and versions. None when what it names exists
    (the failure lies elsewhere), when it names no alias or version, or on a read failure."""
    client = client_for(tracking_uri)
    try:
        try:
            aliases = client.get_registered_model(model.name).aliases
        except MlflowException as err:
            if not missing(err):
                return None
            names = [m.name for m in client.search_registered_models(max_results=shown + 1)]
            listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
            return f"no registered model {model.name!r}; " + (
                f"registered models: {listed}"
                if names
                else "none is registered there (run the pipeline, or pass --tracking-uri)"
            )
        found = client.search_model_versions(f"name='{model.name}'")
        versions = sorted(int(v.version) for v in found)
    except MlflowException:
        return None
    if model.alias and model.alias not in aliases:
        absent = f"alias @{model.alias}"
    elif model.version and int(model.version) not in versions:
        absent = f"version {model.version}"
    else:
        return None
    held = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
    listed = ("..., " if len(versions) > shown else "") + ", ".join(map(str, versions[-shown:]))
    return f"model {model.name!r} has no {absent}; its aliases: {held}; its versions: " + (
        listed or "none"
    )
