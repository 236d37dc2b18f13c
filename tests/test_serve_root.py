"""The served model reads path rows only below $OPENSIG_SERVE_ROOT, links resolved, and its
refusal says the same whatever the path: no file reader, no file-existence oracle."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from opensig.tracking.model_uri import BUNDLE_DIR


def served(bundle: Path, monkeypatch: pytest.MonkeyPatch, roots: list[Path] | None):
    """The pyfunc model as the server loads it, started with ``roots`` (None: unset)."""
    from opensig.pyfunc_model import OpensigModel

    monkeypatch.delenv("OPENSIG_PREDICTION_LOG", raising=False)
    if roots is None:
        monkeypatch.delenv("OPENSIG_SERVE_ROOT", raising=False)
    else:
        monkeypatch.setenv("OPENSIG_SERVE_ROOT", os.pathsep.join(map(str, roots)))
    model = OpensigModel()
    model.load_context(SimpleNamespace(artifacts={BUNDLE_DIR: str(bundle)}))
    return model


def refusal(model, path: str) -> str:
    with pytest.raises(MlflowException) as caught:
        model.predict(None, pd.DataFrame({"path": [path]}))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"  # the server's HTTP 400
    return caught.value.message


@pytest.fixture
def layout(untrained_bundle: Path, tmp_path: Path) -> dict[str, Path]:
    """A bundle, a serve root with an image, a note and a link leading out, and a secret
    image outside it."""
    bundle = shutil.copytree(untrained_bundle, tmp_path / BUNDLE_DIR)
    root, outside = tmp_path / "served", tmp_path / "private"
    root.mkdir(), outside.mkdir()
    Image.new("RGB", (16, 16), "white").save(root / "a.png")
    Image.new("RGB", (16, 16), "black").save(outside / "secret.png")
    (root / "notes.txt").write_text("not an image")
    (root / "out").symlink_to(outside)
    return {"bundle": bundle, "root": root, "outside": outside}


def test_without_a_root_no_path_row_is_read_and_bytes_still_are(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = served(layout["bundle"], monkeypatch, None)
    assert "OPENSIG_SERVE_ROOT is unset" in refusal(model, str(layout["root"] / "a.png"))
    image = (layout["root"] / "a.png").read_bytes()
    answer = model.predict(None, pd.DataFrame({"image": [image]}))
    assert answer["error"].tolist() == [""] and answer["label"].notna().all()


def test_only_paths_below_the_root_are_read(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = layout["root"], layout["outside"]
    model = served(layout["bundle"], monkeypatch, [root])
    inside = model.predict(None, pd.DataFrame({"path": [str(root / "a.png")]}))
    assert inside["error"].tolist() == [""] and inside["label"].notna().all()
    note = model.predict(None, pd.DataFrame({"path": [str(root / "notes.txt")]}))
    assert note["error"].iloc[0].startswith("UnidentifiedImageError")  # read: an error row
    escapes = {
        "dot-dot": str(root / ".." / "private" / "secret.png"),
        "absolute": str(outside / "secret.png"),
        "link out": str(root / "out" / "secret.png"),
        "absent": str(outside / "absent.png"),
        "relative": os.path.relpath(outside / "secret.png"),
    }
    words = {
        case: refusal(model, path).replace(repr(path), "PATH") for case, path in escapes.items()
    }
    assert len(set(words.values())) == 1, words  # an existing file and an absent one alike
    assert "is not below OPENSIG_SERVE_ROOT" in words["absent"]


def test_several_roots_are_separated_like_path(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = served(layout["bundle"], monkeypatch, [layout["root"], layout["outside"]])
    answer = model.predict(None, pd.DataFrame({"path": [str(layout["outside"] / "secret.png")]}))
    assert answer["error"].tolist() == [""]
