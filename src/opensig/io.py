"""Small file helpers: every output is written atomically (temp file + rename).

A stage killed half-way must never leave a truncated JSON or weights file that the next
stage, or DVC, would take for a finished one. Also the process-wide settings a stage
changes for a while: deferred signals, environment defaults.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then restored
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def inside(path: str | Path, root: str | Path, *, follow_links: bool = False) -> Path | None:
    """``path`` relative to ``root`` when it stays inside it (``root`` itself included), else
    None: the one test of "this path does not lead out of its folder".

    By default on the normalised paths (``..`` collapsed, relative ones taken from the working
    folder), where the path says it is: for paths read from a file (a manifest, a labels CSV),
    whose links inside the data folder are the user's own. ``follow_links``: where it really
    leads, every link resolved: for folders from elsewhere (a downloaded model), or for two
    folders that must not overlap.
    """
    if follow_links:
        target, base = Path(path).resolve(), Path(root).resolve()
    else:
        target, base = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return target.relative_to(base) if target.is_relative_to(base) else None


def link_or_copy(source: Path, path: Path) -> Path:
    """Give ``path`` the content of ``source`` atomically: a hard link where the filesystem
    allows (no byte rewritten, e.g. a checkpoint's weights placed as the model's), else a copy."""

    def place(tmp: Path) -> None:
        tmp.unlink()  # os.link will not overwrite the placeholder atomic_write made
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(source, tmp)

    return atomic_write(path, place)


def free_names(name: str) -> Iterator[str]:
    """``name``, then ``name-1``, ``name-2``...: the names tried, in order, in a folder."""
    path = Path(name)
    yield name
    for n in range(1, 10_000):
        yield f"{path.stem}-{n}{path.suffix}"


def copy_new(source: Path, folder: Path) -> Path:
    """Copy ``source`` into ``folder`` under its name, or ``name-1``... when that is taken.

    The bytes go to a temp file first, which is then hard-linked under the first free name
    (a link never replaces a file): the copy appears whole or not at all, and no file is
    ever overwritten, even by another process placing the same name at the same moment.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # the pid in the name tells a later run whether the copy's owner is still alive
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{source.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        shutil.copystat(source, tmp)
        for name in free_names(source.name):
            try:
                os.link(tmp, folder / name)
                return folder / name
            except FileExistsError:
                continue
    finally:
        Path(tmp).unlink(missing_ok=True)
    raise RuntimeError(f"{folder}: 10000 files named like {source.name} already exist")


def remove_dead_copies(folder: Path) -> int:
    """Delete the temp files of :func:`copy_new` calls whose process died (a SIGKILL skips
    their cleanup), so that a killed copy leaves no partial file behind once its folder is
    written again; a live process's copy in progress is left alone. Returns how many."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else []:
        parts = tmp.name.rsplit(".", 3)  # .<name>.<pid>.<random>.tmp
        if len(parts) == 4 and parts[1].isdigit() and not _alive(int(parts[1])):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextmanager
def signals_deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver the first one.

    A save and the bookkeeping that records it (e.g. "resume from epoch N") must not be split:
    a signal landing between them would make the process report a state it did not leave.
    Handlers can only be swapped in the main thread; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])


@contextmanager
def env_defaults(settings: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, except those the user already set.

    For libraries that read their switches from the environment on every call (MLflow): the
    user's own setting wins, and the process gets its environment back afterwards.
    """
    added = {k: v for k, v in settings.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _json_safe(obj: Any) -> Any:
    """NaN is not JSON: write it as null so every JSON reader (and DVC) accepts the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return obj.as_posix()
    if hasattr(obj, "item"):  # numpy scalars
        return _json_safe(obj.item())
    return obj


def file_digest(path: Path) -> str:
    """sha256 of a file's content, read in chunks (weights files can be large)."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: Path, obj: Any) -> Path:
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (has the stage that writes it run?)")
    return json.loads(path.read_text())


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files of ``atomic_write`` calls that were killed (SIGKILL skips cleanup)."""
    stale = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
