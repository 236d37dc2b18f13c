"""`opensig`: one command per pipeline stage, plus predict and demo-data."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_type_hints

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from opensig.bench.options import (
    BenchOptions,
    CacheOptions,
    IngestScaleOptions,
    ScaleOptions,
    SpeedOptions,
    WarmStartOptions,
)
from opensig.config import DEFAULT_PARAMS, Config, MlflowConfig, load_config
from opensig.redaction import redact

log = logging.getLogger("opensig")

# Errors whose own words are meant for a person: opensig raises them naming the file or key
# and what to do. Any other error is unexpected: its type is shown too.
EXPLAINED = (ValueError, OSError, RuntimeError)


def _one_line(err: Exception) -> str:
    if isinstance(err, EXPLAINED):
        return redact(str(err))
    return redact(f"{type(err).__name__}: {err} (unexpected: --debug shows where; please report)")


class ReportedGroup(TyperGroup):
    """The one failure wrapper of every command (as lightning-hydra-template's
    ``task_wrapper``): an error ends in one line on stderr, what failed and what to do, and
    exit code 2; the traceback follows only with --debug (or OPENSIG_DEBUG=1). Usage errors,
    exits and interrupts (Ctrl-C, SIGTERM) pass as they are: they are not failures."""

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> tuple:
        """A flow's script (pipelines/*.py) names its command itself: its usage line and
        errors name the script as it is run (``python pipelines/monitor.py``)."""
        name, command, rest = super().resolve_command(ctx, args)
        script = ctx.info_name or ""
        if script.endswith(".py"):
            ctx.info_name, name = "python", script
        return name, command, rest

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as err:
            line = f"{ctx.invoked_subcommand or ctx.info_name} failed: {_one_line(err)}"
            if ctx.params.get("debug"):  # redacted too: an error may quote a tracking URI
                line += "\n" + redact("".join(traceback.format_exception(err))).rstrip()
            log.error("%s", line)
            raise typer.Exit(code=2) from None


app = typer.Typer(
    cls=ReportedGroup,
    help="Image classifiers that can say 'none of the above'.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file")]
ModelOption = Annotated[str, typer.Option(help="models:/name@alias, runs:/id/model, or a folder")]
ThresholdsOption = Annotated[
    Path | None,
    typer.Option(help="thresholds.json, for a training output folder (artifacts/model)"),
]
ForceOption = Annotated[
    bool, typer.Option(help="use thresholds recorded as tuned for another model (a warning)")
]
ServeOption = Annotated[  # the Prefect flows: once, or served on their schedule
    bool, typer.Option(help="serve on a schedule (needs a Prefect server) instead of once")
]
TimezoneOption = Annotated[str | None, typer.Option(help=r"\[default: retrain.timezone]")]
TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        help=r"MLflow store for models:/ URIs \[default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db]"
    ),
]


def _store(tracking_uri: str | None) -> MlflowConfig:
    """--tracking-uri as the store settings every MLflow call takes (bounded HTTP)."""
    try:
        return MlflowConfig(tracking_uri=tracking_uri)
    except ValidationError as err:  # e.g. a password in the URI: its message does not echo it
        raise typer.BadParameter(err.errors()[0]["msg"], param_hint="--tracking-uri") from None


def _model_dir(model: str, tracking_uri: str | None) -> Path:
    """--model and --tracking-uri -> a local bundle folder, as export and review take them."""
    from opensig.tracking.model_uri import local_bundle

    return local_bundle(model, _store(tracking_uri))


class Terminated(SystemExit):
    """SIGTERM as an exception: ``finally`` blocks and temp-file cleanup run on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)  # 143, the exit status of a process ended by SIGTERM


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run_stage(name: str, params: Path) -> None:
    """A stage with the user's params; errors end as every command's do (ReportedGroup)."""
    from opensig import stages

    try:
        with _sigterm_raises():
            stages.STAGES[name](load_config(params))
    except Terminated:
        log.error("%s interrupted (SIGTERM)", name)
        raise


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug-level logs")] = False,
    debug: Annotated[  # read by ReportedGroup from the context
        bool,
        typer.Option(envvar="OPENSIG_DEBUG", help="on failure, show the traceback too"),
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def ingest(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Scan data/, validate images, drop duplicates, split by content hash."""
    _run_stage("ingest", params)


@app.command()
def train(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Train the sigmoid-head classifier (best and last checkpoints)."""
    _run_stage("train", params)


@app.command()
def tune(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Tune one threshold per class on the validation split."""
    _run_stage("tune", params)


@app.command()
def evaluate(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Open-set metrics and plots on the test split."""
    _run_stage("evaluate", params)


@app.command()
def register(params: ParamsOption = DEFAULT_PARAMS) -> None:
    """Log to MLflow, register the model, set challenger/champion aliases."""
    _run_stage("register", params)


class Engine(str, Enum):
    local = "local"
    spark = "spark"


def _predict_spark(
    inputs: list[str],
    out: Path,
    model: str,
    tracking_uri: str | None,
    master: str | None,
    multi_label: bool,
    log_dir: str | None,
    batch: int | None,
) -> None:
    """predict --engine spark: the rows as a Parquet dataset; exit 1 when an input is missing."""
    from opensig.batch import OUTPUT_SUFFIXES, NoInputs
    from opensig.spark import ARROW_BATCH, predict_spark

    if out.suffix in OUTPUT_SUFFIXES:
        raise typer.BadParameter(
            f"{out}: --engine spark writes a Parquet dataset (a folder), e.g. --out preds.parquet",
            param_hint="--out",
        )
    try:
        job = predict_spark(
            inputs,
            str(out),
            model=model,
            store=_store(tracking_uri),
            master=master,
            multi_label=multi_label,
            log_dir=log_dir,
            arrow_batch=batch or ARROW_BATCH,
        )
    except NoInputs as err:
        raise typer.BadParameter(str(err), param_hint="INPUTS") from None
    if job.missing:
        raise typer.Exit(code=1)


@app.command()
def predict(
    inputs: Annotated[
        list[str],
        typer.Argument(help="image files and/or folders (with --engine spark also globs, URLs)"),
    ],
    model: ModelOption,
    out: Annotated[
        Path, typer.Option(help="output .csv or .jsonl; with --engine spark a Parquet folder")
    ] = Path("predictions.csv"),
    thresholds: ThresholdsOption = None,
    tracking_uri: TrackingUriOption = None,
    batch_size: int = 256,
    device: str = "auto",
    workers: Annotated[
        int | None, typer.Option(help="decoding processes [default: 0 on CPU, up to 8 on GPU]")
    ] = None,
    multi_label: Annotated[
        bool, typer.Option(help="add a `labels` column: every class that passes its threshold")
    ] = False,
    sort_into: Annotated[
        Path | None,
        typer.Option(help="also copy each image into DIR/<label>/ (sources are never touched)"),
    ] = None,
    link: Annotated[bool, typer.Option(help="with --sort-into: hard-link instead of copy")] = False,
    buckets: Annotated[
        str | None,
        typer.Option(help="with --sort-into: score sub-folders cut at e.g. 0.5,0.8"),
    ] = None,
    force: ForceOption = False,
    log_dir: Annotated[
        str | None,
        typer.Option("--log", help="also append the rows to the prediction log DIR (or URL)"),
    ] = None,
    engine: Annotated[
        Engine, typer.Option(help="local: this process; spark: a Spark cluster (or local[*])")
    ] = Engine.local,
    spark_master: Annotated[
        str | None,
        typer.Option(help=r"with --engine spark \[default: spark-submit's, else local\[*]]"),
    ] = None,
    spark_batch: Annotated[
        int | None,
        typer.Option(min=1, help=r"with --engine spark: images per Arrow batch \[default: 64]"),
    ] = None,
) -> None:
    """Label images as a known class or 'unknown'; unreadable files get an error row.

    Exit code 1 when an input does not exist (the others are still predicted and written),
    2 when no image could be predicted."""
    from opensig.batch import OUTPUT_SUFFIXES, NoInputs, Sorting, predict_job
    from opensig.sorting import check_destination, parse_buckets

    if engine is Engine.spark:
        local_only = {
            "--thresholds": thresholds is not None,
            "--sort-into": sort_into is not None,
            "--force": force,
            "--workers": workers is not None,
            "--device": device != "auto",
            "--batch-size": batch_size != 256,
        }
        if given := [name for name, used in local_only.items() if used]:
            raise typer.BadParameter(
                f"{', '.join(given)}: --engine local only (Spark scores the registered model "
                "as it is, on the executors' devices)"
            )
        _predict_spark(
            inputs, out, model, tracking_uri, spark_master, multi_label, log_dir, spark_batch
        )
        return
    if spark_master is not None:
        raise typer.BadParameter("--spark-master goes with --engine spark")
    if out.suffix not in OUTPUT_SUFFIXES:
        raise typer.BadParameter(f"{out}: use a .csv or .jsonl file", param_hint="--out")
    if (link or buckets) and sort_into is None:
        raise typer.BadParameter("--link and --buckets go with --sort-into DIR")
    try:
        cuts = parse_buckets(buckets)
        if sort_into is not None:
            check_destination(sort_into, [Path(i) for i in inputs])
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    try:
        result = predict_job(
            [Path(i) for i in inputs],
            out,
            model=model,
            store=_store(tracking_uri),
            thresholds=thresholds,
            device=device,
            force=force,
            batch_size=batch_size,
            workers="auto" if workers is None else workers,
            multi_label=multi_label,
            sorting=None if sort_into is None else Sorting(sort_into, link, cuts),
            log_dir=log_dir,
        )
    except NoInputs as err:
        raise typer.BadParameter(str(err), param_hint="INPUTS") from None
    if len(result.frame) and not result.frame["error"].eq("").any():
        log.error("predict: none of the %d image(s) could be predicted", len(result.frame))
        raise typer.Exit(code=2)
    if result.missing:
        raise typer.Exit(code=1)


@app.command()
def monitor(
    params: ParamsOption = DEFAULT_PARAMS,
    log_dir: Annotated[
        str | None, typer.Option("--log", help="prediction log [default: monitor.log_dir]")
    ] = None,
    model_version: Annotated[
        str | None, typer.Option(help="[default: the version of the latest logged row]")
    ] = None,
    since: Annotated[datetime | None, typer.Option(help="current window: from (UTC)")] = None,
    until: Annotated[datetime | None, typer.Option(help="current window: until (UTC)")] = None,
    reference_since: Annotated[datetime | None, typer.Option()] = None,
    reference_until: Annotated[datetime | None, typer.Option()] = None,
    out: Annotated[Path, typer.Option(help="the report (pictures beside it)")] = Path(
        "reports/monitor.json"
    ),
    fail_on_alert: Annotated[bool, typer.Option(help="exit 3 on status alert")] = False,
) -> None:
    """Compare the latest predictions with the first ones of that model version: unknown
    rate, class shares, max scores, errors. Exit 0 on ok and alert (see status in --out)."""
    from opensig.monitoring.monitor import ALERT, monitor_log

    cfg = load_config(params)
    root = log_dir or cfg.monitor.log_dir
    if root is None:
        raise typer.BadParameter("pass --log DIR or set monitor.log_dir in params.yaml")
    report = monitor_log(
        root,
        cfg.monitor,
        cfg.mlflow,
        out,
        model_version=model_version,
        since=since,
        until=until,
        reference_since=reference_since,
        reference_until=reference_until,
    )
    for alert in report["alerts"]:
        log.warning("monitor alert: %s", alert)
    log.info("monitor: %s (%s, pictures in %s)", report["status"], out, out.parent / out.stem)
    if fail_on_alert and report["status"] == ALERT:
        raise typer.Exit(code=3)


class ExportFormat(str, Enum):
    onnx = "onnx"


@app.command("choose-score")
def choose_score(
    params: ParamsOption = DEFAULT_PARAMS,
    work: Annotated[
        Path, typer.Option(help="where the held-out networks are trained (one folder each)")
    ] = Path("artifacts/choose-score"),
    out: Annotated[Path, typer.Option(help="the report (JSON)")] = Path(
        "reports/choose_score.json"
    ),
) -> None:
    """Choose tune.feature_score and tune.feature_weight on novelty imitated by validation
    data: train once per unknown source without it (after `opensig ingest`), score its val
    images as novel, rank every candidate by mean AUROC. Costs one training per source."""
    from opensig.io import write_json
    from opensig.score_choice import choose_score as choose
    from opensig.stages import HERE

    cfg = load_config(params)
    report = choose(cfg, HERE.manifest, work)
    write_json(out, report)
    best, current = report["best"], report["current"]
    for row in report["candidates"][:5]:
        log.info(
            "%s @ %.2f: mean AUROC %.3f",
            row["feature_score"],
            row["feature_weight"],
            row["mean_auroc"],
        )
    log.info(
        "best: tune.feature_score: %s, tune.feature_weight: %s (mean AUROC %.3f on sources "
        "%s, against %.3f for params.yaml's); adopt it in %s or try it with `dvc exp run -S "
        "tune.feature_score=%s -S tune.feature_weight=%s`; the whole ranking: %s",
        best["feature_score"],
        best["feature_weight"],
        best["mean_auroc"],
        ", ".join(report["sources"]),
        current["mean_auroc"],
        params,
        best["feature_score"],
        best["feature_weight"],
        out,
    )


@app.command()
def export(
    model: ModelOption,
    out: Annotated[Path, typer.Option(help="file to write, e.g. model.onnx")],
    fmt: Annotated[  # one format so far: typer refuses any other value, naming the choices
        ExportFormat,
        typer.Option("--format", help=r"onnx (needs pip install 'opensig\[export]')"),
    ] = ExportFormat.onnx,
    thresholds: ThresholdsOption = None,
    tracking_uri: TrackingUriOption = None,
    force: ForceOption = False,
) -> None:
    """Export a model for runtimes without Python: resized pixels -> per-class scores, with
    classes, thresholds and the decision rule in the file's metadata."""
    from opensig.export import export_onnx
    from opensig.predict import Bundle

    if not log.isEnabledFor(logging.DEBUG):  # the exporter's passes log every step at INFO
        for name in ("onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.WARNING)
    bundle = Bundle.load(_model_dir(model, tracking_uri), thresholds, device="cpu", force=force)
    export_onnx(bundle, out)


@app.command()
def retrain(
    project: Annotated[Path, typer.Option(help="folder with dvc.yaml and params.yaml")] = Path("."),
    force: Annotated[bool, typer.Option(help="rerun every stage even if nothing changed")] = False,
    serve: ServeOption = False,
    cron: Annotated[str | None, typer.Option(help="schedule [default: retrain.cron]")] = None,
    timezone: TimezoneOption = None,
) -> None:
    """Prefect flow: version new data, dvc repro, report the promotion decision."""
    from opensig import retrain as flows
    from opensig.prefect_env import database_busy_explained

    params = project / "params.yaml"
    cfg = load_config(params)
    if serve:
        flows.serve(str(project), *_schedule(params, cron or cfg.retrain.cron, timezone, cfg))
    else:
        with database_busy_explained():
            summary = flows.retrain(str(project), force=force)
        typer.echo(json.dumps(summary, indent=2))


def _schedule(
    params: Path, cron: str, timezone: str | None, cfg: Config, key: str = "retrain.cron"
) -> tuple[str, str]:
    """(cron, timezone) of a served flow, checked by Prefect's own parser before anything is
    served; the timezone defaults to retrain.timezone, the one zone of the project's flows."""
    from opensig.retrain import check_schedule

    settings = cfg.retrain.model_copy(
        update={"cron": cron, "timezone": timezone or cfg.retrain.timezone}
    )
    check_schedule(settings, params, key)
    return settings.cron, settings.timezone


@app.command("monitor-flow")
def monitor_flow(
    project: Annotated[Path, typer.Option(help="folder with params.yaml")] = Path("."),
    serve: ServeOption = False,
    cron: Annotated[str | None, typer.Option(help="schedule [default: monitor.cron]")] = None,
    timezone: TimezoneOption = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help=r"MLflow store \[default: mlflow.tracking_uri, read from --project]"),
    ] = None,
) -> None:
    """Prefect flow: monitor the prediction log; on an alert, a review batch and an event."""
    from opensig import monitor_flow as flows
    from opensig.prefect_env import database_busy_explained
    from opensig.tracking.store import resolve_sqlite

    params = project / "params.yaml"
    cfg = load_config(params)
    if tracking_uri is not None:  # a path typed here is relative to here, as for every command
        tracking_uri = resolve_sqlite(_store(tracking_uri).tracking_uri, Path.cwd())
    if serve:
        schedule = _schedule(params, cron or cfg.monitor.cron, timezone, cfg, "monitor.cron")
        flows.serve(str(project), *schedule, tracking_uri)
    else:
        with database_busy_explained():
            report = flows.monitor(str(project), tracking_uri)
        typer.echo(json.dumps(report, indent=2))


@app.command("score-flow")
def score_flow(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help=r"folders, files, globs, URLs \[default: score.inputs]"),
    ] = None,
    project: Annotated[Path, typer.Option(help="folder with params.yaml")] = Path("."),
    serve: ServeOption = False,
    cron: Annotated[str | None, typer.Option(help="schedule [default: score.cron]")] = None,
    timezone: TimezoneOption = None,
) -> None:
    """Prefect flow: the champion labels images on Spark, into the prediction log; then the
    monitor."""
    from opensig import score_flow as flows
    from opensig.prefect_env import database_busy_explained

    params = project / "params.yaml"
    cfg = load_config(params)
    if serve:
        schedule = _schedule(params, cron or cfg.score.cron, timezone, cfg, "score.cron")
        flows.serve(str(project), *schedule)
    else:
        with database_busy_explained():
            scored = flows.batch_score(str(project), inputs or None)
        typer.echo(json.dumps(scored, indent=2))


@app.command("cache")
def cache_command(
    params: ParamsOption = DEFAULT_PARAMS,
    manifest: Annotated[
        list[Path] | None,
        typer.Option(help="manifests whose images to keep (repeat) [default: ingest's]"),
    ] = None,
    prune: Annotated[
        bool, typer.Option(help="remove the entries no manifest uses, then compact the shards")
    ] = False,
) -> None:
    """The decode cache in data.cache_dir: its size, and what the manifests use of it."""
    from opensig.data import cache
    from opensig.data.manifest import read_manifest
    from opensig.stages import HERE

    cfg = load_config(params)
    manifests = manifest or [HERE.manifest]
    hashes = sorted({h for m in manifests for h in read_manifest(m, cfg.data.root)["hash"]})
    if prune:
        removed, freed = cache.prune(cfg.data.cache_dir, hashes)
        log.info("decode cache: removed %d entries, freed %.3f GB", removed, freed / 1e9)
    folders = cache.usage(cfg.data.cache_dir, hashes)
    if not folders:
        log.info("decode cache %s: empty", cache.decoded_root(cfg.data.cache_dir))
    for row in folders:
        log.info(
            "%s: %d images in %d shards, %.3f GB; %d used by %s",
            row.folder,
            row.entries,
            row.shards,
            row.bytes / 1e9,
            row.used,
            ", ".join(map(str, manifests)),
        )
    cap = cfg.train.decode_cache_max_gb
    total = sum(row.bytes for row in folders) / 1e9
    log.info(
        "decode cache total %.3f GB; cap %s",
        total,
        f"{cap} GB (train.decode_cache_max_gb)" if cap is not None else "unset",
    )


class DemoSource(str, Enum):
    digits = "digits"
    digit_pairs = "digit-pairs"  # multi-label: two digits per image, labels in labels.csv
    fashion_mnist = "fashion-mnist"


@app.command("demo-data")
def demo_data(
    source: Annotated[DemoSource, typer.Option(help="which bundled data set")] = DemoSource.digits,
    out: Annotated[Path, typer.Option(help="data folder to write")] = Path("data"),
    per_class: Annotated[int, typer.Option(help="fashion-mnist: images per class")] = 1000,
    force: Annotated[
        bool, typer.Option("--force", help="replace --out whole when it holds other files")
    ] = False,
) -> None:
    """Write a real demo data set (known classes, unknown and held-out unknown sources);
    refuses an --out that holds other data."""
    from functools import partial

    from opensig.data import demo

    if source is DemoSource.digits:
        write = demo.write_digits
    elif source is DemoSource.digit_pairs:
        write = demo.write_digit_pairs
    else:
        write = partial(demo.write_fashion_mnist, per_class=per_class)
    counts = demo.write_demo(write, out, force)
    log.info("wrote %d images to %s: %s", sum(counts.values()), out, counts)


review_app = typer.Typer(
    help="Review batches: the logged images a person should label, and their import into data/.",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")


class ReviewFormat(str, Enum):
    folders = "folders"
    label_studio = "label-studio"  # folders, plus Label Studio tasks and labeling config


@review_app.command("export")
def review_export(
    log_dir: Annotated[
        str | None, typer.Option("--log", help=r"prediction log \[default: monitor.log_dir]")
    ] = None,
    out: Annotated[Path | None, typer.Option(help=r"\[default: monitor.review_dir]")] = None,
    max_images: Annotated[
        int | None, typer.Option("--max", min=1, help=r"\[default: monitor.review_max]")
    ] = None,
    since: Annotated[datetime | None, typer.Option(help="logged at or after (UTC)")] = None,
    until: Annotated[datetime | None, typer.Option(help="logged at or before (UTC)")] = None,
    model_version: Annotated[str | None, typer.Option(help="only this model version")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="the logging model (as predict --model): margins to its thresholds"),
    ] = None,
    thresholds: ThresholdsOption = None,
    tracking_uri: TrackingUriOption = None,
    fmt: Annotated[ReviewFormat, typer.Option("--format")] = ReviewFormat.folders,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Copy the images predicted unknown, and the least certain ones, into a new batch
    (review/<batch>/inbox/<label>/ + review.csv); prints the batch folder."""
    from opensig.data.scan import scan_cache
    from opensig.review import export_from_log

    cfg = load_config(params)
    log_dir = log_dir or cfg.monitor.log_dir
    if log_dir is None:
        raise typer.BadParameter(
            "no log: pass --log DIR or set monitor.log_dir", param_hint="--log"
        )
    by_class = None
    if model is not None:
        from opensig.predict import Bundle

        bundle = Bundle.load(_model_dir(model, tracking_uri), thresholds, device="cpu")
        by_class = dict(zip(bundle.spec.classes, bundle.thresholds.tolist(), strict=True))
    batch = export_from_log(
        log_dir,
        out or cfg.monitor.review_dir,
        cfg.data.root,
        max_images or cfg.monitor.review_max,
        fmt is ReviewFormat.label_studio,
        thresholds=by_class,
        since=since,
        until=until,
        model_version=model_version,
        cache=scan_cache(cfg.data.cache_dir),
    )
    typer.echo(batch)


@review_app.command("import")
def review_import(
    batch: Annotated[Path, typer.Argument(help="the batch folder, e.g. review/batch-...")],
    data: Annotated[Path | None, typer.Option(help=r"\[default: data.root]")] = None,
    label_studio: Annotated[
        Path | None, typer.Option(help="also read this Label Studio JSON export")
    ] = None,
    from_unknown: Annotated[
        list[str] | None,
        typer.Option(
            help="repeat: move data/unknown/<NAME>/ into data/known/<NAME>/ first (an unknown "
            "source that became a class)"
        ),
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Copy the batch's labeled images into data/known/<class>/ and data/unknown/<source>/
    (never overwriting), append what it did to <batch>/imported.json, and announce the new
    data."""
    from opensig.data.scan import scan_cache
    from opensig.review import announce, import_batch

    cfg = load_config(params)
    if cfg.data.labels_csv is not None:
        raise ValueError(
            f"{params}: data.labels_csv is set: review import writes class folders, so add the "
            "reviewed images to that CSV by hand"
        )
    report = import_batch(
        batch,
        data or cfg.data.root,
        label_studio=label_studio,
        cache=scan_cache(cfg.data.cache_dir),
        holdout=cfg.data.holdout_unknown,
        from_unknown=from_unknown or (),
    )
    held = sorted(set(from_unknown or ()) & set(cfg.data.holdout_unknown))
    if held:
        log.warning(
            "%s: take %s out of data.holdout_unknown (now classes), or ingest refuses",
            params,
            held,
        )
    announce(report, params.resolve().parent)


bench_app = typer.Typer(help="Benchmarks that print and save figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

Options = TypeVar("Options")
KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _options_command(
    options: type[Options],
) -> Callable[[Callable[[Options, Config], None]], Callable[..., None]]:
    """A command with one option per field of the dataclass ``options``, then --params, so
    that each option is written once, as a field: its type, default, and in its metadata its
    ``help`` and its ``option`` name where that is not the field's. The decorated function
    gets the options built and the params loaded."""
    hints = get_type_hints(options)
    parameters = []
    for f in dataclasses.fields(options):
        decls = [f.metadata["option"]] if "option" in f.metadata else []
        option = typer.Option(*decls, help=f.metadata.get("help"))
        annotation = Annotated[hints[f.name], option]
        parameters.append(
            inspect.Parameter(f.name, KEYWORD, default=f.default, annotation=annotation)
        )
    parameters.append(
        inspect.Parameter("params", KEYWORD, default=DEFAULT_PARAMS, annotation=ParamsOption)
    )

    def decorate(run: Callable[[Options, Config], None]) -> Callable[..., None]:
        def command(params: Path, **values: Any) -> None:
            opts = options(**values)
            run(opts, load_config(params))

        command.__signature__ = inspect.Signature(parameters)  # what typer reads
        command.__doc__ = run.__doc__
        return command

    return decorate


@bench_app.command("openset")
@_options_command(BenchOptions)
def bench_openset(opts: BenchOptions, cfg: Config) -> None:
    """Every method (sigmoid_bce and the softmax baselines) with every feature score, on one
    data set (and class splits), same budget."""
    from opensig.bench.openset import run_openset

    _, table = run_openset(cfg, opts)
    typer.echo(table)


@bench_app.command("compare")
def bench_compare(
    base: Annotated[Path, typer.Argument(help="the base recipe's openset_<dataset>*.json")],
    candidate: Annotated[Path, typer.Argument(help="the candidate's, same protocol and seeds")],
) -> None:
    """Two `bench openset` results, paired by class split and seed: the candidate minus the
    base, mean and 95% interval, and the settings that differ."""
    from opensig.bench.compare import compare

    typer.echo(compare(base, candidate))


@bench_app.command("merge")
def bench_merge(
    results: Annotated[
        list[Path], typer.Argument(help="openset_<dataset>*.json files of one protocol and recipe")
    ],
    out: Annotated[Path, typer.Option(help="folder for the joined result")] = Path("bench/results"),
) -> None:
    """`bench openset` results run apart (other methods or seeds), joined into the table one
    run would have written: same protocol and settings, no run twice."""
    from opensig.bench.merge import merge

    typer.echo(merge(results, out))


@bench_app.command("warm-start")
@_options_command(WarmStartOptions)
def bench_warm_start(opts: WarmStartOptions, cfg: Config) -> None:
    """Fashion-MNIST: epochs a warm-started retrain needs to reach from-scratch val macro-F1."""
    from opensig.bench.warmstart import run_warm_start, to_markdown

    typer.echo(to_markdown(run_warm_start(cfg, opts)))


@bench_app.command("cache")
@_options_command(CacheOptions)
def bench_cache(opts: CacheOptions, cfg: Config) -> None:
    """The decode cache: filled under a memory limit smaller than its data, then grown."""
    from opensig.bench.cache import run_cache, to_markdown

    typer.echo(to_markdown(run_cache(opts)))


@bench_app.command("speed")
@_options_command(SpeedOptions)
def bench_speed(opts: SpeedOptions, cfg: Config) -> None:
    """Train, predict and ingest throughput, each as a ratio to its own limit."""
    from opensig.bench.speed import run_speed, to_markdown

    typer.echo(to_markdown(run_speed(cfg, opts)))


@bench_app.command("scale")
@_options_command(ScaleOptions)
def bench_scale(opts: ScaleOptions, cfg: Config) -> None:
    """predict on one process vs --engine spark on local[1] and local[2]: images/s."""
    from opensig.bench.scale import run_scale, to_markdown

    typer.echo(to_markdown(run_scale(opts)))


@bench_app.command("ingest-scale")
@_options_command(IngestScaleOptions)
def bench_ingest_scale(opts: IngestScaleOptions, cfg: Config) -> None:
    """Per-file costs of ingest, dvc add/status/push/pull and the prediction log (monitor,
    review export) on a synthetic tree of small PNGs: the figures of docs/scale.md."""
    from opensig.bench.ingest_scale import run_ingest_scale, to_markdown

    typer.echo(to_markdown(run_ingest_scale(cfg, opts)))
