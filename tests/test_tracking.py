"""The pure parts of the MLflow wing: promotion rule, metric lookup, tracking URI precedence,
HTTP limits, the models:/ parser, bundle digest and redaction; and the pinned requirements,
down to a registered model's requirements.txt in a real SQLite store."""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

import mlflow
import pytest

from opensig.config import MlflowConfig, load_config
from opensig.decision import THRESHOLDS_FILE
from opensig.redaction import redact, uri_credentials
from opensig.tracking.model_uri import RegisteredModelUri
from opensig.tracking.packaging import MODEL_PACKAGES, bundle_digest, model_requirements
from opensig.tracking.promotion import (
    check_guards,
    class_sets,
    compare,
    guard_text,
    metric_value,
    noise_allowance,
)
from opensig.tracking.runs import flatten, mlflow_metric_name, run_name, split_counts
from opensig.tracking.store import (
    DEFAULT_TRACKING_URI,
    global_store,
    http_limits,
    project_store,
    tracking_uri,
)
from tests.conftest import register_bundle, write_params


@pytest.mark.parametrize(
    ("metric", "challenger", "champion", "delta", "promoted", "gain"),
    [
        ("macro_f1", 0.90, 0.85, 0.0, True, 0.05),
        ("macro_f1", 0.90, 0.85, 0.05, False, 0.05),  # must beat by MORE than min_delta
        ("macro_f1", 0.85, 0.85, 0.0, False, 0.0),  # a tie keeps the champion
        ("fpr95", 0.10, 0.20, 0.05, True, 0.10),  # lower is better
        ("novel.fpr95", 0.30, 0.20, 0.0, False, -0.10),
        ("novel.auroc", 0.95, 0.90, 0.01, True, 0.05),
    ],
)
def test_compare(
    metric: str, challenger: float, champion: float, delta: float, promoted: bool, gain: float
) -> None:
    got_promoted, got_gain, reason = compare(metric, challenger, champion, delta)
    assert got_promoted is promoted
    assert got_gain == pytest.approx(gain)
    assert str(delta) in reason


def test_compare_with_undefined_metric_keeps_the_champion() -> None:
    promoted, gain, reason = compare("unknown_recall", None, 0.5, 0.0)
    assert (promoted, gain) == (False, None)
    assert "undefined" in reason


@pytest.mark.parametrize(("hits", "count"), [(90, 100), (175, 175), (202, 354), (0, 20)])
def test_noise_allowance_is_the_distance_to_the_lower_wilson_bound(hits: int, count: int) -> None:
    from scipy.stats import binomtest

    value = hits / count
    allowed = noise_allowance(value, count)
    # scipy's Wilson interval (without continuity correction) for the same rate
    low = binomtest(hits, count).proportion_ci(method="wilson").low
    assert allowed == pytest.approx(value - low, abs=1e-9)
    assert (allowed > 0) == (value > 0)  # a champion at 1.0 still allows chance


def test_guards_block_a_drop_beyond_the_allowance_and_skip_what_is_undefined() -> None:
    champion = {"known_accuracy": 1.0, "n_known": 175, "novel": {"unknown_recall": 0.9}}
    champion["novel"]["n_novel"] = 354
    challenger = {"known_accuracy": 0.994, "n_known": 175, "novel": {"unknown_recall": 0.57}}
    guards = ["known_accuracy", "novel.unknown_recall", "unknown_recall"]
    rows = {r["metric"]: r for r in check_guards(guards, challenger, champion, None)}
    assert rows["known_accuracy"]["status"] == "ok"  # one image in 175: chance
    assert rows["novel.unknown_recall"]["status"] == "blocks"
    assert rows["novel.unknown_recall"]["drop"] == pytest.approx(0.33)
    assert rows["unknown_recall"]["status"] == "skipped"  # not in these metrics
    assert "skipped" in guard_text(rows["unknown_recall"])
    fixed = {r["metric"]: r for r in check_guards(guards, challenger, champion, 0.5)}
    assert fixed["novel.unknown_recall"]["status"] == "ok" and fixed["novel.unknown_recall"][
        "allowed"
    ] == pytest.approx(0.5)


def test_flatten_and_nested_metric_lookup() -> None:
    metrics = {"auroc": 0.9, "novel": {"auroc": 0.8, "n_novel": 3}}
    assert flatten(metrics) == {"auroc": 0.9, "novel.auroc": 0.8, "novel.n_novel": 3}
    assert metric_value(metrics, "novel.auroc") == 0.8
    assert metric_value(metrics, "novel.fpr95") is None


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    # relative SQLite paths are made absolute (MLflow caches one store per URI string)
    assert tracking_uri(MlflowConfig()) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri(MlflowConfig()) == "http://mlflow.example:5000"
    assert tracking_uri(MlflowConfig(tracking_uri="sqlite:///x.db")) == (
        f"sqlite:///{tmp_path.resolve() / 'x.db'}"
    )
    assert tracking_uri(MlflowConfig(tracking_uri="sqlite:////srv/m.db")) == "sqlite:////srv/m.db"


def test_a_flows_store_is_read_from_its_project(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """params' (or the default) relative SQLite path against the project, not the folder the
    flow runs in; $MLFLOW_TRACKING_URI as every command reads it; an override wins."""
    project, here = tmp_path / "project", tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def uri(cfg: MlflowConfig, override: str | None = None) -> str:
        return tracking_uri(project_store(cfg, project, override))

    assert uri(MlflowConfig()) == f"sqlite:///{project / 'mlflow.db'}"
    assert uri(MlflowConfig(tracking_uri="sqlite:///db/m.db")) == f"sqlite:///{project}/db/m.db"
    assert uri(MlflowConfig(tracking_uri="http://h:5000"), "sqlite:///o.db") == (
        f"sqlite:///{project / 'o.db'}"
    )
    assert project_store(MlflowConfig(retries=1), project).retries == 1
    with pytest.raises(ValueError, match="holds a password"):
        project_store(MlflowConfig(), project, "http://u:secret@h:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert uri(MlflowConfig()) == f"sqlite:///{here / 'env.db'}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://user:pw@host:5000/x", "http://***@host:5000/x"),
        ("request to https://tok@host/api failed", "request to https://***@host/api failed"),
        ("https://host/x?token=abc&exp=1", "https://host/x?token=***&exp=1"),
        (
            "https://host/?X-Amz-Signature=abc&region=eu",
            "https://host/?X-Amz-Signature=***&region=eu",
        ),
        ("postgresql://mlflow:pw@db/mlflow", "postgresql://***@db/mlflow"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_redact_masks_credentials_in_uris(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_masks_secret_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-s3cret")
    assert redact("header Bearer tok-s3cret rejected") == "header Bearer *** rejected"


def test_uri_credentials() -> None:
    assert "a password" in (uri_credentials("http://user:pw@host") or "")
    assert "api_key" in (uri_credentials("https://host/?api_key=1") or "")
    assert uri_credentials("https://host/?page=1") is None  # not every parameter is a secret
    assert uri_credentials("http://user@host:5000") is None  # a name is not a secret
    assert uri_credentials("databricks://profile") is None


def test_http_limits_apply_params_and_yield_to_user_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAX_RETRIES", "TIMEOUT", "BACKOFF_FACTOR"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with http_limits(MlflowConfig(retries=2, timeout=9)):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # the user's setting wins
        assert "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" in os.environ
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # restored afterwards
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_http_limits_silence_run_links_for_uris_with_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:pw@host:5000")
    with http_limits(MlflowConfig()):
        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://host:5000")
    with http_limits(MlflowConfig()):
        assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ


def test_bundle_digest_follows_content(tmp_path: Path) -> None:
    model, thresholds = tmp_path / "model", tmp_path / "thresholds.json"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    thresholds.write_text('{"t": 0.5}')
    first = bundle_digest(model, thresholds)
    assert bundle_digest(model, thresholds) == first
    thresholds.write_text('{"t": 0.6}')
    assert bundle_digest(model, thresholds) != first


def test_class_sets_say_how_the_champion_differs() -> None:
    assert class_sets(["a", "b"], ["a", "b"]) == {
        "class_sets": "same",
        "champion_lacks": [],
        "champion_extra": [],
    }
    assert class_sets(["circle", "square"], ["0", "1", "square"]) == {
        "class_sets": "differ",
        "champion_lacks": ["circle"],
        "champion_extra": ["0", "1"],
    }


def test_metrics_are_named_by_group_and_counts_become_tags() -> None:
    metrics = {
        "macro_f1": 0.8,
        "auroc": 0.9,
        "fpr95": None,  # undefined on this test split: not logged
        "n_known": 175,
        "novel": {"auroc": 0.85, "n_novel": 354},
    }
    logged, counts = split_counts(metrics)
    assert logged == {"macro_f1": 0.8, "openset/auroc": 0.9, "novel/auroc": 0.85}
    assert counts == {"n_known": "175", "novel.n_novel": "354"}
    # promote.metric names a metrics.json key; the run carries it under its MLflow name
    assert mlflow_metric_name("novel.auroc") == "novel/auroc"
    assert mlflow_metric_name("fpr95") == "openset/fpr95"
    assert mlflow_metric_name("macro_f1") == "macro_f1"


def test_run_names_are_readable_and_follow_params_data_and_dvc_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    name = run_name(load_config(write_params(tmp_path)))
    digest, method, backbone, size = name.split(" ")
    assert (method, backbone, size, len(digest)) == ("sigmoid_bce", "resnet10t", "16px", 7)
    assert run_name(load_config(write_params(tmp_path))) == name  # same params and data
    assert run_name(load_config(write_params(tmp_path, {"train": {"epochs": 4}}))) != name
    assert run_name(load_config(write_params(tmp_path, {"tune": {"strategy": "doc"}}))) != name
    assert run_name(load_config(write_params(tmp_path, {"mlflow": {"retries": 1}}))) == name
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: data\n")
    assert run_name(load_config(write_params(tmp_path))) != name  # other data
    monkeypatch.setenv("DVC_EXP_NAME", "gusty-reef")
    assert run_name(load_config(write_params(tmp_path))).startswith("gusty-reef ")


def test_a_run_names_its_data_version_as_a_dataset_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from opensig.tracking.runs import RunSpec, logged_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = RunSpec("datasets", "a run", {})
    with logged_run(uri, spec, {"macro_f1": 0.5}, []) as run:
        pass
    (given,) = MlflowClient(uri).get_run(run.info.run_id).inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest) == (
        "data",
        "0123456789abcdef0123456789abcdef",
    )
    assert json.loads(given.dataset.source) == {"uri": (tmp_path / "data").as_posix()}
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "evaluation")]


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("models:/opensig@champion", RegisteredModelUri("opensig", alias="champion")),
        ("models:/opensig/3", RegisteredModelUri("opensig", version="3")),
        ("models:/opensig/Production", RegisteredModelUri("opensig", stage="Production")),
        ("models:/a-b", RegisteredModelUri("a-b")),
        ("runs:/0123/model", None),
        ("artifacts/model", None),
    ],
)
def test_the_models_uri_parser(uri: str, parsed: RegisteredModelUri | None) -> None:
    assert RegisteredModelUri.parse(uri) == parsed


def test_model_requirements_pin_the_installed_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    pins = dict(line.split("==") for line in model_requirements())
    assert list(pins) == list(MODEL_PACKAGES)
    assert pins == {name: version(name).partition("+")[0] for name in MODEL_PACKAGES}
    # a local build label (PyTorch's own index) is left out: pip finds the version on PyPI
    monkeypatch.setattr("opensig.tracking.packaging.version", lambda name: "2.14.1+cu130")
    assert model_requirements()[0] == "torch==2.14.1"


def test_a_registered_model_requires_the_pinned_versions(
    untrained_bundle: Path, tmp_path: Path
) -> None:
    uri = register_bundle(untrained_bundle, untrained_bundle / THRESHOLDS_FILE, tmp_path, "pins")
    with global_store(uri):  # models:/ resolves in the global store's registry
        listed = mlflow.artifacts.download_artifacts(
            "models:/pins/1/requirements.txt", dst_path=str(tmp_path / "got")
        )
    lines = Path(listed).read_text().split()
    assert lines == [f"mlflow=={version('mlflow')}", *model_requirements()]
