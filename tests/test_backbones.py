"""model.backbone is checked against timm, importing timm only for a name not seen before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from opensig.backbones import _listed_names, backbone_problem, names_file

REPO = Path(__file__).resolve().parents[1]

# Load the repo's params.yaml in a fresh process: did validating it import timm?
LOAD = (
    "import sys; from opensig.config import load_config; "
    f"load_config({str(REPO / 'params.yaml')!r}); print('timm' in sys.modules)"
)


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _listed_names.cache_clear()
    yield tmp_path
    _listed_names.cache_clear()


def _imports_timm(env: dict[str, str]) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "True"


def test_the_first_check_asks_timm_and_later_ones_read_its_list(cache_home: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    assert names_file() == cache_home / "opensig" / f"timm-{version('timm')}-models.json"
    assert _imports_timm(env)  # nothing cached yet
    import timm

    assert json.loads(names_file().read_text())["models"] == sorted(timm.list_models())
    assert not _imports_timm(env)  # the same check, from the file


def test_names_outside_the_list_are_still_judged_by_timm(cache_home: Path) -> None:
    names_file().parent.mkdir(parents=True)
    names_file().write_text(json.dumps({"models": ["resnet18"]}))
    assert backbone_problem("resnet18") is None
    assert backbone_problem("resnet18.a1_in1k") is None  # a pretrained tag
    assert backbone_problem("resnet10t") is None  # timm knows it: the list is refreshed
    assert "resnet10t" in json.loads(names_file().read_text())["models"]
    assert backbone_problem("tv_resnet50") is None  # deprecated: not listed, still valid
    assert backbone_problem("hf-hub:timm/resnet18.a1_in1k") is None  # not checkable offline
    problem = backbone_problem("resnet181")
    assert problem.startswith("'resnet181' is not a timm model; did you mean resnet18")
    assert "Unknown model source" in backbone_problem("nope:resnet18")


@pytest.mark.parametrize("content", ["not json", '{"names": []}', '{"models": 3}'])
def test_a_broken_list_only_costs_the_import(cache_home: Path, content: str) -> None:
    names_file().parent.mkdir(parents=True)
    names_file().write_text(content)
    assert backbone_problem("resnet18") is None
    assert "resnet18" in json.loads(names_file().read_text())["models"]  # rewritten


def test_an_unwritable_cache_only_costs_the_import(cache_home: Path) -> None:
    (cache_home / "opensig").write_text("a file where the folder would go")
    assert backbone_problem("resnet18") is None
    assert backbone_problem("resnet181").startswith("'resnet181' is not a timm model")
