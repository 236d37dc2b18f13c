"""A registered model's requirements.txt alone is enough to serve it (`make check-model-env`).

Opt-in, skipped unless OPENSIG_CHECK_MODEL_ENV=1: the fresh venv installs those pins from
PyPI, about 4 GB with torch's CUDA libraries. It gets nothing else (no PYTHONPATH, another
folder), loads the model with MLflow and predicts one image: the opensig code comes with the
model (logged as its code), so a package missing from the pins fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from opensig.decision import THRESHOLDS_FILE
from opensig.tracking.store import global_store
from tests.conftest import register_bundle

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("OPENSIG_CHECK_MODEL_ENV") != "1",
        reason="opt-in: make check-model-env (installs the model's pins from PyPI, about 4 GB)",
    ),
]

PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import opensig
row = model.predict(pd.DataFrame({"path": [sys.argv[2]]})).iloc[0].to_dict()
print(json.dumps({"opensig": opensig.__file__, **row}, default=str))
"""


def test_the_requirements_alone_load_the_model_and_predict(
    untrained_bundle: Path, digits_data: Path, tmp_path: Path
) -> None:
    uri = register_bundle(untrained_bundle, untrained_bundle / THRESHOLDS_FILE, tmp_path, "alone")
    with global_store(uri):  # models:/ resolves in the global store's registry
        model = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri="models:/alone/1", dst_path=str(tmp_path / "m")
            )
        )
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)  # not the project's venv
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for step in (
        [base, "-m", "venv", str(venv)],
        [
            str(venv / "bin/python"),
            "-m",
            "pip",
            "install",
            "-q",
            "-r",
            str(model / "requirements.txt"),
        ],
    ):
        done = subprocess.run(step, capture_output=True, text=True, env=env, timeout=3600)
        assert done.returncode == 0, f"{' '.join(step)}:\n{done.stderr[-3000:]}"

    image = sorted((digits_data / "known" / "0").iterdir())[0]
    run = [str(venv / "bin/python"), "-c", PREDICT, str(model), str(image)]
    served = {**env, "OPENSIG_SERVE_ROOT": str(image.parent)}  # path rows below it only
    done = subprocess.run(
        run, capture_output=True, text=True, env=served, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.splitlines()[-1])
    assert Path(row["opensig"]).is_relative_to(model)  # the model's own copy of the code
    assert row["error"] == "" and row["label"] in {"0", "1", "2", "unknown"}
    assert 0.0 <= row["score"] <= 1.0
