"""Where the project is, when DVC runs a stage in a temporary copy of it.

`dvc exp run --temp` and queued experiments (`dvc exp run --queue`, `dvc queue start`)
run the pipeline in a clone of the repository under ``.dvc/tmp/exps/``, deleted when the
experiment ends. A relative path in params.yaml then names a folder inside that clone: a
cache there starts empty and is thrown away. DVC passes the project's own root in
``DVC_ROOT`` (its queue sets it to the parent repository, not the clone), so paths meant
to be shared between runs are taken from there.
"""

from __future__ import annotations

import os
from pathlib import Path


def shared_path(path: Path) -> Path:
    """``path`` (relative to the working folder) in the project DVC copied this run from;
    as it is outside a DVC experiment's copy, or when absolute."""
    root = os.environ.get("DVC_ROOT")
    if path.is_absolute() or not root:
        return path
    here = Path.cwd()
    copy = next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), None)
    if copy is None or copy.resolve() == Path(root).resolve():
        return path
    return Path(root) / here.relative_to(copy) / path
