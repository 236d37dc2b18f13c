"""The registered champion behind the real `mlflow models serve`, answering HTTP requests.

A small digits project runs every stage into its own SQLite registry; then MLflow's own
scoring server (uvicorn, in a process group of its own so no child outlives the test)
serves ``models:/opensig@champion`` and gets images as base64 bytes and as file paths.
Its answers must be strict JSON and give the labels and scores ``opensig predict`` gives.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from typer.testing import CliRunner

from opensig.cli import app
from opensig.predict import Bundle
from opensig.tracking.model_uri import resolve_model_dir
from tests.conftest import answers, background, free_port, write_params

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent  # mlflow and uvicorn of this interpreter's venv
MODEL_URI = "models:/opensig@champion"
CLASSES = [str(d) for d in range(6)]
START_TIMEOUT = 180  # seconds: importing torch and loading the model on a busy 2-core box


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> tuple[Path, str]:
    """A project whose stages all ran, and the absolute URI of its MLflow store.

    Absolute, so MLflow's per-process store cache cannot hand us another test's database.
    """
    root = tmp_path_factory.mktemp("serving")
    shutil.copytree(digits_data, root / "data")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    write_params(root, {"mlflow": {"tracking_uri": uri}})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in ["ingest", "train", "tune", "evaluate", "register"]:
            result = CliRunner().invoke(app, [stage])
            assert result.exit_code == 0, f"opensig {stage} failed:\n{result.output}"
    return root, uri


@pytest.fixture(scope="module")
def server(registered: tuple[Path, str]) -> Iterator[str]:
    """The real `mlflow models serve`; yields its base URL and stops it (and uvicorn) after."""
    root, uri = registered
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OPENSIG_SERVE_ROOT": str(root / "data"),  # path rows below the project's data only
    }
    command = [
        *(str(BIN / "mlflow"), "models", "serve", "-m", MODEL_URI),
        *("--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)),
    ]
    url = f"http://127.0.0.1:{port}"
    # mlflow starts uvicorn as a child: background() stops the whole group
    with background(
        command, root / "serve.log", answers(f"{url}/ping"), START_TIMEOUT, cwd=root, env=env
    ):
        yield url


def _reject_nan(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def invoke(url: str, body: dict) -> list[dict]:
    """POST to /invocations; the answer must parse as strict JSON (no NaN)."""
    response = httpx.post(f"{url}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return json.loads(response.text, parse_constant=_reject_nan)["predictions"]


@pytest.fixture(scope="module")
def images(registered: tuple[Path, str]) -> tuple[Bundle, Path, Path]:
    """The bundle `opensig predict --model models:/...` loads, a test image it gives its
    true class, and a held-out unknown it calls unknown."""
    root, uri = registered
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # how the server finds the registry, too
        bundle = Bundle.load(resolve_model_dir(MODEL_URI), device="cpu")
    manifest = pd.read_parquet(root / "artifacts" / "manifest.parquet")
    test = manifest[manifest["split"] == "test"]
    known = [root / p for p in test[test["label"] == "3"]["path"]]
    novel = [root / p for p in test[test["novel"]]["path"]]
    found = {}
    for want, candidates in [("3", known), ("unknown", novel)]:
        labels = bundle.predict(candidates, progress=False)["label"]
        matches = [p for p, label in zip(candidates, labels, strict=True) if label == want]
        assert matches, f"the trained model labels none of {len(candidates)} images {want!r}"
        found[want] = matches[0]
    return bundle, found["3"], found["unknown"]


def check_rows(rows: list[dict], expected: pd.DataFrame) -> None:
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected.itertuples(index=False), strict=True):
        columns = {"path", "label", "score", *(f"score_{c}" for c in CLASSES), "error"}
        assert set(row) == columns | ({"labels"} & set(expected.columns))
        assert row["path"] == want.path
        # Pillow names a bytes source by its BytesIO object's address: differs per process.
        assert row["error"].split(" <_io.")[0] == want.error.split(" <_io.")[0]
        if want.error:
            assert row["label"] is None and row["score"] is None and row.get("labels") is None
            continue
        assert row["label"] == want.label
        assert row.get("labels") == getattr(want, "labels", None)
        assert isinstance(row["score"], float)
        assert row["score"] == pytest.approx(want.score, abs=1e-6)
        for c in CLASSES:
            assert row[f"score_{c}"] == pytest.approx(getattr(want, f"score_{c}"), abs=1e-6)


def test_base64_images_are_labelled_like_predict(
    server: str, images: tuple[Bundle, Path, Path]
) -> None:
    bundle, known, novel = images
    blobs = [known.read_bytes(), novel.read_bytes(), b"not an image"]
    encoded = [base64.b64encode(b).decode("ascii") for b in blobs]
    rows = invoke(
        server, {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}
    )
    names = [f"image[{i}]" for i in range(len(blobs))]
    check_rows(rows, bundle.predict(blobs, names=names, progress=False))
    assert [r["label"] for r in rows] == ["3", "unknown", None]
    assert rows[2]["error"].startswith("UnidentifiedImageError")


def test_paths_are_labelled_like_predict(server: str, images: tuple[Bundle, Path, Path]) -> None:
    bundle, known, novel = images
    paths = [str(known), str(novel)]
    rows = invoke(server, {"dataframe_records": [{"path": p} for p in paths]})
    check_rows(rows, bundle.predict(paths, progress=False))
    assert [r["label"] for r in rows] == ["3", "unknown"]


def test_multi_label_param_adds_every_passing_class(
    server: str, images: tuple[Bundle, Path, Path]
) -> None:
    bundle, known, novel = images
    paths = [str(known), str(novel), str(known.with_name("missing.png"))]
    body = {"dataframe_records": [{"path": p} for p in paths], "params": {"multi_label": True}}
    rows = invoke(server, body)
    check_rows(rows, bundle.predict(paths, progress=False, multi_label=True))
    assert "3" in rows[0]["labels"].split("|")
    assert [r["labels"] for r in rows[1:]] == ["unknown", None]


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["file"], "data": [["a.png"]]}},
        {"dataframe_records": [{"name": "a.png"}]},
    ],
    ids=["split", "records"],
)
def test_a_request_without_image_or_path_is_a_400_saying_why(server: str, body: dict) -> None:
    response = httpx.post(f"{server}/invocations", json=body, timeout=60)
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "input needs a 'path' column (image files) or an 'image' column" in answer["message"]
    assert "the request had neither" in answer["message"] and "[]" not in answer["message"]


def test_served_answers_land_in_the_prediction_log(
    server: str, registered: tuple[Path, str], images: tuple[Bundle, Path, Path]
) -> None:
    """register put monitor.log_dir into the bundle: the server logs every answer, under the
    registered name and version it looked up by the MLmodel's run id."""
    from opensig.monitoring.log import read_log

    root, _ = registered
    _, known, novel = images
    invoke(server, {"dataframe_split": {"columns": ["path"], "data": [[str(known)], [str(novel)]]}})
    frame = read_log(str(root / "logs" / "predictions"))
    mine = frame[frame["path"].isin([str(known), str(novel)])]
    assert len(mine) >= 2
    assert set(mine["model"]) == {"opensig"}
    assert set(mine["model_version"]) == {"1"}
    assert set(mine["label"]) == {"3", "unknown"}
    assert all(f.name.split("-")[1].isdigit() for f in (root / "logs").rglob("*.parquet"))


def test_path_rows_outside_the_serve_root_are_a_400_that_tells_nothing(
    server: str, registered: tuple[Path, str], tmp_path: Path
) -> None:
    """Only files below OPENSIG_SERVE_ROOT (the project's data/) are read: `../`, absolute
    paths and links leading out are refused alike, whether or not the file exists."""
    root, _ = registered
    (root / "data" / "out").symlink_to(tmp_path)  # a link inside the root, leading out
    (tmp_path / "secret.png").write_bytes(b"\x89PNG")
    outside = {
        "dot-dot": str(root / "data" / ".." / "mlflow.db"),
        "absolute": str(tmp_path / "secret.png"),
        "absent": str(tmp_path / "absent.png"),
        "link": str(root / "data" / "out" / "secret.png"),
    }
    messages = {}
    for case, path in outside.items():
        response = httpx.post(
            f"{server}/invocations", json={"dataframe_records": [{"path": path}]}, timeout=60
        )
        assert response.status_code == 400, (case, response.text)
        message = response.json()["message"]  # MLflow's server puts the input before it
        messages[case] = message[message.rindex(f"path {path!r}") :].replace(repr(path), "PATH")
    assert len(set(messages.values())) == 1, messages  # the same words: no existence oracle
    assert "is not below OPENSIG_SERVE_ROOT" in messages["absent"]
    (root / "data" / "notes.txt").write_text("not an image")  # inside: read, an error row
    rows = invoke(server, {"dataframe_records": [{"path": str(root / "data" / "notes.txt")}]})
    assert rows[0]["label"] is None and rows[0]["error"].startswith("UnidentifiedImageError")


def test_a_worker_killed_mid_burst_leaves_every_answer_logged(
    registered: tuple[Path, str], tmp_path: Path
) -> None:
    """As deployed: `mlflow models serve --workers 2` with the prediction log on, a burst of
    requests at concurrency 8, one uvicorn worker SIGKILLed mid-burst. Every answered request
    has its row in the log; what is lost is at most the killed worker's requests in flight;
    `opensig monitor` reads the log."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import psutil
    from PIL import Image

    from opensig.monitoring.log import read_log

    root, uri = registered
    log_dir, port, total, concurrency = tmp_path / "log", free_port(), 240, 8
    bodies, digests = [], []
    for i in range(total):  # distinct images: each request's row is found by its sha256
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        digests.append(hashlib.sha256(buffer.getvalue()).hexdigest())
        encoded = base64.b64encode(buffer.getvalue()).decode()
        bodies.append({"dataframe_split": {"columns": ["image"], "data": [[encoded]]}})
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "OPENSIG_PREDICTION_LOG": str(log_dir),
    }
    command = [
        *(str(BIN / "mlflow"), "models", "serve", "-m", MODEL_URI, "--workers", "2"),
        *("--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)),
    ]
    url = f"http://127.0.0.1:{port}"
    with background(
        command, tmp_path / "serve.log", answers(f"{url}/ping"), START_TIMEOUT, cwd=root, env=env
    ) as proc:
        with httpx.Client(timeout=120) as client:
            for _ in range(2 * concurrency):  # both workers up and loaded before the burst
                assert client.post(f"{url}/invocations", json=bodies[0]).status_code == 200
        workers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2, [p.cmdline() for p in workers]

        def send(index: int) -> bool:
            if index == total // 3:
                workers[0].send_signal(signal.SIGKILL)  # mid-burst
            try:
                with httpx.Client(timeout=120) as client:
                    response = client.post(f"{url}/invocations", json=bodies[index])
                return response.status_code == 200
            except httpx.HTTPError:
                return False

        with ThreadPoolExecutor(concurrency) as pool:
            answered = list(pool.map(send, range(total)))
        killed = workers[0]
        assert not killed.is_running() or killed.status() == psutil.STATUS_ZOMBIE
    logged = set(read_log(str(log_dir))["sha256"])
    missing = [i for i, ok in enumerate(answered) if ok and digests[i] not in logged]
    assert not missing, f"answered but not logged: {missing}"
    assert answered.count(False) <= concurrency  # at most the killed worker's in flight
    assert sum(answered) >= total - concurrency
    report = tmp_path / "monitor.json"
    result = CliRunner().invoke(
        app,
        ["monitor", "--log", str(log_dir), "--out", str(report), "-p", str(root / "params.yaml")],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["model_version"] == "1"
