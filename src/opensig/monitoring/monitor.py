"""`opensig monitor`: a current window of the prediction log against a reference window.

Windows belong to one model version (the latest, by default). With ``monitor.window`` a
time span (``7d``, the default) the window slides: the current window is the last span up
to now, the reference the version's first span; with a row count, the current window is
the last ``window`` rows and the reference the first ``monitor.reference_size``; explicit
time ranges replace either. The current window never reaches into the reference. Sliding,
not calendar, windows: a change shows at the next run after it reaches the data, not at the
end of a week; a scheduled monitor then announces an alert once per change of status (the
flow compares with the status its last run recorded), not on every run. Every figure comes
from :mod:`opensig.monitoring.drift`; an alert needs both significance and a minimum effect.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import pandas as pd

from opensig.config import MlflowConfig, MonitorConfig, span
from opensig.io import write_json
from opensig.labels import UNKNOWN_LABEL
from opensig.monitoring.drift import rate_change, score_shift, share_change
from opensig.monitoring.log import between, read_log, utc

log = logging.getLogger(__name__)

OK, ALERT, TOO_FEW_ROWS = "ok", "alert", "too_few_rows"


def select_windows(
    log: pd.DataFrame,
    settings: MonitorConfig,
    since: datetime | None = None,
    until: datetime | None = None,
    reference_since: datetime | None = None,
    reference_until: datetime | None = None,
    now: datetime | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(current, reference) rows of one model version's log, sorted by time (see above;
    ``now``: the end of a sliding span when ``until`` is not given, the clock by default).
    The current window never reaches into the reference rows."""
    width = None if isinstance(settings.window, int) else span(settings.window)
    if reference_since or reference_until:
        reference = between(log, reference_since, reference_until)
    elif width is not None:
        reference = log[log["time"] < log["time"].min() + width]
    else:
        reference = log.head(settings.reference_size)
    current = between(log.drop(reference.index), since, until)
    if since is not None:
        return current, reference
    if width is None:
        return current.tail(settings.window), reference
    end = utc(until) or utc(now) or pd.Timestamp.now(tz="UTC")
    return current[current["time"] > end - width], reference


def too_few_rows(
    rows: pd.DataFrame, counts: tuple[int, int], settings: MonitorConfig, explicit: bool
) -> str:
    """Why a comparison cannot be made, naming the setting that bites and what would work:
    ``counts`` are the predicted rows in (current, reference) of the version's ``rows``."""
    held = len(rows)
    times = rows["time"]
    said = (
        f"{counts[0]} predicted in the current window and {counts[1]} in the reference, "
        f"monitor.min_rows: {settings.min_rows} in each"
    )
    if explicit:
        return f"{said}: widen --since/--until or the reference range"
    if isinstance(settings.window, int):
        fits = max(held // 2, 1)
        return (
            f"{said} (monitor.window: {settings.window} rows after the reference's first "
            f"monitor.reference_size: {settings.reference_size}); this version has logged "
            f"{held} rows: set both to at most {fits}, or wait for more traffic"
        )
    spread = (times.max() - times.min()) if held else pd.Timedelta(0)
    return (
        f"{said} (monitor.window: {settings.window}: the last {settings.window} against the "
        f"version's first); this version has logged {held} rows within {spread}: wait for "
        f"more traffic, or set monitor.window to a row count (e.g. {max(held // 2, 1)}) with "
        "monitor.reference_size as large"
    )


def _span(frame: pd.DataFrame) -> dict:
    times = frame["time"]
    return {
        "from": times.min().isoformat() if len(frame) else None,
        "to": times.max().isoformat() if len(frame) else None,
        "n": len(frame),
    }


def _p(p_value: float) -> str:
    return "p < 1e-6" if p_value < 1e-6 else f"p = {p_value:.2g}"


def _alerts(report: dict, settings: MonitorConfig) -> list[str]:
    """One sentence per change that is both significant and large enough."""
    alerts = []
    unknown = report["unknown_rate"]
    if (
        unknown["p_value"] < settings.alpha
        and abs(unknown["current"] - unknown["reference"]) >= settings.min_unknown_rate_change
    ):
        alerts.append(
            f"unknown rate {unknown['current']:.0%} vs {unknown['reference']:.0%} in the "
            f"reference ({_p(unknown['p_value'])})"
        )
    errors = report["error_rate"]
    if (
        errors["p_value"] < settings.alpha
        and errors["current"] - errors["reference"] >= settings.min_error_rate_change
    ):
        alerts.append(
            f"unreadable inputs {errors['current']:.1%} vs {errors['reference']:.1%} in the "
            f"reference ({_p(errors['p_value'])})"
        )
    shares = report["class_shares"]
    moved = {
        c: s
        for c, s in shares["classes"].items()
        if abs(s["current"] - s["reference"]) >= settings.min_class_share_change
    }
    if shares["p_value"] < settings.alpha and moved:
        listed = ", ".join(
            f"{c} {s['current']:.0%} vs {s['reference']:.0%}" for c, s in moved.items()
        )
        alerts.append(f"class shares changed ({_p(shares['p_value'])}): {listed}")
    shift = report["score_shift"]
    if shift["p_value"] < settings.alpha and shift["psi"] >= settings.min_psi:
        alerts.append(
            f"max-score distribution shifted: KS {shift['ks']:.2f} ({_p(shift['p_value'])}), "
            f"PSI {shift['psi']:.2f}"
        )
    return alerts


def compare(
    current: pd.DataFrame, reference: pd.DataFrame, settings: MonitorConfig, why: str = ""
) -> dict:
    """The report of two windows: the figures of :mod:`drift`, the alerts, the status;
    ``why`` (:func:`too_few_rows`) is what a report without a comparison says."""
    report: dict = {"window": _span(current), "reference": _span(reference)}
    fine = [w[w["error"].fillna("") == ""] for w in (current, reference)]
    if min(len(w) for w in fine) < settings.min_rows:
        report |= {"status": TOO_FEW_ROWS, "alerts": [], "reason": why}
        log.warning("too few rows to compare: %s", why)
        return report
    unknown = [int((w["label"] == UNKNOWN_LABEL).sum()) for w in fine]
    failed = [len(w) - len(f) for w, f in zip((current, reference), fine, strict=True)]
    classes = [c.removeprefix("score_") for c in current.columns if c.startswith("score_")]
    known = [w.loc[w["label"] != UNKNOWN_LABEL, "label"] for w in fine]
    report |= {
        "unknown_rate": rate_change(
            unknown[0], len(fine[0]), unknown[1], len(fine[1]), settings.alpha
        ),
        "error_rate": rate_change(
            failed[0], len(current), failed[1], len(reference), settings.alpha
        ),
        "class_shares": share_change(*known, classes),
        "score_shift": score_shift(
            fine[0]["score"].to_numpy(float), fine[1]["score"].to_numpy(float)
        ),
    }
    report["alerts"] = _alerts(report, settings)
    report["status"] = ALERT if report["alerts"] else OK
    return report


def run_monitor(
    log: pd.DataFrame,
    settings: MonitorConfig,
    model_version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    reference_since: datetime | None = None,
    reference_until: datetime | None = None,
    figures: Path | None = None,
) -> dict:
    """The monitor report of ``log`` (``read_log``'s frame) for ``model_version`` (default:
    the version of the latest row), with its pictures in ``figures`` when given."""
    version = model_version or str(log["model_version"].iloc[-1])
    rows = log[log["model_version"] == version]
    if rows.empty:
        versions = sorted(log["model_version"].dropna().unique())
        raise ValueError(
            f"the prediction log holds no rows of model version {version!r}; "
            f"it holds {versions}: pass one of them (--model-version)"
        )
    other_classes = [c for c in rows.columns if c.startswith("score_") and rows[c].isna().all()]
    rows = rows.drop(columns=other_classes)  # score columns of other versions' classes
    current, reference = select_windows(
        rows, settings, since, until, reference_since, reference_until
    )
    report = {"model": str(rows["model"].iloc[-1]), "model_version": version}
    counts = tuple(int((w["error"].fillna("") == "").sum()) for w in (current, reference))
    explicit = any(t is not None for t in (since, reference_since, reference_until))
    why = too_few_rows(rows, counts, settings, explicit)
    report |= compare(current, reference, settings, why)
    if figures is not None:
        from opensig.monitoring.plots import write_monitor_pictures  # matplotlib: only here

        write_monitor_pictures(rows, current, reference, report, settings.alpha, figures)
    return report


def monitor_log(
    log_dir: str,
    settings: MonitorConfig,
    store: MlflowConfig,
    out: Path,
    *,
    model_version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    reference_since: datetime | None = None,
    reference_until: datetime | None = None,
) -> dict:
    """What `opensig monitor` and the monitor flow do: the report of the prediction log at
    ``log_dir`` (:func:`run_monitor`), written to ``out`` with its pictures in the folder
    beside it (``out``'s stem), and its figures logged to the opensig-monitor MLflow run."""
    from opensig.tracking.store import http_limits, tracking_uri

    figures = out.parent / out.stem
    report = run_monitor(
        read_log(log_dir, until=until, model_version=model_version),
        settings,
        model_version,
        since,
        until,
        reference_since,
        reference_until,
        figures=figures,
    )
    with http_limits(store):
        _, report["previous_status"] = log_to_mlflow(report, tracking_uri(store), figures)
    write_json(out, report)
    return report


MONITOR_EXPERIMENT = "opensig-monitor"
VERSION_TAG = "opensig.monitored_version"


def log_to_mlflow(
    report: dict, tracking_uri: str, pictures: Path | None = None
) -> tuple[str, str | None]:
    """The window's figures as metrics of one run per model version in the experiment
    ``opensig-monitor`` (step = the monitor's run number for that version, timestamp = the
    window's end), so that successive monitors draw the unknown rate over time. Returns the
    run id and the status the previous monitor of the version recorded (None: the first)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(MONITOR_EXPERIMENT)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(MONITOR_EXPERIMENT)
    )
    identity = f"{report['model']}:{report['model_version']}"
    runs = client.search_runs(
        [experiment_id], f"tags.`{VERSION_TAG}` = '{identity}'", max_results=1
    )
    previous = runs[0].data.tags.get("status") if runs else None
    run_id = (
        runs[0].info.run_id
        if runs
        else client.create_run(
            experiment_id,
            tags={VERSION_TAG: identity},
            run_name=f"monitor {report['model']} v{report['model_version'][:12]}",
        ).info.run_id
    )
    end = pd.Timestamp(report["window"]["to"] or pd.Timestamp.now(tz="UTC"))
    step = len(client.get_metric_history(run_id, "window_rows")) + 1  # the n-th monitor
    stamp = int(end.timestamp() * 1000)
    values = {"window_rows": report["window"]["n"], "reference_rows": report["reference"]["n"]}
    values["alerts"] = len(report["alerts"])
    for key in ("unknown_rate", "error_rate"):
        if key in report:
            values[key] = report[key]["current"]
            values[f"{key}_reference"] = report[key]["reference"]
            values[f"{key}_p_value"] = report[key]["p_value"]
    if "score_shift" in report:
        values |= {f"score_{k}": v for k, v in report["score_shift"].items()}
        values["class_shares_p_value"] = report["class_shares"]["p_value"]
        values |= {f"share_{c}": s["current"] for c, s in report["class_shares"]["classes"].items()}
    client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in values.items()])
    client.set_tag(run_id, "status", report["status"])
    if pictures is not None and pictures.is_dir():
        client.log_artifacts(run_id, str(pictures), "monitor")
    log.info("monitor figures logged to MLflow run %s (%s)", run_id, MONITOR_EXPERIMENT)
    return run_id, previous
