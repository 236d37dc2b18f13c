"""What DVC shows of the pipeline: `dvc metrics show` and `dvc exp show` lead with the figures a
person compares, and `dvc plots diff` of two commits draws every plot, offline, pictures
included.

One real git + DVC project per module (the repo's dvc.yaml, .gitignore and .dvc/ settings,
the digits demo), run up to evaluate twice and committed each time: thresholds tuned for
F1, then fixed at 0.9 (on the calibrated scale F1 lands at 0.5 on the demo), so that the two
commits' pictures differ.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from dvc_render.vega import VegaRenderer
from PIL import Image

from opensig.stages import HERE
from tests.conftest import REPO, write_params
from tests.e2e.test_retrain import sh

pytestmark = pytest.mark.e2e

VEGA_PLOTS = {"loss", "confusion", "roc", "oscr", "reliability"}
PNG_PLOTS = {"reports/plots/score_histograms.png", "reports/plots/worst_mistakes.png"}
TRAIN_METRICS = {"best_epoch", "best_val_loss", "final_train_loss", "final_val_loss"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> Path:
    root = tmp_path_factory.mktemp("dvc_views")
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root)
    shutil.copytree(REPO / "src", root / "src")  # stages depend on the code they run
    shutil.copytree(digits_data, root / "data")
    sh("git", "init", "-q", cwd=root)
    sh("git", "config", "user.email", "ci@example.com", cwd=root)
    sh("git", "config", "user.name", "ci", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")  # as a clone of the repo has them
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")
    sh("dvc", "add", "-q", "data", cwd=root)
    for strategy in ("f1", "fixed"):  # register needs MLflow and changes nothing DVC shows
        write_params(root, {"tune": {"strategy": strategy, "fixed_threshold": 0.9}})
        sh("dvc", "repro", "-q", "evaluate", cwd=root)
        sh("git", "add", "-A", cwd=root)
        sh("git", "commit", "-q", "-m", f"thresholds: {strategy}", cwd=root)
    return root


def test_metrics_are_only_the_figures_compared(repo: Path) -> None:
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo))
    files = shown[""]["data"]
    assert set(files) == {str(HERE.metrics), str(HERE.train_metrics)}  # no ingest counts
    train = files[str(HERE.train_metrics)]["data"]
    assert set(train) == TRAIN_METRICS
    history = pd.read_csv(repo / HERE.train_plots / "train_history.csv")
    assert train["final_train_loss"] == pytest.approx(history["train_loss"].iloc[-1])
    assert train["final_val_loss"] == pytest.approx(history["val_loss"].iloc[-1])
    assert train["best_val_loss"] == pytest.approx(history["val_loss"].min())
    assert train["best_epoch"] == history.loc[history["val_loss"].idxmin(), "epoch"]
    # `dvc exp show` leads with the test metrics: DVC lists stage metrics first.
    header = next(csv.reader(io.StringIO(sh("dvc", "exp", "show", "--csv", cwd=repo))))
    assert header.index("macro_f1") < header.index("auroc") < header.index("best_val_loss")
    assert not [c for c in header if c.startswith(("files.", "splits.", "images"))], header


def test_plots_diff_of_two_commits_draws_both_commits_pictures(repo: Path) -> None:
    diff = json.loads(sh("dvc", "plots", "diff", "HEAD~1", "HEAD", "--json", cwd=repo))
    assert not diff.get("errors"), diff["errors"]
    assert set(diff["data"]) == VEGA_PLOTS | PNG_PLOTS
    for name in VEGA_PLOTS:
        assert [plot["revisions"] for plot in diff["data"][name]] == [["HEAD~1", "HEAD"]], name
    pictures = {
        (name, plot["revisions"][0]): Path(plot["url"])
        for name in PNG_PLOTS
        for plot in diff["data"][name]
    }
    assert set(pictures) == {(name, rev) for name in PNG_PLOTS for rev in ("HEAD~1", "HEAD")}
    for picture in pictures.values():
        with Image.open(picture) as image:
            assert image.format == "PNG"
    # each commit's own picture (the tuned and the fixed thresholds), from DVC's cache
    histograms = "reports/plots/score_histograms.png"
    assert pictures[histograms, "HEAD~1"].read_bytes() != pictures[histograms, "HEAD"].read_bytes()


def test_plots_page_draws_offline_and_is_not_committed(repo: Path) -> None:
    sh("dvc", "plots", "diff", "HEAD~1", "HEAD", cwd=repo)
    page = (repo / "dvc_plots/index.html").read_text()
    assert not re.findall(r"<script[^>]*\ssrc=", page)  # vega, vega-lite, vega-embed inlined
    assert page.count("vegaEmbed('#") == len(VEGA_PLOTS)
    for rev in ("HEAD~1", "HEAD"):
        for name in PNG_PLOTS:
            assert f'src="static/{rev}_{name.replace("/", "_")}"' in page
    assert sh("git", "status", "--porcelain", cwd=repo) == ""  # dvc_plots/ is ignored


def test_confusion_is_coloured_by_share_of_the_row_and_the_loss_is_labelled(repo: Path) -> None:
    confusion = json.loads(sh("dvc", "plots", "show", "--show-vega", "confusion", cwd=repo))
    transforms = confusion["spec"]["transform"]
    share = next(t for t in transforms if t.get("calculate") == "datum.xy_count / datum.sum_y")
    row_sums = next(t for t in transforms if "joinaggregate" in t)
    assert row_sums["groupby"] == ["actual"]  # per actual class (within each revision's facet)
    assert confusion["spec"]["layer"][0]["encoding"]["color"]["field"] == share["as"]
    loss = json.loads(sh("dvc", "plots", "show", "--show-vega", "loss", cwd=repo))
    assert set(_y_titles(loss)) == {"loss"}


def _y_titles(spec: object) -> list[str]:
    """Every y-axis title of a vega-lite spec, layers included."""
    if isinstance(spec, list):
        return [title for item in spec for title in _y_titles(item)]
    if not isinstance(spec, dict):
        return []
    y = spec.get("y")
    own = [y["title"]] if isinstance(y, dict) and "title" in y else []
    return own + [
        title for key, value in spec.items() if key != "data" for title in _y_titles(value)
    ]


def test_offline_page_inlines_the_vega_versions_dvc_renders_for() -> None:
    """The committed page holds the libraries DVC's renderer would fetch from a CDN, in the
    same versions (`make offline-plots` rebuilds it when dvc-render moves them)."""
    page = (REPO / ".dvc/plots/offline.html").read_text()
    expected = re.findall(r"/npm/([\w-]+)@([\d.]+)", VegaRenderer.SCRIPTS)
    assert {name for name, _ in expected} == {"vega", "vega-lite", "vega-embed"}
    for name, version in expected:
        assert f"<!-- {name} {version}: build/{name}.min.js" in page, (name, version)
    assert page.count("<script>") == len(expected)
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN tags are left out
