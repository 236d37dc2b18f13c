"""`opensig`: one command per pipeline stage, plus predict and demo-data."""

from __future__ import annotations

import json
import logging
import signal
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

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


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="image files and/or folders")],
    model: ModelOption,
    out: Annotated[Path, typer.Option(help="output .csv or .jsonl")] = Path("predictions.csv"),
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
) -> None:
    """Label images as a known class or 'unknown'; unreadable files get an error row.

    Exit code 1 when an input does not exist (the others are still predicted and written)."""
    from opensig.batch import OUTPUT_SUFFIXES, NoInputs, Sorting, predict_job
    from opensig.sorting import check_destination, parse_buckets

    if out.suffix not in OUTPUT_SUFFIXES:
        raise typer.BadParameter(f"{out}: use a .csv or .jsonl file", param_hint="--out")
    if (link or buckets) and sort_into is None:
        raise typer.BadParameter("--link and --buckets go with --sort-into DIR")
    try:
        cuts = parse_buckets(buckets)
        if sort_into is not None:
            check_destination(sort_into, inputs)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    try:
        result = predict_job(
            inputs,
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

    params = project / "params.yaml"
    cfg = load_config(params)
    if serve:
        flows.serve(str(project), *_schedule(params, cron or cfg.retrain.cron, timezone, cfg))
    else:
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
) -> None:
    """Prefect flow: monitor the prediction log; on an alert, a review batch and an event."""
    from opensig import monitor_flow as flows

    params = project / "params.yaml"
    cfg = load_config(params)
    if serve:
        schedule = _schedule(params, cron or cfg.monitor.cron, timezone, cfg, "monitor.cron")
        flows.serve(str(project), *schedule)
    else:
        typer.echo(json.dumps(flows.monitor(str(project)), indent=2))


class DemoSource(str, Enum):
    digits = "digits"
    digit_pairs = "digit-pairs"  # multi-label: two digits per image, labels in labels.csv
    fashion_mnist = "fashion-mnist"


@app.command("demo-data")
def demo_data(
    source: Annotated[DemoSource, typer.Option(help="which bundled data set")] = DemoSource.digits,
    out: Annotated[Path, typer.Option(help="data folder to write")] = Path("data"),
    per_class: Annotated[int, typer.Option(help="fashion-mnist: images per class")] = 1000,
) -> None:
    """Write a real demo data set (known classes, unknown and held-out unknown sources)."""
    from opensig.data import demo

    if source is DemoSource.digits:
        counts = demo.write_digits(out)
    elif source is DemoSource.digit_pairs:
        counts = demo.write_digit_pairs(out)
    else:
        counts = demo.write_fashion_mnist(out, per_class=per_class)
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
    params: ParamsOption = DEFAULT_PARAMS,
) -> None:
    """Copy the batch's labeled images into data/known/<class>/ and data/unknown/<source>/
    (never overwriting), write <batch>/imported.json, and announce the new data."""
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
    )
    announce(report, params.resolve().parent)


bench_app = typer.Typer(help="Benchmarks that print and save figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("openset")
def bench_openset(
    dataset: Annotated[str, typer.Option(help="fashion-mnist or digits")] = "fashion-mnist",
    seeds: Annotated[int, typer.Option(help="number of seeds (0..n-1): mean ± std")] = 1,
    methods: Annotated[
        list[str] | None, typer.Option("--method", help="repeat; default all")
    ] = None,
    feature_scores: Annotated[
        list[str] | None,
        typer.Option("--feature-score", help="repeat; default all (mahalanobis, knn, none)"),
    ] = None,
    splits: Annotated[
        int,
        typer.Option(help="0: the fixed class split; N: N random 6/2/2 splits of the classes"),
    ] = 0,
    epochs: int = 8,
    backbone: str = "resnet18",
    image_size: int = 28,
    in_chans: int = 1,
    batch_size: int = 128,
    device: str = "auto",
    per_class: Annotated[int, typer.Option(help="train images per class (cap)")] = 1000,
    test_per_class: Annotated[int | None, typer.Option(help="test images per class cap")] = None,
    params: ParamsOption = DEFAULT_PARAMS,
    out: Path = Path("bench/results"),
    work: Path = Path("bench/work"),
) -> None:
    """Every method (sigmoid_bce and the softmax baselines) with every feature score, on one
    data set (and class splits), same budget."""
    from opensig.bench.openset import BenchOptions, run_openset
    from opensig.methods import METHODS
    from opensig.posthoc import FEATURE_SCORES

    opts = BenchOptions(
        dataset=dataset,
        seeds=list(range(seeds)),
        methods=methods or list(METHODS),
        feature_scores=feature_scores or list(FEATURE_SCORES),
        splits=splits,
        epochs=epochs,
        backbone=backbone,
        image_size=image_size,
        in_chans=in_chans,
        batch_size=batch_size,
        device=device,
        per_class=per_class,
        test_per_class=test_per_class,
        work=work,
        out=out,
    )
    _, table = run_openset(load_config(params), opts)
    typer.echo(table)


@bench_app.command("warm-start")
def bench_warm_start(
    added: Annotated[str, typer.Option(help="the class the champion never saw")] = "sandal",
    epochs: Annotated[int, typer.Option(help="from-scratch epochs; warm runs try 1..this")] = 6,
    backbone: str = "resnet18",
    image_size: int = 28,
    batch_size: int = 128,
    device: str = "auto",
    per_class: Annotated[int, typer.Option(help="train images per class (cap)")] = 500,
    test_per_class: Annotated[int, typer.Option(help="test images per class cap")] = 100,
    seed: int = 0,
    params: ParamsOption = DEFAULT_PARAMS,
    out: Path = Path("bench/results"),
    work: Path = Path("bench/work/warm-start"),
) -> None:
    """Fashion-MNIST: epochs a warm-started retrain needs to reach from-scratch val macro-F1."""
    from opensig.bench.warmstart import WarmStartOptions, run_warm_start, to_markdown

    opts = WarmStartOptions(
        added=added,
        seeds=[seed],
        epochs=epochs,
        backbone=backbone,
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        per_class=per_class,
        test_per_class=test_per_class,
        work=work,
        out=out,
    )
    typer.echo(to_markdown(run_warm_start(load_config(params), opts)))


@bench_app.command("speed")
def bench_speed(
    backbone: str = "resnet18",
    image_size: int = 64,
    in_chans: int = 1,
    batch_size: int = 128,
    device: str = "auto",
    epochs: Annotated[int, typer.Option(help="train epochs; the last is measured")] = 2,
    per_class: Annotated[int, typer.Option(help="Fashion-MNIST train images per class")] = 500,
    rounds: Annotated[
        int, typer.Option(help="interleaved repeats; medians and min-max reported")
    ] = 3,
    ingest_images: Annotated[
        int | None, typer.Option(help="ingest test: images per class [default: all 70k]")
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
    out: Path = Path("bench/results"),
    work: Path = Path("bench/work/speed"),
) -> None:
    """Train, predict and ingest throughput, each as a ratio to its own limit."""
    from opensig.bench.speed import SpeedOptions, run_speed, to_markdown

    opts = SpeedOptions(
        backbone=backbone,
        image_size=image_size,
        in_chans=in_chans,
        batch_size=batch_size,
        device=device,
        epochs=epochs,
        per_class=per_class,
        rounds=rounds,
        ingest_images=ingest_images,
        work=work,
        out=out,
    )
    typer.echo(to_markdown(run_speed(load_config(params), opts)))
