"""Registration and the promotion gate: every new version becomes ``challenger``; it becomes
``champion`` when there is none yet, or when it beats the champion on ``promote.metric``
by ``promote.min_delta`` and drops none of the ``promote.guard`` metrics by more than
``promote.max_drop``, all measured on the current test split. The comparison is recorded
as tags on the new version so a promotion can always be explained.

A guard's allowed drop, when ``max_drop`` is null, is the sampling noise of the champion's
value on this test split: its distance to the lower end of the 95% Wilson interval, with
the images the metric counts (an AUROC as a proportion on the smaller of its two groups,
wider than Hanley & McNeil's interval, so noise never blocks). A drop beyond that is
unlikely to be chance, whatever the sizes of the test split.

Registration is idempotent: the run is tagged with the bundle's content digest before the
model is registered, so re-running after a failure (server down, alias call lost) reuses
the version already made instead of adding a duplicate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException

from opensig.config import Config, PromoteConfig
from opensig.model import read_spec
from opensig.redaction import redact
from opensig.tracking.model_uri import resolve_model_dir
from opensig.tracking.packaging import bundle_digest, log_model
from opensig.tracking.runs import RunSpec, flatten, logged_run, mlflow_metric_name
from opensig.tracking.store import existing_run, missing

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
LOWER_IS_BETTER = {"fpr95", "ece"}
DIGEST_TAG = "bundle_sha256"  # run tag: what makes a re-run find its earlier registration

ChampionJudge = Callable[[str, Sequence[str]], tuple[dict, list[str]]]
"""(version, today's classes) -> (its metrics on today's test split and classes, its own
classes): how the gate measures the champion."""


@dataclass
class Registration:
    name: str
    version: str
    run_id: str
    aliases: list[str]
    promoted: bool
    comparison: dict

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Verdict:
    """The gate's verdict, reached before anything is registered or re-aliased."""

    promoted: bool
    comparison: dict
    already_champion: bool = False


def metric_value(metrics: dict, name: str) -> float | None:
    """``name`` may be nested, e.g. ``novel.auroc``; None when undefined (e.g. no unknowns)."""
    return flatten(metrics).get(name)


def compare(
    metric: str, challenger: float | None, champion: float | None, min_delta: float
) -> tuple[bool, float | None, str]:
    """Does the challenger beat the champion by more than ``min_delta``? (promoted, gain, why)."""
    if challenger is None or champion is None:
        return False, None, f"{metric} is undefined on the test split; champion kept"
    lower_is_better = metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER
    gain = champion - challenger if lower_is_better else challenger - champion
    promoted = gain > min_delta + 1e-12  # float noise is not a win
    return promoted, gain, f"gain {gain:+.4f} {'>' if promoted else '<='} min_delta {min_delta}"


GUARD_COUNTS = {  # guard -> the metrics' counts of the images it is measured on
    "known_accuracy": ("n_known",),
    "known_ccr": ("n_known",),
    "unknown_recall": ("n_unknown",),
    "auroc": ("n_known", "n_unknown"),
    "novel.auroc": ("n_known", "novel.n_novel"),
    "novel.unknown_recall": ("novel.n_novel",),
}


def noise_allowance(value: float, count: int) -> float:
    """How far a rate measured as ``value`` on ``count`` images may fall by chance: its
    distance to the lower end of the 95% Wilson score interval (non-zero even at 1.0)."""
    from scipy.stats import norm

    z = norm.ppf(0.975)
    centre = (value + z * z / (2 * count)) / (1 + z * z / count)
    half = z / (1 + z * z / count) * math.sqrt(value * (1 - value) / count + z * z / (4 * count**2))
    return max(value - (centre - half), 0.0)


def check_guards(
    guards: Sequence[str], challenger: dict, champion: dict, max_drop: float | None
) -> list[dict]:
    """One row per guard: both values, the drop, the drop allowed (``max_drop``, or the
    champion's sampling noise) and ``status``: ok, blocks, or skipped (undefined here)."""
    rows = []
    for name in guards:
        new, old = metric_value(challenger, name), metric_value(champion, name)
        counts = [metric_value(champion, key) for key in GUARD_COUNTS[name]]
        if new is None or old is None or not all(counts):
            rows.append({"metric": name, "status": "skipped", "reason": "undefined on test"})
            continue
        allowed = max_drop if max_drop is not None else noise_allowance(old, int(min(counts)))
        drop = old - new
        status = "blocks" if drop > allowed + 1e-12 else "ok"
        rows.append(
            {"metric": name, "champion": old, "challenger": new, "drop": drop}
            | {"allowed": allowed, "status": status}
        )
    return rows


def guard_text(row: dict) -> str:
    """One guard's row in a line, for tags, logs and the retrain flow's artifact."""
    if row["status"] == "skipped":
        return f"{row['metric']}: skipped ({row['reason']})"
    return (
        f"{row['metric']}: {row['champion']:.4f} -> {row['challenger']:.4f} (drop "
        f"{row['drop']:+.4f}, allowed {row['allowed']:.4f}): {row['status']}"
    )


def class_sets(classes: Sequence[str], champion_classes: Sequence[str]) -> dict:
    """How the champion's classes differ from today's: part of every comparison, so that a
    promotion across class sets (new data, a class added by review) explains itself."""
    lacks = sorted(set(classes) - set(champion_classes))
    extra = sorted(set(champion_classes) - set(classes))
    return {
        "class_sets": "differ" if lacks or extra else "same",
        "champion_lacks": lacks,  # today's classes the champion cannot name
        "champion_extra": extra,  # the champion's classes today's data no longer has
    }


class ModelRegistry:
    """One registered model (``name``) of one tracking store, whose runs live in
    ``experiment``: the client and names that every registry call needs."""

    def __init__(self, tracking_uri: str, name: str, experiment: str) -> None:
        self.tracking_uri, self.name, self.experiment = tracking_uri, name, experiment
        self.client = MlflowClient(tracking_uri)

    def find(self, digest: str) -> tuple[str, str] | None:
        """(run id, version) of the oldest version of this model logged from a run tagged
        with ``digest`` in the experiment; None if there is none."""
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return None
        runs = self.client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.{DIGEST_TAG} = '{digest}'"
        )
        versions = [
            v
            for run in runs
            for v in self.client.search_model_versions(
                f"name = '{self.name}' and run_id = '{run.info.run_id}'"
            )
        ]
        if not versions:
            return None
        oldest = min(versions, key=lambda v: int(v.version))
        return oldest.run_id, str(oldest.version)

    def champion(self) -> str | None:
        """The champion's version; None when there is none yet, or no such model yet."""
        # Read from the model, not by catching an alias lookup error: a server that fails to
        # answer must not look like "no champion yet" (that would promote any challenger).
        try:
            version = self.client.get_registered_model(self.name).aliases.get(CHAMPION)
        except MlflowException as err:
            if missing(err):
                return None
            raise
        return None if version is None else str(version)

    def aliases(self, version: str) -> list[str]:
        return sorted(self.client.get_model_version(self.name, version).aliases)

    def training_run(self, run_id: str | None, digest: str, params: dict[str, str]) -> str | None:
        """``run_id``, the training's run, when this registration may complete it; else None.

        It has to be in this store and experiment and not deleted, hold no other bundle (a
        run holds one registered model: its digest tag is how a re-run finds that model),
        and hold no other value of a param in ``params`` (MLflow never changes a logged
        param). Settings that are not logged (``mlflow``, ``promote``, ``retrain``) never
        break the link: a new ``mlflow.registered_model`` still completes the training's run.
        """
        if run_id is None:
            return None
        run = existing_run(self.client, run_id)
        experiment = self.client.get_experiment_by_name(self.experiment)
        if run is None or run.info.lifecycle_stage != LifecycleStage.ACTIVE:
            why = "not in this tracking store, or deleted"
        elif experiment is None or run.info.experiment_id != experiment.experiment_id:
            why = f"not in the experiment {self.experiment}"
        elif run.data.tags.get(DIGEST_TAG, digest) != digest:
            why = "it holds another registered bundle"
        elif changed := sorted(k for k, v in run.data.params.items() if params.get(k, v) != v):
            why = f"params changed since training: {', '.join(changed)}"
        else:
            return run_id
        log.info("register: a new MLflow run, not the training's run %s (%s)", run_id, why)
        return None

    def _require_logged_metric(self, version: str, metric: str) -> None:
        """A champion must be explainable: its run has to carry the metric it was chosen on."""
        run_id = self.client.get_model_version(self.name, version).run_id
        logged = self.client.get_run(run_id).data.metrics if run_id else {}
        if (logged_as := mlflow_metric_name(metric)) not in logged:
            raise RuntimeError(
                f"model {self.name} version {version}: its run {run_id} has no {metric!r} "
                f"metric ({logged_as!r} in MLflow: not logged, or undefined on the test "
                f"split), so it cannot become {CHAMPION}; "
                "the alias was not moved. Log the metric on that run (or delete the version "
                "and re-run register), or pick another promote.metric."
            )

    def judge(
        self,
        rule: PromoteConfig,
        challenger_metrics: dict,
        classes: Sequence[str],
        registered_version: str | None,
        judge_champion: ChampionJudge,
    ) -> Verdict:
        """Challenger vs champion by ``rule``, with every check that can fail: the champion's
        download and evaluation (``judge_champion``, e.g. :func:`champion_judge`), and the
        metric a promotion rests on. ``registered_version``: this bundle's version when it
        is registered already (a re-run), else None."""
        metric, delta = rule.metric, rule.min_delta
        challenger_value = metric_value(challenger_metrics, metric)
        champion = self.champion()
        comparison: dict = {
            "metric": metric,
            "min_delta": delta,
            "challenger_value": challenger_value,
        }
        if champion is not None and champion == registered_version:
            comparison.update(reason="already the champion", decision="already champion")
            return Verdict(True, comparison, already_champion=True)
        if champion is None:
            promoted, comparison["reason"] = True, "no champion yet"
        else:
            try:
                champion_metrics, champion_classes = judge_champion(champion, classes)
            except (MlflowException, OSError, ValueError, RuntimeError) as err:
                message = err.message if isinstance(err, MlflowException) else str(err)
                raise RuntimeError(
                    f"model {self.name}: the champion, version {champion}, could not be judged "
                    f"on the current test split ({redact(message)}); nothing was registered "
                    f"and no alias moved. Repair or delete that version, or move the "
                    f"{CHAMPION} alias, then re-run register."
                ) from None
            champion_value = metric_value(champion_metrics, metric)
            promoted, gain, comparison["reason"] = compare(
                metric, challenger_value, champion_value, delta
            )
            comparison.update(champion_version=champion, champion_value=champion_value, gain=gain)
            comparison.update(class_sets(classes, champion_classes))
            guards = check_guards(rule.guard, challenger_metrics, champion_metrics, rule.max_drop)
            comparison["guards"] = [guard_text(row) for row in guards]
            blocking = [row for row in guards if row["status"] == "blocks"]
            if promoted and blocking:
                promoted = False
                comparison["reason"] += "; but " + "; ".join(guard_text(r) for r in blocking)
        comparison["decision"] = "promoted" if promoted else "kept champion"
        if promoted and registered_version is not None:
            self._require_logged_metric(registered_version, metric)
        elif promoted and challenger_value is None:
            raise RuntimeError(
                f"{metric} is undefined on the test split (reports/metrics.json), so this model "
                f"cannot become {CHAMPION}; nothing was registered. Pick another "
                "promote.metric, or give the test split the images it needs."
            )
        return Verdict(promoted, comparison)

    def apply(self, version: str, verdict: Verdict) -> None:
        """Record the comparison as ``promote.*`` tags and move the aliases: ``challenger``
        to ``version``, and ``champion`` too when it won. The last step of a registration."""
        comparison = verdict.comparison
        if not verdict.already_champion:
            self.client.set_registered_model_alias(self.name, CHALLENGER, version)
            for key, value in comparison.items():
                joined = "; " if key == "guards" else ", "
                text = joined.join(value) if isinstance(value, list) else str(value)
                self.client.set_model_version_tag(self.name, version, f"promote.{key}", text)
            if verdict.promoted:
                self.client.set_registered_model_alias(self.name, CHAMPION, version)
        log.info(
            "model %s version %s: %s (%s)",
            self.name,
            version,
            comparison["decision"],
            comparison["reason"],
        )
        for line in comparison.get("guards", []):
            log.info("promote.guard %s", line)


def log_and_register(
    registry: ModelRegistry,
    spec: RunSpec,
    metrics: dict,
    model_dir: Path,
    thresholds: Path,
    artifacts: list[Path],
    train_run: str | None = None,
    log_dir: str | None = None,
) -> tuple[str, str]:
    """One MLflow run with the pyfunc model, registered. Returns (run id, model version).

    The run is the training's (``train_run``) when it can be
    (:meth:`ModelRegistry.training_run`), so that one run holds the epochs, the metrics and
    the model. ``log_dir``: where the served model logs its predictions (monitor.log_dir).
    """
    digest = bundle_digest(model_dir, thresholds)
    tags = {DIGEST_TAG: digest}  # set before the model is registered: a re-run then finds it
    run_id = registry.training_run(train_run, digest, spec.params)
    with logged_run(registry.tracking_uri, spec, metrics, artifacts, tags, run_id) as run:
        version = log_model(model_dir, thresholds, registry.name, log_dir)
    return run.info.run_id, version


def register_and_promote(
    cfg: Config,
    *,
    tracking_uri: str,
    metrics: dict,
    model_dir: Path,
    thresholds: Path,
    artifacts: list[Path],
    train_run: str | None,
    judge_champion: ChampionJudge,
) -> Registration:
    """Register the bundle and move the aliases, in an order that fails safe: the gate
    (:meth:`ModelRegistry.judge`) runs before anything is registered or re-aliased, so a
    failing champion evaluation or a missing metric leaves the registry as it was.

    Idempotent: a bundle already registered under this name (same content digest) reuses
    its run and version instead of adding a duplicate.
    """
    registry = ModelRegistry(tracking_uri, cfg.mlflow.registered_model, cfg.mlflow.experiment)
    classes = read_spec(model_dir).classes  # first: no model folder is named as such
    found = registry.find(bundle_digest(model_dir, thresholds))
    if found:
        log.info(
            "model %s: this bundle is already registered as version %s (run %s)",
            registry.name,
            found[1],
            found[0],
        )
    verdict = registry.judge(
        cfg.promote,
        metrics,
        classes,
        found[1] if found else None,
        judge_champion,
    )
    run_id, version = found or log_and_register(
        registry,
        RunSpec.of(cfg),
        metrics,
        model_dir,
        thresholds,
        artifacts,
        train_run,
        cfg.monitor.log_dir,
    )
    registry.apply(version, verdict)
    return Registration(
        registry.name,
        version,
        run_id,
        registry.aliases(version),
        verdict.promoted,
        verdict.comparison,
    )


def champion_judge(
    *,
    tracking_uri: str,
    name: str,
    rows: pd.DataFrame,
    multi_label: bool,
    device: str,
    batch_size: int,
) -> ChampionJudge:
    """The champion measured as evaluate measured the challenger: a version of the model
    ``name`` from ``tracking_uri``, downloaded and evaluated on ``rows`` (today's test
    split) in today's classes (:func:`opensig.evaluation.evaluate_bundle`)."""
    from opensig.evaluation import evaluate_bundle  # torch and the scoring path: only here
    from opensig.predict import Bundle

    def judge(version: str, classes: Sequence[str]) -> tuple[dict, list[str]]:
        uri = f"models:/{name}/{version}"
        champion = Bundle.load(resolve_model_dir(uri, tracking_uri), device=device)
        result = evaluate_bundle(champion, rows, batch_size, multi_label, classes)
        return result.metrics, champion.spec.classes

    return judge
