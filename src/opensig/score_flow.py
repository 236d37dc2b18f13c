"""Batch scoring as a Prefect flow (`opensig-batch-score`, on `score.cron` or on demand): the
champion labels a folder or URL on Spark, the rows go to the prediction log, then the
monitor runs on it, so review and alerts cover batch jobs as they cover served traffic.

1. score: `opensig predict --engine spark` on `score.inputs` with `score.model` (default: the
   champion), rows written as a Parquet folder below `score.out` (one per run, named by its
   UTC time) and appended to `monitor.log_dir`;
2. monitor: `opensig monitor` on that log (reports/monitor.json, the opensig-monitor run);
3. report: rows, unknown and unreadable counts and the monitor's status as a Markdown
   artifact (`opensig-batch-score`, Prefect UI).
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from opensig.config import Config, MlflowConfig, load_config
from opensig.monitor_flow import log_dir, monitor_task, under
from opensig.prefect_env import configure
from opensig.tracking.store import project_store

configure()

FLOW_NAME = "opensig-batch-score"
ARTIFACT_KEY = "opensig-batch-score"


def champion(cfg: Config) -> str:
    return cfg.score.model or f"models:/{cfg.mlflow.registered_model}@champion"


@task(name="score on Spark")
def score_task(cfg: Config, root: Path, inputs: list[str], store: MlflowConfig) -> dict:
    """The rows of ``inputs`` in a new Parquet folder below score.out, and in the log."""
    from opensig.spark import predict_spark

    if not inputs:
        raise ValueError(
            f"{root / 'params.yaml'}: score.inputs is empty: list the folders or URLs to label"
        )
    out = Path(under(root, cfg.score.out)) / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    job = predict_spark(
        [under(root, i) for i in inputs],
        str(out),
        model=champion(cfg),
        store=store,
        master=cfg.score.spark_master,
        log_dir=log_dir(cfg, root),
        arrow_batch=cfg.score.spark_batch,
    )
    return {"out": str(out), **asdict(job)}


def summary_markdown(model: str, job: dict, report: dict) -> str:
    """The run's headline figures, as the Prefect UI shows the artifact."""
    lines = [
        f"# {model}: {job['written']} images scored",
        "",
        f"- predicted: {job['written'] - job['failed']} ({job['unknown']} unknown)",
        f"- not predicted: {job['failed']} (their error column says why)",
        f"- rows: `{job['out']}` (Parquet)",
        f"- monitor, model version {report['model_version']}: {report['status']}",
    ]
    if job["missing"]:
        lines.append(f"- inputs that do not exist: {', '.join(job['missing'])}")
    lines += [f"  - {alert}" for alert in report.get("alerts", [])]
    return "\n".join(lines)


@flow(name=FLOW_NAME)
def batch_score(project: str = ".", inputs: list[str] | None = None) -> dict:
    """Score ``inputs`` (default: score.inputs) with the champion on Spark, then monitor."""
    logger = get_run_logger()
    root = Path(project).resolve()
    cfg = load_config(root / "params.yaml")
    store = project_store(cfg.mlflow, root)  # the champion and the monitor's run
    job = score_task(cfg, root, inputs or cfg.score.inputs, store)
    report = monitor_task(cfg, root, store)
    create_markdown_artifact(
        summary_markdown(champion(cfg), job, report),
        key=ARTIFACT_KEY,
        description=f"{job['written']} images scored, monitor {report['status']}",
    )
    for alert in report["alerts"]:
        logger.warning("monitor alert: %s", alert)
    return {**job, "status": report["status"], "alerts": report["alerts"]}


def serve(project: str, cron: str, timezone: str) -> None:
    """Serve the flow on score.cron (needs a Prefect server, as the other flows do)."""
    from prefect.schedules import Cron

    batch_score.serve(
        name="local-schedule",  # shows as opensig-batch-score/local-schedule
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"project": str(Path(project).resolve())},
        limit=1,
    )
