"""The monitor as a Prefect flow (`opensig-monitor`, on `monitor.cron`): what the deployed
model sees, compared with its reference, and on an alert a review batch and an event.

1. monitor: `opensig monitor`'s work on the project's prediction log (`monitor.log_dir`):
   reports/monitor.json, its pictures, the opensig-monitor MLflow run (in the project's store:
   a relative SQLite path of params read from the project, wherever the flow runs);
2. report: the status and alerts as a Markdown artifact (`opensig-monitor`, Prefect UI);
3. on a new `alert` (the previous run of the version recorded another status: one per
   change of status, so an hourly run over a 7-day window does not repeat it every hour):
   a review batch (`review export` into `monitor.review_dir`; none for a multi-label log,
   which review cannot take yet) and the event `opensig.monitor.alert` (status, alerts,
   the batch), which automations can act on.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from opensig.config import Config, MlflowConfig, load_config
from opensig.events import MONITOR_ALERT, emit, project_resource
from opensig.monitoring.monitor import ALERT, monitor_log
from opensig.prefect_env import configure
from opensig.tracking.store import project_store

configure()

FLOW_NAME = "opensig-monitor"
ARTIFACT_KEY = "opensig-monitor"


def under(root: Path, path: str | Path) -> str:
    """A params path as the flow reads it: relative to the project (URLs as they are)."""
    return str(path) if "://" in str(path) or Path(path).is_absolute() else str(root / path)


def log_dir(cfg: Config, root: Path) -> str:
    if cfg.monitor.log_dir is None:
        raise ValueError(f"{root / 'params.yaml'}: monitor.log_dir is null: set the log folder")
    return under(root, cfg.monitor.log_dir)


@task(name="monitor")
def monitor_task(cfg: Config, root: Path, store: MlflowConfig) -> dict:
    """The monitor report of the latest model version; reports/monitor.json and pictures."""
    return monitor_log(log_dir(cfg, root), cfg.monitor, store, root / "reports/monitor.json")


@task(name="export review batch")
def export_review(cfg: Config, root: Path, model_version: str) -> Path | None:
    """The review batch of the alert; none for a multi-label log, which review cannot take
    yet: the alert still goes out, without a batch."""
    from opensig.data.scan import scan_cache
    from opensig.review import MultiLabelLog, export_from_log

    try:
        return export_from_log(
            log_dir(cfg, root),
            Path(under(root, cfg.monitor.review_dir)),
            Path(under(root, cfg.data.root)),
            cfg.monitor.review_max,
            model_version=model_version,
            cache=scan_cache(Path(under(root, cfg.data.cache_dir))),
        )
    except MultiLabelLog as err:
        get_run_logger().warning("no review batch: %s", err)
        return None


def summary_line(report: dict) -> str:
    """The run in one line: version, status, unknown rate now vs reference, the alerts."""
    line = f"{report['model']} version {report['model_version']}: {report['status']}"
    if rate := report.get("unknown_rate"):
        line += f"; unknown rate {rate['current']:.1%} (reference {rate['reference']:.1%})"
    if report.get("reason"):
        line += f"; {report['reason']}"
    return line + (f"; alerts: {'; '.join(report['alerts'])}" if report["alerts"] else "")


def summary_markdown(report: dict, batch: Path | None) -> str:
    """The report's headline figures, as the Prefect UI shows the artifact."""
    lines = [f"# {report['model']} version {report['model_version']}: {report['status']}", ""]
    if "window" in report and "reference" in report:
        lines += ["| window | from | to | rows |", "| --- | --- | --- | --- |"]
        for name in ("reference", "window"):
            w = report[name]
            lines.append(f"| {name} | {w.get('from')} | {w.get('to')} | {w.get('n')} |")
        lines.append("")
    rate = report.get("unknown_rate")
    if rate:
        lines += [
            f"Unknown rate: {rate['current']:.1%} (reference {rate['reference']:.1%}, "
            f"p = {rate['p_value']:.2g}).",
            "",
        ]
    lines += [f"- {alert}" for alert in report.get("alerts", [])] or ["No alert."]
    if batch is not None:
        lines += ["", f"Review batch: `{batch}` (sort it, then `opensig review import {batch}`)."]
    return "\n".join(lines)


@flow(name=FLOW_NAME)
def monitor(project: str = ".", tracking_uri: str | None = None) -> dict:
    """Monitor the project's prediction log; on an alert, a review batch and an event.
    ``tracking_uri`` overrides mlflow.tracking_uri, as the commands' --tracking-uri does."""
    logger = get_run_logger()
    root = Path(project).resolve()
    cfg = load_config(root / "params.yaml")
    report = monitor_task(cfg, root, project_store(cfg.mlflow, root, tracking_uri))
    logger.info("%s", summary_line(report))
    batch = None
    announce = report["status"] == ALERT and report.get("previous_status") != ALERT
    if report["status"] == ALERT and not announce:
        logger.info("the alert of the previous run persists: no new review batch or event")
    if announce:
        batch = export_review(cfg, root, report["model_version"])
        payload = {
            "model": report["model"],
            "model_version": report["model_version"],
            "alerts": report["alerts"],
            "batch": batch and str(batch),
        }
        if not emit(MONITOR_ALERT, payload, project_resource(root)):
            logger.info("no Prefect API (PREFECT_API_URL unset): %s not sent", MONITOR_ALERT)
    create_markdown_artifact(
        summary_markdown(report, batch),
        key=ARTIFACT_KEY,
        description=f"{report['model']} version {report['model_version']}: {report['status']}",
    )
    for alert in report["alerts"]:
        logger.warning("monitor alert: %s", alert)
    return {
        "status": report["status"],
        "alerts": report["alerts"],
        "announced": announce,
        "batch": batch and str(batch),
    }


def serve(project: str, cron: str, timezone: str, tracking_uri: str | None = None) -> None:
    """Serve the flow on monitor.cron (needs a Prefect server, as the retrain flow does)."""
    from prefect.schedules import Cron

    monitor.serve(
        name="local-schedule",  # shows as opensig-monitor/local-schedule
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"project": str(Path(project).resolve()), "tracking_uri": tracking_uri},
        limit=1,
    )
