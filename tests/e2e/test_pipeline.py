"""The real stages, end to end, on the digits demo with a real SQLite MLflow store."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from opensig.cli import app
from opensig.config import load_config
from opensig.model import model_digest
from opensig.tracking.runs import EPOCH_METRICS
from tests.conftest import METRIC_KEYS, REPO, TOOLS_ENV, answers, background, tool, write_params
from tests.test_plots import CSVS, PICTURES

STAGES = ["ingest", "train", "tune", "evaluate", "register"]

pytestmark = pytest.mark.e2e


def run_cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"opensig {' '.join(args)} failed:\n{result.output}"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> Path:
    """Run every stage once in a fresh project folder; tests then inspect its outputs."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(digits_data, root / "data")
    write_params(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in STAGES:
            run_cli(stage)
    return root


@pytest.fixture
def in_pipeline(pipeline: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(pipeline)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    return pipeline


def test_metrics_are_complete_and_far_above_chance(in_pipeline: Path) -> None:
    metrics = json.loads(Path("reports/metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["known_accuracy"] > 0.85  # chance is 1/6 for the six known digits
    assert metrics["auroc"] > 0.75
    assert metrics["macro_f1"] > 0.5
    novel = metrics["novel"]
    assert set(novel) >= {"auroc", "fpr95", "oscr", "unknown_recall"}
    assert novel["n_novel"] > 300  # digits 8 and 9, test only
    assert novel["auroc"] > 0.6


def test_outputs_and_manifest(in_pipeline: Path) -> None:
    manifest = pd.read_parquet("artifacts/manifest.parquet")
    assert len(manifest) == 1797
    assert set(manifest[manifest["novel"]]["split"]) == {"test"}
    assert set(manifest[manifest["novel"]]["source"]) == {"8", "9"}
    for path in [
        "artifacts/model/weights.safetensors",
        "artifacts/model/config.json",
        "artifacts/checkpoints/last/weights.safetensors",
        "reports/train.json",
        "reports/train/train_history.csv",
        "reports/train/loss.png",
    ]:
        assert Path(path).is_file(), path
    confusion = pd.read_csv("reports/plots/confusion.csv")
    assert "unknown" in set(confusion["actual"])
    thresholds = json.loads(Path("artifacts/thresholds.json").read_text())
    assert thresholds["strategy"] == "f1"
    assert sorted(thresholds["thresholds"]) == ["0", "1", "2", "3", "4", "5"]
    assert thresholds["model_sha256"] == model_digest(Path("artifacts/model"))  # tuned for it


def test_scores_are_calibrated_probabilities_with_readable_thresholds(in_pipeline: Path) -> None:
    """Issue 24: the scale is in the file, and every tuned threshold lands in [0.05, 0.95]."""
    thresholds = json.loads(Path("artifacts/thresholds.json").read_text())
    assert thresholds["score_scale"] == "probability"
    calibration = thresholds["feature_score"]["calibration"]
    assert calibration["k"] > 0 and calibration["u50"] > 0
    assert all(0.05 <= t <= 0.95 for t in thresholds["thresholds"].values()), thresholds
    # known test images mostly score high, unknown ones low: the scale reads as it says
    from opensig.data.manifest import read_manifest, split_rows
    from opensig.evaluation import evaluate_bundle
    from opensig.predict import Bundle

    result = evaluate_bundle(
        Bundle.load(Path("artifacts/model"), Path("artifacts/thresholds.json")),
        split_rows(read_manifest(Path("artifacts/manifest.parquet"), Path("data")), "test"),
    )
    top = result.scores.max(axis=1)
    assert np.median(top[result.labels >= 0]) > 0.8
    assert np.median(top[result.labels < 0]) < 0.2


def test_evaluate_writes_every_picture(in_pipeline: Path) -> None:
    plots = Path("reports/plots")
    assert {p.name for p in plots.iterdir()} == {*PICTURES, *CSVS}
    for name, (min_width, min_height) in PICTURES.items():
        with Image.open(plots / name) as image:
            assert image.format == "PNG"
            assert min_width <= image.size[0] <= 4000, (name, image.size)
            assert min_height <= image.size[1] <= 4000, (name, image.size)
    for name, columns in CSVS.items():
        frame = pd.read_csv(plots / name)
        assert list(frame.columns) == columns and len(frame) > 1, name
    # the digits demo holds out 8 and 9: both curves exist, and end at (1, 1)
    for name in ("roc_seen_unknown.csv", "roc_novel_unknown.csv"):
        assert pd.read_csv(plots / name).iloc[-1].tolist() == [1.0, 1.0], name


def test_registered_as_champion_with_provenance(in_pipeline: Path) -> None:
    registered = json.loads(Path("reports/registered.json").read_text())
    assert registered["version"] == "1"
    assert set(registered["aliases"]) == {"champion", "challenger"}
    client = MlflowClient()
    run = client.get_run(registered["run_id"])
    assert run.data.params["train.method"] == "sigmoid_bce"
    assert run.data.metrics["macro_f1"] == pytest.approx(
        json.loads(Path("reports/metrics.json").read_text())["macro_f1"]
    )
    assert "novel/auroc" in run.data.metrics
    assert "opensig_version" in run.data.tags
    reports = {a.path for a in client.list_artifacts(registered["run_id"], "reports")}
    assert {"reports/metrics.json", "reports/train.json"} <= reports
    top = {a.path for a in client.list_artifacts(registered["run_id"])}
    assert {*PICTURES, "loss.png"} <= top  # the Compare page shows these side by side
    images = {a.path for a in client.list_artifacts(registered["run_id"], "images")}
    for name in [*PICTURES, "loss.png"]:  # keyed images: the chart view compares them
        stem = Path(name).stem
        assert any(path.startswith(f"images/pictures~{stem}+step+0+") for path in images)


def test_train_and_register_share_one_run_with_epoch_curves(in_pipeline: Path) -> None:
    run_id = json.loads(Path("reports/train.json").read_text())["mlflow_run_id"]
    assert run_id == json.loads(Path("reports/registered.json").read_text())["run_id"]
    client = MlflowClient()
    epochs = load_config().train.epochs
    history = pd.read_csv("reports/train/train_history.csv")
    for key in EPOCH_METRICS:
        logged = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in logged] == list(range(1, epochs + 1)), key
        assert [m.value for m in logged] == pytest.approx(history[key].tolist()), key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "macro_f1" in run.data.metrics and run.data.params["train.epochs"] == str(epochs)


def test_predict_by_alias_with_a_bad_file(in_pipeline: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    manifest = pd.read_parquet("artifacts/manifest.parquet")
    test_known = manifest[(manifest["split"] == "test") & (manifest["label"] != "unknown")]
    for path in test_known["path"].head(20):
        shutil.copy(path, photos / Path(path).name)
    (photos / "broken.png").write_text("not an image")
    out = tmp_path / "preds.csv"
    run_cli("predict", "--model", "models:/opensig@champion", str(photos), "--out", str(out))
    preds = pd.read_csv(out, dtype={"label": str})
    assert len(preds) == 21
    broken = preds[preds["path"].str.endswith("broken.png")]
    assert broken["error"].str.contains("not an image").all()
    good = preds[preds["error"].isna()]
    truth = {
        Path(p).name: label
        for p, label in zip(test_known["path"], test_known["label"], strict=True)
    }
    correct = sum(
        truth[Path(p).name] == label for p, label in zip(good["path"], good["label"], strict=True)
    )
    assert correct >= 14
    assert {f"score_{c}" for c in "012345"} <= set(preds.columns)

    # nothing predictable: every row an error row, exit code 2 (docs/predict-and-serve.md)
    broken_only = tmp_path / "broken"
    broken_only.mkdir()
    (broken_only / "a.png").write_text("not an image")
    nothing = CliRunner().invoke(
        app,
        [
            "predict",
            "--model",
            "models:/opensig@champion",
            str(broken_only),
            "--out",
            str(tmp_path / "none.csv"),
        ],
    )
    assert nothing.exit_code == 2, nothing.output
    assert pd.read_csv(tmp_path / "none.csv")["error"].str.contains("not an image").all()

    jsonl = tmp_path / "preds.jsonl"
    run_cli(
        "predict",
        "--model",
        "artifacts/model",
        "--thresholds",
        "artifacts/thresholds.json",
        str(photos),
        "--out",
        str(jsonl),
    )
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["label"] for r in rows] == [None if pd.isna(x) else x for x in preds["label"]]


def test_pyfunc_model_answers_from_paths_and_bytes(
    in_pipeline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENSIG_SERVE_ROOT", str(Path("data").resolve()))  # path rows allowed
    model = mlflow.pyfunc.load_model("models:/opensig@champion")
    image = next(Path("data/known/3").iterdir())
    by_path = model.predict(pd.DataFrame({"path": [str(image)]}))
    by_bytes = model.predict(pd.DataFrame({"image": [image.read_bytes()]}))
    assert by_path["label"].iloc[0] == by_bytes["label"].iloc[0]
    assert by_path["score_3"].iloc[0] == pytest.approx(by_bytes["score_3"].iloc[0])


def test_served_model_decides_the_test_split_exactly_as_evaluate_did(
    in_pipeline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feature score fitted in tune travels with the model: the bundle reloaded from
    disk and the registered pyfunc give evaluate's decisions, image for image."""
    from opensig.data.manifest import read_manifest, split_rows
    from opensig.evaluation import evaluate_bundle
    from opensig.predict import Bundle

    described = json.loads(Path("artifacts/thresholds.json").read_text())["feature_score"]
    assert described["kind"] == load_config().tune.feature_score == "mahalanobis"
    assert Path("artifacts", described["file"]).is_file()
    rows = split_rows(read_manifest(Path("artifacts/manifest.parquet"), Path("data")), "test")
    evaluation = evaluate_bundle(
        Bundle.load(Path("artifacts/model"), Path("artifacts/thresholds.json")), rows
    )
    metrics = json.loads(Path("reports/metrics.json").read_text())
    assert evaluation.metrics["macro_f1"] == pytest.approx(metrics["macro_f1"])
    expected = [evaluation.classes[k] if k >= 0 else "unknown" for k in evaluation.preds]
    monkeypatch.setenv("OPENSIG_SERVE_ROOT", str(Path("data").resolve()))
    served = mlflow.pyfunc.load_model("models:/opensig@champion")
    answers = served.predict(pd.DataFrame({"path": [str(p) for p in rows["path"]]}))
    assert answers["label"].tolist() == expected
    for k, name in enumerate(evaluation.classes):
        assert answers[f"score_{name}"].to_numpy() == pytest.approx(evaluation.scores[:, k])


@pytest.mark.parametrize("feature_score", ["mahalanobis", "knn", "mahalanobis+ratio"])
def test_onnx_graph_computes_the_feature_score_as_opensig_does(
    in_pipeline: Path, tmp_path: Path, feature_score: str
) -> None:
    """The trained model, with each feature score fitted as tune fits it, exported: ONNX
    Runtime gives opensig's scores and, with the stored thresholds, its decisions."""
    ort = pytest.importorskip("onnxruntime", reason="pip install 'opensig[export]'")
    from opensig.data.manifest import read_manifest, split_rows
    from opensig.decision import write_thresholds
    from opensig.export import export_onnx
    from opensig.labels import UNKNOWN
    from opensig.model import load_model_dir
    from opensig.predict import Bundle
    from opensig.thresholds import decide
    from opensig.tuning import fit_decision
    from tests.test_export import pixels

    manifest = read_manifest(Path("artifacts/manifest.parquet"), Path("data"))
    model, spec = load_model_dir(Path("artifacts/model"))
    values, fitted = fit_decision(
        model=model,
        spec=spec,
        train_rows=split_rows(manifest, "train"),
        val_rows=split_rows(manifest, "val"),
        multi_label=False,
        strategy="f1",
        options={},
        feature_score=feature_score,
    )
    folder = tmp_path / "model"
    shutil.copytree("artifacts/model", folder)
    write_thresholds(
        folder / "thresholds.json",
        spec.classes,
        values,
        "f1",
        {},
        model_sha256=model_digest(folder),
        feature_score=fitted,
    )
    bundle = Bundle.load(folder)
    images = [Path(p) for p in split_rows(manifest, "test")["path"]]
    scores, _ = bundle.score(images, progress=False)
    session = ort.InferenceSession(str(export_onnx(bundle, tmp_path / "m.onnx")))
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["feature_score"]["kind"] == feature_score
    assert meta["score_scale"] == ("head" if feature_score == "none" else "probability")
    onnx_scores = session.run(None, {"images": pixels(bundle, images)})[0]
    # two runtimes' float32 kernels, whose sums depend on how the threads split the work: one
    # score in 3504 moved by 0.5% (1.3e-4) in a fresh-clone run on a loaded machine
    np.testing.assert_allclose(onnx_scores, scores, rtol=1e-2, atol=1e-4)
    decided = decide(onnx_scores, np.array(meta["thresholds"]))
    labels = [spec.classes[k] if k != UNKNOWN else "unknown" for k in decided]
    assert labels == bundle.predict(images, progress=False)["label"].tolist()


def test_second_registration_keeps_champion_unless_better(in_pipeline: Path) -> None:
    write_params(in_pipeline, {"promote": {"min_delta": 0.5}})
    run_cli("register")  # the same bundle again: reused, not registered twice
    assert json.loads(Path("reports/registered.json").read_text())["version"] == "1"
    thresholds = Path("artifacts/thresholds.json")
    thresholds.write_text(thresholds.read_text() + "\n")  # same model, new bytes: a new bundle
    run_cli("register")
    registered = json.loads(Path("reports/registered.json").read_text())
    assert registered["version"] == "2"
    assert registered["aliases"] == ["challenger"]
    assert registered["promoted"] is False
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("opensig", "champion").version) == "1"
    tags = client.get_model_version("opensig", "2").tags
    assert tags["promote.decision"] == "kept champion"
    assert tags["promote.champion_version"] == "1"
    # Same model, same test split: the champion re-measured gives the challenger's value.
    assert float(tags["promote.champion_value"]) == pytest.approx(
        float(tags["promote.challenger_value"])
    )


def test_the_gate_keeps_a_champion_that_wins_on_the_metric_but_drops_a_guard(
    in_pipeline: Path, tmp_path: Path
) -> None:
    """A real pair of models, judged on the real test split: the pipeline's bundle (as the
    champion of a registered model of its own) and the same network with every threshold
    at 0.02, which accepts more known images (known_ccr up) and far fewer unknowns."""
    from opensig.config import parse_config
    from opensig.data.manifest import read_manifest, split_rows
    from opensig.evaluation import evaluate_bundle
    from opensig.predict import Bundle
    from opensig.tracking.promotion import Registration, champion_judge, register_and_promote

    raw = load_config(Path("params.yaml")).model_dump(mode="json")
    raw["mlflow"].update(registered_model="guarded", tracking_uri="sqlite:///mlflow.db")
    raw["promote"] = {"metric": "known_ccr", "guard": ["unknown_recall", "novel.auroc"]}
    rows = split_rows(read_manifest(Path("artifacts/manifest.parquet"), "data"), "test")

    def register(cfg_raw: dict, model: Path, thresholds: Path) -> Registration:
        bundle = Bundle.load(model, thresholds, "cpu")
        return register_and_promote(
            parse_config(cfg_raw),
            tracking_uri="sqlite:///mlflow.db",
            metrics=evaluate_bundle(bundle, rows).metrics,
            model_dir=model,
            thresholds=thresholds,
            artifacts=[],
            train_run=None,
            judge_champion=champion_judge(
                tracking_uri="sqlite:///mlflow.db",
                name="guarded",
                rows=rows,
                multi_label=False,
                device="cpu",
                batch_size=256,
            ),
        )

    first = register(raw, Path("artifacts/model"), Path("artifacts/thresholds.json"))
    assert first.promoted and first.comparison["reason"] == "no champion yet"
    low = tmp_path / "low"
    low.mkdir()
    shutil.copy("artifacts/feature_score.safetensors", low)
    tuned = json.loads(Path("artifacts/thresholds.json").read_text())
    tuned["thresholds"] = dict.fromkeys(tuned["thresholds"], 0.02)
    (low / "thresholds.json").write_text(json.dumps(tuned))

    kept = register(raw, Path("artifacts/model"), low / "thresholds.json")
    assert kept.comparison["gain"] > 0  # it wins on promote.metric ...
    assert not kept.promoted and kept.aliases == ["challenger"]  # ... and is not promoted
    assert "unknown_recall" in kept.comparison["reason"] and "blocks" in kept.comparison["reason"]
    tags = MlflowClient("sqlite:///mlflow.db").get_model_version("guarded", kept.version).tags
    assert tags["promote.decision"] == "kept champion"
    assert {line.split(":")[0] for line in tags["promote.guards"].split("; ")} == {
        "unknown_recall",
        "novel.auroc",
    }
    # a drop of up to 1 allowed: the same challenger, judged again, wins
    raw["promote"]["max_drop"] = 1.0
    allowed = register(raw, Path("artifacts/model"), low / "thresholds.json")
    assert allowed.promoted and allowed.version == kept.version


def _quick_start() -> list[str]:
    """The bash blocks of README.md's quick start (between its quickstart markers)."""
    text = (REPO / "README.md").read_text()
    region = text.split("<!-- quickstart -->")[1].split("<!-- /quickstart -->")[0]
    return re.findall(r"```bash\n(.*?)```", region, flags=re.S)


def test_the_readmes_quick_start_works_as_pasted(in_pipeline: Path, tmp_path: Path) -> None:
    """Each command as written, in a project as `make demo` leaves it: this module's
    pipeline on the digits, the repository's venv and DVC files beside it."""
    look, serve, ask = _quick_start()
    if not (in_pipeline / ".venv").exists():
        (in_pipeline / ".venv").symlink_to(REPO / ".venv")
        shutil.copy(REPO / "dvc.yaml", in_pipeline)
        assert tool("dvc", "init", "--no-scm", "-q", cwd=in_pipeline).returncode == 0
    env = {**TOOLS_ENV, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    shown = subprocess.run(
        ["bash", "-e", "-c", look], cwd=in_pipeline, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "macro_f1" in shown.stdout and "novel.auroc" in shown.stdout  # dvc metrics show
    preds = pd.read_csv(in_pipeline / "preds.csv", dtype={"label": str})
    threes = preds[preds["path"].str.contains("known/3/")]
    assert len(preds) == len(list(Path("data/unknown/8").iterdir())) + len(threes) > 0
    assert (threes["label"] == "3").mean() > 0.8

    with background(
        ["bash", "-e", "-c", serve],
        tmp_path / "serve.log",
        answers("http://127.0.0.1:5001/ping"),
        180,
        cwd=in_pipeline,
        env=env,
    ):
        asked = subprocess.run(
            ["bash", "-e", "-c", ask], cwd=in_pipeline, env=env, capture_output=True, text=True
        )
    assert asked.returncode == 0, asked.stderr
    (answer,) = json.loads(asked.stdout)["predictions"]
    assert answer["label"] == "3" and answer["error"] == ""
