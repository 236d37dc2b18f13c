"""Is ``model.backbone`` a model timm can build? Answered without importing timm when it can.

Every ``opensig`` command validates params.yaml, ``model.backbone`` included, but most of
them (ingest, register, monitor, review) never build a model, and importing timm costs about
3 s (it pulls in torch and torchvision). So the names the installed timm version lists are
kept in a small file in the user's cache (``$XDG_CACHE_HOME/opensig``, else
``~/.cache/opensig``), keyed by timm's version: a name found there is known at once. Any
other name (a typo, a deprecated alias, a ``hf-hub:`` reference, a model a plugin registers)
is put to timm itself, exactly as before, which also (re)writes the file. A missing,
unreadable or unwritable file only costs the import.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from opensig.io import atomic_write

log = logging.getLogger(__name__)


def names_file() -> Path | None:
    """Where the installed timm version's model names are kept (None: timm not installed)."""
    try:
        timm_version = version("timm")
    except PackageNotFoundError:
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "opensig" / f"timm-{timm_version}-models.json"


@cache
def _listed_names() -> frozenset[str]:
    path = names_file()
    try:
        return frozenset(json.loads(path.read_text())["models"]) if path else frozenset()
    except (OSError, ValueError, KeyError, TypeError):
        return frozenset()


def _remember(names: list[str]) -> None:
    path = names_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"models": sorted(names)})))
    except OSError as err:  # a read-only home: every check imports timm, nothing else changes
        log.debug("timm's model names not cached in %s: %s", path, err)
        return
    _listed_names.cache_clear()


def backbone_problem(backbone: str) -> str | None:
    """Why timm cannot build ``backbone`` (with close names to suggest), or None if it can.

    Names with a source prefix (``hf-hub:``, ``local-dir:``) cannot be checked offline. A
    pretrained tag (``resnet18.a1_in1k``) is not checked: timm accepts any tag until it
    downloads weights.
    """
    arch = backbone.split(".", 1)[0]
    if ":" not in backbone and arch in _listed_names():
        return None
    import timm  # heavy: only for a name the cached list does not hold

    listed = timm.list_models()
    if frozenset(listed) != _listed_names():
        _remember(listed)
    try:
        source, name = timm.models.parse_model_name(backbone)
    except ValueError as err:
        return str(err)
    if source is not None or timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, listed, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
    return f"{backbone!r} is not a timm model; {hint}"
