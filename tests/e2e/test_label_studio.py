"""A review batch labeled in a real Label Studio, driven through its REST API.

Label Studio pins packages that clash with Prefect's and MLflow's, so it lives in a venv of
its own outside the repository (made once, then reused; the first run installs it from PyPI
and takes minutes). Without PyPI the test is skipped: the folder flow needs no Label Studio.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageOps

from opensig.label_studio import LABEL_STUDIO
from opensig.review import export_batch, import_batch
from tests.conftest import background, free_port

VENV = Path(
    os.environ.get(
        "OPENSIG_LABEL_STUDIO_VENV", Path.home() / ".cache/opensig-test/label-studio-venv"
    )
)
READY = VENV / ".opensig-installed"  # written once the install has finished
TOKEN = "opensig-test-token-0123456789"


def _install() -> Path:
    """Label Studio's command in its own venv, installed on first use; skip without PyPI."""
    command = VENV / "bin" / "label-studio"
    if READY.is_file():
        return command
    shutil.rmtree(VENV, ignore_errors=True)  # an install cut short: start again
    VENV.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)  # not the project's venv
    steps = [
        [base, "-m", "venv", str(VENV)],
        [str(VENV / "bin/python"), "-m", "pip", "install", "-q", "label-studio==1.23.*"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            pytest.skip(f"Label Studio 1.23 cannot be installed ({done.stderr.strip()[-300:]})")
    READY.write_text("label-studio==1.23.*\n")
    return command


def _api(url: str, method: str = "GET", body: object = None) -> object:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


@pytest.fixture
def label_studio(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Label Studio on a free loopback port serving local files under the review folder."""
    label_studio_bin = _install()
    review = tmp_path / "review"
    review.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(review),
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
    }
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            _api(f"{url}/api/projects")
        except (OSError, urllib.error.HTTPError):
            return False
        return True

    command = [
        str(label_studio_bin),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "ls-data"),
        "--username",
        "reviewer@example.org",
        "--password",
        "opensig-pass",
        "--user-token",
        TOKEN,
        "--enable-legacy-api-token",
    ]
    with background(command, tmp_path / "label-studio.log", ready, timeout=300, env=env):
        yield url, review


def test_label_studio_round_trip(
    label_studio: tuple[str, Path], tmp_path: Path, digits_data: Path
) -> None:
    url, review = label_studio
    data = tmp_path / "data"
    shutil.copytree(digits_data, data)
    shots = tmp_path / "camera"
    shots.mkdir()
    paths = []
    for i, image in enumerate(sorted((digits_data / "known/5").iterdir())[:3]):
        paths.append(shots / f"shot{i}.png")
        ImageOps.mirror(Image.open(image)).save(paths[-1])
    from opensig.monitoring.log import input_sha256

    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    logged = pd.DataFrame(
        {
            "time": [start + timedelta(minutes=i) for i in range(3)],
            "model": "opensig",
            "model_version": "1",
            "path": [str(p) for p in paths],
            "sha256": [input_sha256(p) for p in paths],
            "label": ["unknown", "unknown", "0"],
            "score": [0.3, 0.2, 0.7],
            "score_0": [0.3, 0.2, 0.7],
            "error": "",
        }
    )
    batch = export_batch(logged, review, data, label_studio=True)

    config = (batch / LABEL_STUDIO / "config.xml").read_text()
    project = _api(f"{url}/api/projects", "POST", {"title": "review", "label_config": config})
    pid = project["id"]
    _api(
        f"{url}/api/storages/localfiles",
        "POST",
        {"project": pid, "path": str(batch / "inbox"), "use_blob_urls": True, "title": "batch"},
    )
    tasks = json.loads((batch / LABEL_STUDIO / "tasks.json").read_text())
    _api(f"{url}/api/projects/{pid}/import", "POST", tasks)
    imported = _api(f"{url}/api/tasks?project={pid}&page_size=100")["tasks"]
    assert len(imported) == 3
    request = urllib.request.Request(
        url + imported[0]["data"]["image"], headers={"Authorization": f"Token {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=60) as served:  # the image, from the batch
        assert served.read() == (batch / imported[0]["data"]["file"]).read_bytes()

    def result(choice: str, text: str = "") -> list[dict]:
        out = [
            {
                "from_name": "label",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [choice]},
            }
        ]
        if text:
            out.append(
                {
                    "from_name": "new_class",
                    "to_name": "image",
                    "type": "textarea",
                    "value": {"text": [text]},
                }
            )
        return out

    by_file = {Path(t["data"]["file"]).name: t["id"] for t in imported}
    answers = {"shot0.png": result("unknown", "mirrored"), "shot1.png": result("unknown")}
    answers["shot2.png"] = result("0")
    for name, answer in answers.items():
        _api(f"{url}/api/tasks/{by_file[name]}/annotations", "POST", {"result": answer})
    export = tmp_path / "label-studio-export.json"
    export.write_text(json.dumps(_api(f"{url}/api/projects/{pid}/export?exportType=JSON")))

    report = import_batch(batch, data, label_studio=export)

    assert report["added"] == {"0": 1, "mirrored": 1, "unknown": 1}
    assert report["new_classes"] == ["mirrored"]
    assert len(list((data / "known/mirrored").iterdir())) == 1
    assert len(list((data / "unknown/review").iterdir())) == 1
    assert import_batch(batch, data, label_studio=export)["added"] == {}
