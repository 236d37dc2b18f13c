"""params.yaml -> one typed, validated config object.

Every knob of the pipeline lives in params.yaml, grouped by stage (DVC's convention), and
is validated here before any work starts, so a typo fails in a second with the key's name
instead of an hour into training.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)

from opensig.backbones import backbone_problem  # imports timm only for a name it has not seen
from opensig.data.images import MAX_IMAGE_PIXELS
from opensig.redaction import redact, uri_credentials
from opensig.workspace import shared_path

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    root: Path = Path("data")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    holdout_unknown: list[str] = Field(
        default_factory=list,
        description="unknown sources (sub-folders of data/unknown) kept for the test split only",
    )
    split_seed: int = 0
    cache_dir: Path = Field(
        Path("artifacts/cache"),
        description="ingest probes, decoded images and resumable training state",
    )
    labels_csv: Path | None = Field(
        None,
        description="path,labels CSV (labels 'a|b', empty = unknown) instead of class folders",
    )
    # Pillow refuses anything above twice its 89.5 Mpx bomb limit, whatever this says.
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS, ge=1, le=178_956_970, description="larger images are refused (bombs)"
    )

    @field_validator("cache_dir")
    @classmethod
    def _the_projects_cache(cls, value: Path) -> Path:
        """A DVC experiment run in a temporary copy (`--temp`, `--queue`) shares the
        project's cache instead of filling one in its copy (``opensig.workspace``)."""
        return shared_path(value)

    @model_validator(mode="after")
    def _fractions_leave_train(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "data.val_fraction + data.test_fraction must be below 1 to leave a train split"
            )
        return self


class AugmentConfig(_Section):
    scale_min: float = Field(0.8, gt=0.0, le=1.0, description="RandomResizedCrop area range")
    rotate: float = Field(10.0, ge=0.0, le=180.0, description="max rotation, degrees")
    hflip: bool = False
    brightness_contrast: float = Field(0.1, ge=0.0, le=1.0)
    erase: float = Field(0.0, ge=0.0, le=1.0, description="random erasing probability")
    trivial: bool = Field(False, description="TrivialAugment: one random op of 14 per image")


class ModelConfig(_Section):
    backbone: str = "resnet18"
    pretrained: bool = False
    pretrained_file: Path | None = None
    image_size: int = Field(32, ge=8)
    in_chans: Literal[1, 3] = 3

    @field_validator("backbone")
    @classmethod
    def _timm_knows(cls, value: str) -> str:
        problem = backbone_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("pretrained_file")
    @classmethod
    def _is_a_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file (a path relative to the project folder)")
        return value


class TrainConfig(_Section):
    method: Literal[
        "sigmoid_bce",
        "sigmoid_bce_known_only",
        "softmax_msp",
        "softmax_maxlogit",
        "softmax_kplus1",
        "softmax_eos",
    ] = "sigmoid_bce"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    ema_decay: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="exponential moving average of the weights (validated and saved); 0: off",
    )
    unknown_weight: float = Field(3.0, ge=0.0)
    mixed_unknowns: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of each batch replaced by blends of 2 classes"
    )
    rotated_unknowns: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of each batch replaced by known images turned 90 or 270 degrees",
    )
    rotation_loss: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="weight of the self-supervised rotation task (a head, dropped after "
        "training, learns the turn of turned copies of half of each batch); 0: off",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    num_workers: NonNegativeInt | Literal["auto"] = Field(
        "auto", description="DataLoader processes; auto: 0 on CPU (they would steal its cores)"
    )
    decode_cache: bool = Field(True, description="decode + resize each image once, not per epoch")
    decode_cache_max_gb: float | None = Field(
        None,
        ge=0.0,
        description="decode cache size cap (GB, every image size); images beyond it are "
        "decoded every epoch; null: half the disk space the cache could use",
    )
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the model (slow start, faster steps)")
    seed: int = 0
    augment: AugmentConfig = AugmentConfig()
    init_from: str | None = Field(
        None, description="null | champion | a model folder or models:/ / runs:/ URI to start from"
    )

    @field_validator("init_from")
    @classmethod
    def _a_model(cls, value: str | None) -> str | None:
        if value is None or value == "champion" or value.startswith(("models:/", "runs:/")):
            return value
        if not (Path(value) / "config.json").is_file():
            raise ValueError(
                f"{value!r} is not a model folder (no config.json): use null, champion, a model "
                "folder (e.g. a copy of artifacts/model) or a models:/ or runs:/ URI"
            )
        return value


class TuneConfig(_Section):
    strategy: Literal["f1", "precision", "fixed", "doc"] = "f1"
    target_precision: float = Field(0.95, gt=0.0, le=1.0)
    fixed_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    doc_k: float = Field(3.0, gt=0.0, description="DOC: threshold = max(0.5, 1 - k * sigma)")
    feature_score: Literal[
        "mahalanobis", "mahalanobis++", "rmd", "knn", "mahalanobis+ratio", "none"
    ] = Field("mahalanobis", description="post-hoc score on the penultimate features (posthoc.py)")
    knn_k: int = Field(
        50, ge=1, description="knn, mahalanobis+ratio: the neighbour whose similarity counts"
    )
    feature_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="the feature score's share of the vote (posthoc.py)"
    )


class EvaluateConfig(_Section):
    batch_size: int = Field(256, ge=1)


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="null: $MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db"
    )
    experiment: str = "opensig"
    registered_model: str = "opensig"
    # MLflow's own defaults (7 retries, exponential backoff, 120 s per request) can hang a
    # stage for many minutes on a dead server; 10 is MLflow's upper limit.
    retries: int = Field(3, ge=0, le=10, description="HTTP retries per tracking-server request")
    timeout: int = Field(30, ge=1, description="seconds per tracking-server HTTP request")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value and (found := uri_credentials(value)):
            raise ValueError(
                f"holds {found}; params.yaml is committed to git, so leave credentials out and "
                "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN "
                "(or put the whole URI in $MLFLOW_TRACKING_URI and set this key to null)"
            )
        return value


class PromoteConfig(_Section):
    metric: Literal[
        "macro_f1",
        "known_ccr",
        "known_accuracy",
        "unknown_recall",
        "auroc",
        "fpr95",
        "oscr",
        "ece",
        "novel.auroc",
        "novel.fpr95",
        "novel.oscr",
        "novel.unknown_recall",
    ] = "macro_f1"
    min_delta: float = Field(0.0, ge=0.0)
    guard: list[
        Literal[
            "known_accuracy",
            "known_ccr",
            "unknown_recall",
            "auroc",
            "novel.auroc",
            "novel.unknown_recall",
        ]
    ] = Field(
        ["novel.auroc", "novel.unknown_recall", "known_accuracy"],
        description="metrics a promotion may not drop by more than max_drop (promotion.py)",
    )
    max_drop: float | None = Field(
        None, ge=0.0, le=1.0, description="null: each guard's 95% sampling interval on test"
    )


class RetrainConfig(_Section):
    """The scheduled retraining flow (pipelines/retrain.py); no stage depends on it."""

    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    push: bool = Field(False, description="dvc push after a successful run (needs a remote)")
    commit: bool = Field(False, description="git commit data.dvc and dvc.lock after a run")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not an IANA time zone name such as UTC or Europe/Paris") from None
        return value

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        return five_field_cron(value)


class MonitorConfig(_Section):
    """The prediction log and `opensig monitor` (a current window against a reference)."""

    log_dir: str | None = Field(
        None, description="prediction log folder or fsspec URL; null: log only with --log"
    )
    window: int | str = Field(
        "7d",
        description="the current window, sliding: the latest time span ('7d', '24h', '30min') "
        "or the latest rows (a count); with a span, the reference is the version's first span",
    )
    reference_size: int = Field(
        1000, ge=1, description="rows in the reference (the first), when window is a count"
    )
    min_rows: int = Field(100, ge=1, description="fewer rows in a window: status too_few_rows")
    alpha: float = Field(0.01, gt=0.0, lt=1.0, description="significance level of every test")
    min_unknown_rate_change: float = Field(0.05, ge=0.0, le=1.0)
    min_class_share_change: float = Field(0.05, ge=0.0, le=1.0)
    min_error_rate_change: float = Field(0.02, ge=0.0, le=1.0)
    min_psi: float = Field(0.2, ge=0.0, description="max-score PSI needed (with KS) to alert")
    cron: str = "0 * * * *"
    review_dir: Path = Path("review")
    review_max: int = Field(200, ge=1, description="images per review batch at most")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        return five_field_cron(value)

    @field_validator("window")
    @classmethod
    def _rows_or_span(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("a window of rows holds at least 1")
            return value
        span(value)
        return value


_SPAN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(min|h|d|w)\s*")
_SPAN_UNITS = {"min": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def span(text: str) -> timedelta:
    """'7d', '24h', '30min', '2w' as a time span; anything else is refused, saying how."""
    match = _SPAN.fullmatch(text)
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"{text!r}: a row count or a time span such as 7d, 24h, 30min, 2w")
    return timedelta(**{_SPAN_UNITS[match[2]]: float(match[1])})


def five_field_cron(value: str) -> str:
    """A cron line's shape; the full syntax check needs Prefect (heavy), so the flows run it
    before any work."""
    if len(value.split()) != 5:
        raise ValueError("a cron line has 5 fields: minute hour day month weekday")
    return value


class ScoreConfig(_Section):
    """The batch-scoring flow opensig-batch-score (pipelines/score.py): the champion scores
    a folder or URL on Spark; no stage depends on it."""

    inputs: list[str] = Field(
        default_factory=list, description="folders, files, globs or URLs Spark reads"
    )
    out: str = Field("predictions/batch", description="each run writes a Parquet folder below")
    model: str | None = Field(None, description="null: models:/<mlflow.registered_model>@champion")
    spark_master: str | None = Field(None, description="null: spark-submit's, else local[*]")
    spark_batch: int = Field(64, ge=1, description="images per Arrow batch")
    cron: str = "0 2 * * *"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        return five_field_cron(value)


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    mlflow: MlflowConfig = MlflowConfig()
    promote: PromoteConfig = PromoteConfig()
    retrain: RetrainConfig = RetrainConfig()
    monitor: MonitorConfig = MonitorConfig()
    score: ScoreConfig = ScoreConfig()


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid setting(s):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling against params.yaml docs)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {redact(repr(e.get('input')))})")
    return "\n".join(lines)


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    """One line naming the file, line and column, instead of PyYAML's multi-line report."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:  # e.g. a byte that is not UTF-8: the message names the file and position
        return f"{path}: not valid YAML: {' '.join(str(err).split())}"
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}"
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    opened = f" ({context} opened at line {start.line + 1})" if context and start else ""
    return f"{where}: not valid YAML: {err.problem}{opened}; fix the file there"


def parse_config(raw: dict, source: Path = DEFAULT_PARAMS) -> Config:
    """Validate an already-loaded params mapping; errors name `source` and the key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_config(path: Path = DEFAULT_PARAMS) -> Config:
    """Read and validate a params file. Paths inside stay relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: params file not found (run from the project folder or pass --params)"
        )
    try:
        with path.open("rb") as stream:  # from the file, so that YAML's messages name it
            raw = yaml.safe_load(stream) or {}
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_error(path, err)) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (data:, model:, ...) at top level"
        )
    return parse_config(raw, path)
