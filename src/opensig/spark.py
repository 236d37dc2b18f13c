"""Batch scoring on Spark: the registered model, unchanged, labels images where they live.

Spark reads the images (its ``binaryFile`` source: folders, files, globs and any URL its file
systems read, ``s3://``, ``abfss://``, ``file:/``), MLflow's ``spark_udf`` runs opensig's
pyfunc model on the executors (``env_manager="local"``: the executors' own Python), and the
executors write the rows as a Parquet dataset, and to the prediction log when asked. No image
bytes and no prediction pass through the driver; it lists the inputs and fetches the model.

What users of ``spark_udf`` with images run into, handled here:

- the result type is given explicitly (MLflow's inference from the signature fails on the
  optional ``labels`` column, ``KeyError: 'labels'``);
- Arrow batches are counted in images (``spark.sql.execution.arrow.maxRecordsPerBatch``,
  default 10,000 rows, is gigabytes of photos): :data:`ARROW_BATCH`, settable;
- partitions are coarse (``spark.sql.files.maxPartitionBytes`` raised for the read), so the
  model loads once per task and core, not once per 32 files;
- torch in a task uses the task's cores (``spark.task.cpus``), not every core of the machine,
  and a Python worker loads the model once (:mod:`opensig.spark_worker`, which the pyfunc
  model reads);
- the model's own prediction logging (a ``monitor.json`` naming the registering machine's
  folder) is off; ``log_dir`` writes the log, one file per partition, through Spark's commit
  protocol, so a retried task replaces its file instead of adding its rows twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from opensig.batch import NoInputs, report_job
from opensig.config import MlflowConfig
from opensig.labels import UNKNOWN_LABEL

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import StructType

log = logging.getLogger(__name__)

INSTALL = "pip install 'opensig[spark]'"
ARROW_BATCH = 64  # images per Arrow batch handed to the model (photos: MBs each)
WHOLE_INPUT = str(1 << 40)  # spark.sql.files.maxPartitionBytes: about one split per core
DEFAULT_MASTER = "local[*]"
GLOB = set("*?[{")
# pyspark 4 warns at every pandas conversion that it does not fully support pandas >= 3;
# opensig's Spark path is tested with the pandas it installs, so in its processes it is noise.
warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas")


def require_spark() -> None:
    """pyspark importable and Java on the PATH (or JAVA_HOME): else one line saying how."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise RuntimeError(f"--engine spark needs pyspark: {INSTALL}") from None
    java_home = os.environ.get("JAVA_HOME")
    if not (shutil.which("java") or (java_home and Path(java_home, "bin", "java").is_file())):
        raise RuntimeError(
            "--engine spark needs Java 17 or later (Spark runs on the JVM): install it (e.g. "
            "apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
        )


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """No artifact bar while MLflow copies the model for Spark, and no warning that
    ``env_manager="local"`` is not the training environment: opensig chose it (the executors'
    Python has opensig; docs/predict-and-serve.md, Spark on a cluster)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    from opensig.io import env_defaults

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with env_defaults({MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name: "false"}):
            yield
    finally:
        pyfunc_log.setLevel(level)


def session(master: str | None = None) -> SparkSession:
    """The active session (e.g. under ``spark-submit``, which sets the master), else a new
    one on ``master`` (default ``local[*]``). Workers run this very Python (PYSPARK_PYTHON),
    which has opensig, unless the user chose another."""
    require_spark()
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    active = SparkSession.getActiveSession()
    if active is not None and master is None:
        return active
    builder = SparkSession.builder.appName("opensig")
    if master is not None or not SparkConf().contains("spark.master"):
        builder = builder.master(master or DEFAULT_MASTER)
    return builder.getOrCreate()


def _spark_path(item: str) -> str:
    """An input as Spark reads it: URLs and absolute paths as they are, relative paths made
    absolute (executors may run elsewhere)."""
    return item if "://" in item or item.startswith("file:") else str(Path(item).absolute())


def read_images(spark: SparkSession, inputs: Sequence[str]) -> DataFrame:
    """``path``, ``content`` (bytes) of every file below ``inputs`` (folders walked, globs
    expanded by Spark), split into about one partition per core.

    Like Hadoop, Spark skips files whose name starts with ``.`` or ``_``.
    """
    spark.conf.set("spark.sql.files.maxPartitionBytes", WHOLE_INPUT)
    return (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load([_spark_path(i) for i in inputs])
        .select("path", "content")
    )


def result_type(classes: Sequence[str], multi_label: bool) -> StructType:
    """The pyfunc model's answer as a Spark struct, in predict's column order."""
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    fields = [StructField("path", StringType()), StructField("label", StringType())]
    if multi_label:
        fields.append(StructField("labels", StringType()))
    fields.append(StructField("score", DoubleType()))
    fields += [StructField(f"score_{c}", DoubleType()) for c in classes]
    return StructType([*fields, StructField("error", StringType())])


@dataclass(frozen=True)
class SparkModel:
    """A registered model as Spark scores it: the local MLflow model folder the driver
    fetched (Spark ships it to the executors) and its classes."""

    folder: Path
    bundle: Path  # the bundle inside it: weights, spec, thresholds
    classes: list[str]

    @classmethod
    def fetch(cls, model: str, store: MlflowConfig) -> SparkModel:
        """``model`` as predict takes it, but an MLflow model (``models:/``, ``runs:/`` or a
        logged model's folder): a plain bundle folder is not one."""
        from opensig.model import read_spec
        from opensig.tracking.model_uri import local_bundle

        bundle = local_bundle(model, store)
        folder = bundle.parent.parent
        if not (folder / "MLmodel").is_file():
            raise ValueError(
                f"--model {model}: --engine spark scores an MLflow model, and this is a bare "
                "model folder: register it (opensig register) and pass models:/<name>@champion, "
                "or use --engine local"
            )
        return cls(folder, bundle, read_spec(bundle).classes)


def local_path(path: str) -> str:
    """Spark's ``file:/a%20b.png`` as the file's own path, ``/a b.png``; other URLs as they
    are (not Spark's url_decode, which turns '+' into a space)."""
    parsed = urlparse(path)
    return unquote(parsed.path) if parsed.scheme == "file" else path


def local_path_column(path: Column) -> Column:
    """:func:`local_path` as a Spark expression, run in the JVM (no Python worker): '+' is
    escaped before ``url_decode``, which would read it as a space."""
    from pyspark.sql import functions as F

    decoded = F.url_decode(
        F.regexp_replace(F.regexp_replace(path, r"\+", "%2B"), "^file:(//)?", "")
    )
    return F.when(path.startswith("file:"), decoded).otherwise(path)


def output_schema(classes: Sequence[str], multi_label: bool, sha256: bool) -> StructType:
    """The rows :func:`score` returns: predict's columns, ``sha256`` after ``path`` if asked."""
    from pyspark.sql.types import StringType, StructField, StructType

    answer = result_type(classes, multi_label).fields
    digest = [StructField("sha256", StringType())] if sha256 else []
    return StructType([answer[0], *digest, *answer[1:]])


def unreadable_rows(
    spark: SparkSession,
    paths: Sequence[str],
    sources: Sequence[str | bytes],
    schema: StructType,
) -> DataFrame:
    """predict's error rows for files Spark cannot hand to the model: each row's error is
    what predict's decoder says of ``sources`` (a missing path, an empty file's bytes)."""
    from opensig.data.dataset import ImageDataset

    decoded = ImageDataset(sources, None, 1, 1)
    rows = []
    for index, (path, source) in enumerate(zip(paths, sources, strict=True)):
        row = dict.fromkeys(schema.fieldNames())
        row |= {"path": path, "error": decoded[index]["error"]}
        if "sha256" in row and isinstance(source, bytes):
            row["sha256"] = hashlib.sha256(source).hexdigest()
        rows.append(row)
    return spark.createDataFrame(rows, schema)


def empty_files(images: DataFrame) -> list[str]:
    """Files Spark listed for ``images`` but reads no row of, as local paths: empty files
    (Spark reads a file as byte ranges, and an empty one has none), which predict reports,
    so Spark must too. Compared on the driver as paths only (a scan of the path column, which
    opens no file): the listing and the rows spell paths differently (``file:///``,
    ``file:/``, encoded or not), so both as :func:`local_path` gives them."""
    try:
        listed = {local_path(p) for p in images.inputFiles()}
    except Exception:  # not a plain file scan (a join, a union): nothing to compare with
        return []
    if not listed:
        return []
    read = images.select(local_path_column(images["path"]).alias("path"))
    return sorted(listed - {row.path for row in read.toLocalIterator()})


def score(
    images: DataFrame,
    model: str | SparkModel,
    *,
    store: MlflowConfig | None = None,
    multi_label: bool = False,
    arrow_batch: int = ARROW_BATCH,
    sha256: bool = False,
) -> DataFrame:
    """Scores of the images in ``images``: a ``binaryFile`` DataFrame (``path``,
    ``content``) or any DataFrame with a ``path`` column, whose files Spark reads. One row
    per image with predict's columns (``path``, ``label``, [``labels``], ``score``,
    ``score_<class>``, ``error``); ``path`` is the file's own path, not ``file:``.

    ``model``: as ``opensig predict --model`` takes it, resolved in ``store`` (default: the
    usual tracking URI). ``sha256`` adds the content's digest (the prediction log's key).
    """
    from mlflow.pyfunc import spark_udf
    from pyspark.sql import functions as F

    spark = images.sparkSession
    if not isinstance(model, SparkModel):
        model = SparkModel.fetch(model, store or MlflowConfig())
    if "content" not in images.columns:
        paths = [row.path for row in images.select("path").distinct().collect()]
        images = read_images(spark, paths)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(arrow_batch))
    with _quiet_mlflow():
        predict = spark_udf(
            spark,
            str(model.folder),
            result_type=result_type(model.classes, multi_label),
            env_manager="local",
            params={"multi_label": multi_label},
        )
    answer = predict(F.struct(F.col("content").alias("image")))
    columns = result_type(model.classes, multi_label).fieldNames()[1:]
    scored = images.select(
        local_path_column(F.col("path")).alias("path"),
        *([F.sha2("content", 256).alias("sha256")] if sha256 else []),
        answer.alias("answer"),
    ).select("path", *(["sha256"] if sha256 else []), *[f"answer.{c}" for c in columns])
    for text in ("label", "labels") if multi_label else ("label",):
        # MLflow's spark_udf writes a string column's None as "None": unreadable images
        # have no label, as in predict's output
        scored = scored.withColumn(text, F.when(F.col("error") == "", F.col(text)))
    if empties := empty_files(images):
        schema = output_schema(model.classes, multi_label, sha256)
        scored = scored.unionByName(unreadable_rows(spark, empties, [b""] * len(empties), schema))
    return scored


def write_log(rows: DataFrame, log_dir: str, model: str, model_version: str) -> None:
    """Append scored rows (with ``sha256``) to the prediction log in its layout,
    ``<log_dir>/date=YYYY-MM-DD/part-<partition>-<job>.parquet``, written by the executors
    with Spark's commit protocol: one file per partition, none from a failed attempt."""
    from pyspark.sql import functions as F

    now = datetime.now(timezone.utc)
    spark = rows.sparkSession
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    leading = [
        F.lit(now).cast("timestamp").alias("time"),
        F.lit(model).alias("model"),
        F.lit(model_version).alias("model_version"),
        "path",
        "sha256",
        "label",
        "score",
    ]
    others = [c for c in rows.columns if c not in {"path", "sha256", "label", "score"}]
    (
        rows.select(*leading, *others)
        .withColumn("date", F.lit(f"{now:%Y-%m-%d}"))
        .write.mode("append")
        .partitionBy("date")
        .parquet(_spark_path(log_dir))
    )


@dataclass
class SparkJob:
    written: int  # rows in the output, error rows included
    failed: int  # rows with an error
    unknown: int  # rows labelled unknown
    missing: list[str]  # local inputs that do not exist (an error row each)


def _prepare_out(out: str) -> None:
    """Spark overwrites ``out`` as a whole: only a folder it wrote before (its _SUCCESS
    marker) may be replaced, never anything else a path could name by mistake."""
    if "://" in out:
        return
    path = Path(out)
    if path.exists() and not (path / "_SUCCESS").is_file():
        raise FileExistsError(
            f"--out {out} exists and is not an output of --engine spark: pick a new folder "
            "(Spark writes a Parquet dataset, a folder)"
        )


def predict_spark(
    inputs: Sequence[str],
    out: str,
    *,
    model: str,
    store: MlflowConfig,
    master: str | None = None,
    multi_label: bool = False,
    log_dir: str | None = None,
    arrow_batch: int = ARROW_BATCH,
) -> SparkJob:
    """``opensig predict --engine spark``: every image below ``inputs`` scored by ``model``
    on Spark, written by the executors as a Parquet dataset ``out`` with predict's columns,
    and appended to the prediction log ``log_dir`` when given."""
    from pyspark.sql import functions as F

    from opensig.tracking.model_uri import model_identity
    from opensig.tracking.store import tracking_uri

    _prepare_out(out)
    local = [i for i in inputs if "://" not in i and not i.startswith("file:")]
    missing = [i for i in local if not GLOB & set(i) and not Path(i).exists()]
    present = [i for i in inputs if i not in missing]
    fetched = SparkModel.fetch(model, store)  # before Spark starts: a bad URI fails in seconds
    spark = session(master)
    images = read_images(spark, present) if present else _empty(spark)
    if not missing and not images.inputFiles():
        raise NoInputs("no files found in the given inputs")
    rows = score(
        images,
        fetched,
        multi_label=multi_label,
        arrow_batch=arrow_batch,
        sha256=log_dir is not None,
    )
    if missing:
        schema = output_schema(fetched.classes, multi_label, log_dir is not None)
        rows = rows.unionByName(unreadable_rows(spark, missing, missing, schema))
    rows = rows.persist()  # scored once, written twice: the output and the log
    try:
        columns = [c for c in rows.columns if c != "sha256"]
        rows.select(*columns).write.mode("overwrite").parquet(_spark_path(out))
        if log_dir is not None:
            name, version = model_identity(model, fetched.bundle, tracking_uri(store))
            write_log(rows, log_dir, name, version)
        counts = rows.agg(
            F.count("*").alias("written"),
            F.sum((F.col("error") != "").cast("int")).alias("failed"),
            F.sum((F.col("label") == UNKNOWN_LABEL).cast("int")).alias("unknown"),
        ).first()
    finally:
        rows.unpersist()
    job = SparkJob(counts.written, counts.failed or 0, counts.unknown or 0, missing)
    report_job(out, job.written, job.failed, job.unknown, missing)
    return job


def _empty(spark: SparkSession) -> DataFrame:
    return spark.createDataFrame([], "path string, content binary")
