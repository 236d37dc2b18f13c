"""The monitor's statistics against scipy on hand-made windows, and its alert rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from opensig.config import MonitorConfig
from opensig.monitoring.drift import psi, rate_change, score_shift, share_change
from opensig.monitoring.monitor import run_monitor

SETTINGS = MonitorConfig(window=1000, reference_size=1000, min_rows=100)


def test_rate_change_is_the_two_proportion_z_test() -> None:
    result = rate_change(90, 1000, 60, 1000, alpha=0.05)
    pooled = 150 / 2000
    z = (0.09 - 0.06) / np.sqrt(pooled * (1 - pooled) * (2 / 1000))
    assert result["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)))
    assert result["ci_low"] < 0.09 < result["ci_high"]
    ci = stats.binomtest(90, 1000).proportion_ci(0.95, method="wilson")
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert rate_change(0, 100, 0, 100, 0.05)["p_value"] == 1.0


def test_share_change_is_scipy_chi_square() -> None:
    current = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    reference = ["a"] * 40 + ["b"] * 40 + ["c"] * 20
    result = share_change(current, reference, ["a", "b", "c", "d"])
    expected = stats.chi2_contingency([[50, 30, 20], [40, 40, 20]], correction=False).pvalue
    assert result["p_value"] == pytest.approx(expected)
    assert result["classes"]["a"] == {"current": 0.5, "reference": 0.4}
    assert result["classes"]["d"] == {"current": 0.0, "reference": 0.0}


def test_score_shift_is_scipy_ks_plus_psi() -> None:
    rng = np.random.default_rng(0)
    reference, current = rng.beta(5, 1, 2000), rng.beta(2, 2, 2000)
    result = score_shift(current, reference)
    expected = stats.ks_2samp(current, reference)
    assert (result["ks"], result["p_value"]) == pytest.approx((expected.statistic, expected.pvalue))
    assert result["psi"] > 0.5
    assert psi(reference, reference) == pytest.approx(0.0)
    # deciles of the reference hold a tenth each; a window all in the top decile:
    top = np.full(100, reference.max())
    assert psi(top, reference) == pytest.approx(
        9 * (1e-4 - 0.1) * np.log(1e-4 / 0.1) + 0.9 * np.log(10), rel=1e-3
    )


def _log(windows: list[tuple[int, float]], seed: int = 0) -> pd.DataFrame:
    """A prediction log: for each (rows, unknown rate) window, rows a day apart from the last
    window's; labels a/b evenly among the known, top scores alike in every window."""
    rng = np.random.default_rng(seed)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    parts = []
    for day, (n, rate) in enumerate(windows):
        unknown = np.zeros(n, dtype=bool)
        unknown[: round(n * rate)] = True
        rng.shuffle(unknown)
        labels = np.where(unknown, "unknown", rng.choice(["a", "b"], n))
        parts.append(
            pd.DataFrame(
                {
                    "time": pd.Timestamp(start + timedelta(days=day)),
                    "model": "m",
                    "model_version": "1",
                    "path": [f"d{day}/{i}.png" for i in range(n)],
                    "sha256": None,
                    "label": labels,
                    "score": rng.uniform(0.3, 1.0, n),
                    "score_a": 0.5,
                    "score_b": 0.5,
                    "error": "",
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def test_no_alert_on_identical_distributions() -> None:
    report = run_monitor(_log([(1000, 0.1), (1000, 0.1)]), SETTINGS)
    assert report["status"] == "ok"
    assert report["alerts"] == []
    assert report["unknown_rate"]["p_value"] == pytest.approx(1.0)


def test_alert_on_a_ten_point_unknown_jump_at_1000(tmp_path: Path) -> None:
    report = run_monitor(_log([(1000, 0.09), (1000, 0.19)]), SETTINGS, figures=tmp_path)
    assert report["status"] == "alert"
    assert report["alerts"][0].startswith("unknown rate 19% vs 9% in the reference (p ")
    assert report["unknown_rate"]["p_value"] < 1e-6
    assert report["window"]["n"] == report["reference"]["n"] == 1000
    assert report["window"]["from"] > report["reference"]["to"]
    assert {p.name for p in tmp_path.iterdir()} == {
        "unknown_rate.png",
        "class_shares.png",
        "max_score.png",
    }


def test_no_alert_on_a_tiny_significant_wiggle_at_10000() -> None:
    settings = SETTINGS.model_copy(update={"window": 10000, "reference_size": 10000})
    report = run_monitor(_log([(10000, 0.100), (10000, 0.103)]), settings)
    assert report["status"] == "ok"
    huge = settings.model_copy(update={"window": 200000, "reference_size": 200000})
    report = run_monitor(_log([(200000, 0.100), (200000, 0.103)]), huge)
    assert report["unknown_rate"]["p_value"] < huge.alpha  # significant, yet too small
    assert report["status"] == "ok"


def test_too_few_rows_is_a_status_that_names_the_setting_and_what_would_work() -> None:
    report = run_monitor(_log([(1000, 0.1), (50, 0.5)]), SETTINGS)
    assert report["status"] == "too_few_rows"
    assert report["window"]["n"] == 50
    assert report["alerts"] == []
    assert "50 predicted in the current window and 1000 in the reference" in report["reason"]
    assert "monitor.window: 1000 rows" in report["reason"]
    assert "logged 1050 rows: set both to at most 525" in report["reason"]
    # a week's span over traffic of one afternoon: everything is the reference
    weekly = SETTINGS.model_copy(update={"window": "7d"})
    report = run_monitor(_log([(1000, 0.1)]), weekly, until=datetime(2026, 1, 2, tzinfo=UTC))
    assert (report["status"], report["reference"]["n"], report["window"]["n"]) == (
        "too_few_rows",
        1000,
        0,
    )
    assert "(monitor.window: 7d: the last 7d against the version's first)" in report["reason"]
    assert "set monitor.window to a row count (e.g. 500)" in report["reason"]


def test_a_time_span_slides_the_window_over_the_latest_days() -> None:
    """monitor.window: 3d: the reference is the version's first 3 days, the current window
    the 3 days up to now (here `until`), whatever the rows per day."""
    log = _log([(500, 0.1)] * 4 + [(300, 0.4)] * 3)
    day = datetime(2026, 1, 1, tzinfo=UTC)
    settings = SETTINGS.model_copy(update={"window": "3d"})
    report = run_monitor(log, settings, until=day + timedelta(days=6))
    assert report["reference"]["n"] == 1500 and report["window"]["n"] == 900
    assert report["reference"]["to"] == (day + timedelta(days=2)).isoformat()
    assert report["window"]["from"] == (day + timedelta(days=4)).isoformat()
    assert report["status"] == "alert"
    # a day later the window has moved on: days 5 to 7, 600 rows
    later = run_monitor(log, settings, until=day + timedelta(days=7))
    assert later["window"]["n"] == 600


def test_windows_by_time_and_another_version() -> None:
    log = _log([(500, 0.1), (500, 0.1), (500, 0.4)])
    day = datetime(2026, 1, 1, tzinfo=timezone.utc)
    report = run_monitor(
        log,
        SETTINGS,
        since=day + timedelta(days=2),
        reference_until=day + timedelta(hours=30),
    )
    assert report["reference"]["n"] == 1000 and report["window"]["n"] == 500
    assert report["status"] == "alert"
    with pytest.raises(ValueError, match=r"version '9'.*\['1'\]"):
        run_monitor(log, SETTINGS, model_version="9")


@pytest.mark.parametrize(
    ("spread", "width", "name"),
    [
        (pd.Timedelta(hours=2), pd.Timedelta(minutes=10), "10 minutes"),
        (pd.Timedelta(days=1), pd.Timedelta(hours=1), "hour"),
        (pd.Timedelta(days=30), pd.Timedelta(days=1), "day"),
        (pd.Timedelta(days=400), pd.Timedelta(days=7), "week"),
    ],
)
def test_the_unknown_rate_is_drawn_per_bin_that_fits_the_logs_spread(
    spread: pd.Timedelta, width: pd.Timedelta, name: str
) -> None:
    from opensig.monitoring.plots import time_bin

    assert time_bin(spread) == (width, name)
