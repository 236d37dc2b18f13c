"""Tests for params.yaml loading and validation (opensig.config)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from opensig.config import Config, ConfigError, load_config, parse_config

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> tuple[str, Path]:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value), path


def test_repo_params_load() -> None:
    cfg = load_config(REPO_PARAMS)
    assert isinstance(cfg, Config)
    assert cfg.train.method == "sigmoid_bce"
    assert cfg.data.holdout_unknown == ["8", "9"]
    assert cfg.model.pretrained_file is None
    assert cfg.data.val_fraction + cfg.data.test_fraction < 1.0


def test_unknown_top_level_section(tmp_path: Path) -> None:
    msg, path = _error(tmp_path, "trian:\n  epochs: 3\n")
    assert "trian" in msg
    assert "unknown key" in msg
    assert str(path) in msg


def test_unknown_nested_key(tmp_path: Path) -> None:
    msg, path = _error(tmp_path, "train:\n  epoch: 3\n")
    assert "train.epoch" in msg
    assert "unknown key" in msg
    assert str(path) in msg


def test_unknown_deeply_nested_key(tmp_path: Path) -> None:
    msg, _ = _error(tmp_path, "train:\n  augment:\n    rotat: 5\n")
    assert "train.augment.rotat" in msg


def test_wrong_type_names_key(tmp_path: Path) -> None:
    msg, path = _error(tmp_path, "train:\n  lr: fast\n")
    assert "train.lr" in msg
    assert "fast" in msg
    assert str(path) in msg


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train:\n  epochs: 0\n", "train.epochs"),
        ("train:\n  lr: -0.1\n", "train.lr"),
        ("train:\n  label_smoothing: 0.5\n", "train.label_smoothing"),
        ("train:\n  device: tpu\n", "train.device"),
        ("model:\n  in_chans: 2\n", "model.in_chans"),
        ("data:\n  val_fraction: 1.0\n", "data.val_fraction"),
        ("tune:\n  strategy: best\n", "tune.strategy"),
        ("tune:\n  feature_weight: 1.5\n", "tune.feature_weight"),
        ("retrain:\n  timezone: Mars/Olympus\n", "retrain.timezone"),
        ("retrain:\n  cron: '0 3 * *'\n", "retrain.cron"),
        ("retrain:\n  push: maybe\n", "retrain.push"),
        ("monitor:\n  cron: '0 3 * *'\n", "monitor.cron"),
        ("monitor:\n  window: 0\n", "monitor.window"),
        ("monitor:\n  window: 7 days\n", "monitor.window"),
        ("monitor:\n  window: 0d\n", "monitor.window"),
        ("monitor:\n  alpha: 1.5\n", "monitor.alpha"),
        ("monitor:\n  min_unknown_rate_change: -0.1\n", "monitor.min_unknown_rate_change"),
    ],
)
def test_out_of_range_names_key(tmp_path: Path, text: str, key: str) -> None:
    msg, _ = _error(tmp_path, text)
    assert key in msg


def test_fractions_must_leave_a_train_split(tmp_path: Path) -> None:
    msg, path = _error(tmp_path, "data:\n  val_fraction: 0.6\n  test_fraction: 0.5\n")
    assert "data.test_fraction" in msg
    assert "data.val_fraction" in msg
    assert str(path) in msg


def test_fractions_checked_with_default_test_fraction() -> None:
    with pytest.raises(ConfigError):
        parse_config({"data": {"val_fraction": 0.9}})


def test_several_errors_all_reported(tmp_path: Path) -> None:
    msg, _ = _error(tmp_path, "train:\n  epoch: 3\n  lr: fast\n")
    assert "2 invalid setting(s)" in msg
    assert "train.epoch" in msg
    assert "train.lr" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- data\n- model\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    msg, path = _error(tmp_path, text)
    assert "mapping" in msg
    assert str(path) in msg


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("train: [unclosed\n", "line 2, column 1", "flow sequence opened at line 1"),
        ("train:\n  epochs: 3\n   lr: 0.1\n", "line 3, column 6", "mapping values are not allowed"),
        ("data:\n\troot: data\n", "line 2, column 1", "'\\t' that cannot start any token"),
    ],
)
def test_invalid_yaml_names_file_and_line_in_one_line(
    tmp_path: Path, text: str, where: str, problem: str
) -> None:
    msg, path = _error(tmp_path, text)
    assert msg.startswith(f"{path}, {where}: not valid YAML: ")
    assert problem in msg
    assert "\n" not in msg and "<unicode string>" not in msg


def test_yaml_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(b"data:\n  root: caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_defaults_fill_missing_sections(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "train:\n  epochs: 2\n"))
    assert cfg.train.epochs == 2
    assert cfg.train.lr == Config().train.lr
    assert cfg.data == Config().data
    assert cfg.model == Config().model
    assert cfg.tune.strategy == "f1"
    assert cfg.train.augment.scale_min == 0.8


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == Config()


def test_parse_config_names_source() -> None:
    with pytest.raises(ConfigError, match=r"custom\.yaml") as info:
        parse_config({"model": {"backbon": "x"}}, Path("custom.yaml"))
    assert "model.backbon" in str(info.value)


def test_config_is_frozen() -> None:
    cfg = Config()
    epochs = cfg.train.epochs
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.epochs = epochs + 1  # type: ignore[misc]
    assert cfg.train.epochs == epochs


def test_mlflow_http_limits_default_and_bounds(tmp_path: Path) -> None:
    cfg = load_config(REPO_PARAMS)
    assert (cfg.mlflow.retries, cfg.mlflow.timeout) == (3, 30)
    msg, _ = _error(tmp_path, "mlflow:\n  retries: 11\n")
    assert "mlflow.retries" in msg
    msg, _ = _error(tmp_path, "mlflow:\n  timeout: 0\n")
    assert "mlflow.timeout" in msg


@pytest.mark.parametrize(
    ("uri", "secret"),
    [
        ("http://alice:s3cretPW@mlflow.example:5000", "s3cretPW"),
        ("https://mlflow.example/?token=tok-s3cret", "tok-s3cret"),
        ("postgresql://mlflow:s3cretPW@db/mlflow", "s3cretPW"),
    ],
)
def test_tracking_uri_with_credentials_is_rejected_without_echoing_them(
    tmp_path: Path, uri: str, secret: str
) -> None:
    msg, path = _error(tmp_path, f"mlflow:\n  tracking_uri: '{uri}'\n")
    assert "mlflow.tracking_uri" in msg and str(path) in msg
    assert "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD" in msg
    assert "MLFLOW_TRACKING_TOKEN" in msg
    assert secret not in msg


def test_tracking_uri_without_credentials_loads() -> None:
    raw = {"mlflow": {"tracking_uri": "http://alice@mlflow.example:5000"}}
    assert parse_config(raw).mlflow.tracking_uri == "http://alice@mlflow.example:5000"
