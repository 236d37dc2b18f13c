"""The pure parts of the registry: promotion rule, metric lookup, tracking URI precedence."""

from __future__ import annotations

import pytest

from opensig.config import MlflowConfig
from opensig.registry import DEFAULT_TRACKING_URI, compare, flatten, metric_value, tracking_uri


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


def test_flatten_and_nested_metric_lookup() -> None:
    metrics = {"auroc": 0.9, "novel": {"auroc": 0.8, "n_novel": 3}}
    assert flatten(metrics) == {"auroc": 0.9, "novel.auroc": 0.8, "novel.n_novel": 3}
    assert metric_value(metrics, "novel.auroc") == 0.8
    assert metric_value(metrics, "novel.fpr95") is None


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(MlflowConfig()) == DEFAULT_TRACKING_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri(MlflowConfig()) == "http://mlflow.example:5000"
    assert tracking_uri(MlflowConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"
