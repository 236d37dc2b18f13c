"""A served model whose prediction log cannot be written still answers, and says so."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from opensig.tracking.model_uri import BUNDLE_DIR


def test_unwritable_log_still_answers_and_logs_an_error(
    untrained_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opensig.pyfunc_model import OpensigModel

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log folder should be")
    monkeypatch.setenv("OPENSIG_PREDICTION_LOG", str(blocker / "logs"))
    monkeypatch.setenv("OPENSIG_SERVE_ROOT", str(tmp_path))
    bundle = shutil.copytree(untrained_bundle, tmp_path / BUNDLE_DIR)
    image = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "white").save(image)

    model = OpensigModel()
    model.load_context(SimpleNamespace(artifacts={BUNDLE_DIR: str(bundle)}))
    answer = model.predict(None, pd.DataFrame({"path": [str(image)]}))

    assert list(answer["path"]) == [str(image)] and answer["error"].tolist() == [""]
    assert "1 rows NOT logged (answers served all the same)" in caplog.text
