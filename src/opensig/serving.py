"""What the served model may read: image bytes always, files only below the folders the
server was started with (``$OPENSIG_SERVE_ROOT``, one or more, separated by ``os.pathsep``).

A scoring server that opens any path a request names reads every image its user may read,
and its errors tell a caller which files exist: beyond localhost, a file reader and a
file-existence oracle. So path rows are refused unless a root allows them, links resolved
(the :func:`opensig.io.inside` check), with one message whatever the path, existing or not.
Spark scoring hands the model bytes, never paths, so it is not affected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from opensig.io import inside

SERVE_ROOT_ENV = "OPENSIG_SERVE_ROOT"


def serve_roots() -> list[Path]:
    """The folders path rows may be read below; none when the variable is unset or empty."""
    return [Path(p) for p in os.environ.get(SERVE_ROOT_ENV, "").split(os.pathsep) if p]


def refused_paths(paths: Sequence[str], roots: Sequence[Path]) -> str | None:
    """Why these path rows may not be read (None: every one lies below a root). The reason
    names the first path refused and how to allow it, never whether it exists."""
    if not roots:
        return (
            f"path rows are not read by this server ({SERVE_ROOT_ENV} is unset): send the "
            "image bytes in an 'image' column, or start the server with "
            f"{SERVE_ROOT_ENV}=/folder/of/images"
        )
    for path in paths:
        if not any(inside(path, root, follow_links=True) is not None for root in roots):
            allowed = os.pathsep.join(str(r) for r in roots)
            return (
                f"path {path!r} is not below {SERVE_ROOT_ENV} ({allowed}), links resolved: "
                "send the image bytes in an 'image' column, or add its folder to "
                f"{SERVE_ROOT_ENV} when starting the server"
            )
    return None
