"""Decode once, per image: training images resized to the model's input, kept on disk.

Decoding and resizing image files again every epoch is work the model never needed. The
cache keeps each image's pixels, keyed by its content hash, in a folder per (size,
channels, decoder version)::

    <data.cache_dir>/decoded/<size>x<size>x<C>-v<DECODE_VERSION>/
        index.sqlite        hash -> (shard, row); each shard's rows and bytes
        <uuid>.npy          (rows, size, size, C) uint8, about SHARD_BYTES each

Why this shape, at millions of images:

- **Bounded memory.** Images are decoded a shard at a time and each shard is written
  straight to disk, so filling the cache holds one shard in RAM whatever the data's size;
  training reads shards memory-mapped, so the OS pages them in and out.
- **Incremental.** An entry is one image, not one data set: a retrain after a review import
  decodes only the new images, into a new shard.
- **Bounded disk.** :func:`prepare` stops adding entries at ``max_bytes`` (default: half the
  disk space the cache could use); the images beyond it are decoded from their files every
  epoch, exactly as the cache would have held them (the same ``fit_to``), so training gives
  the same weights either way.
- **Crash-safe.** A shard is written to a temp file, flushed and renamed, and only then
  entered in the index, in one transaction. A kill leaves at most a temp file or a shard
  the index does not name: both are deleted by the next fill. A shard whose size no longer
  matches the index (a disk that lost its tail) is dropped and its images decoded again.
- **Shared.** Fills take a lock, so two trainings on one cache decode each image once;
  trainings hold a shared lock while they read, so :func:`prune` never deletes a shard
  under a running training.

A cache folder that cannot be written (read-only, full) costs speed, never a result: the
images it cannot hold are decoded on the fly, with a warning naming the folder.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from opensig.data.dataset import fit_to
from opensig.data.images import DECODE_VERSION, MAX_IMAGE_PIXELS, decode
from opensig.io import atomic_write
from opensig.progress import image_bar

log = logging.getLogger(__name__)

DECODED = "decoded"  # the sub-folder of data.cache_dir this cache owns
INDEX = "index.sqlite"
_NPY_HEADER = 128  # np.save's header before a shard's pixels (format 1.0, 4 dimensions)
SHARD_BYTES = 64 * 2**20  # large enough for few files at 10M images, small enough for RAM
_FILL_LOCK = ".fill.lock"  # held while a process adds or removes entries
_READ_LOCK = ".read.lock"  # held (shared) by every training reading the shards
_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, rows INTEGER, bytes INTEGER);
CREATE TABLE IF NOT EXISTS entries (hash TEXT PRIMARY KEY, shard TEXT, pos INTEGER);
CREATE INDEX IF NOT EXISTS entries_by_shard ON entries (shard);
"""


def _has_index(db: sqlite3.Connection) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'entries'"
    return db.execute(query).fetchone() is not None


def _wanted(db: sqlite3.Connection, hashes: Sequence[str], columns: str = "") -> list[tuple]:
    """The index rows of ``hashes`` (hash first, then ``columns``), by a join in SQLite: at
    millions of entries, cheaper than reading the whole index into Python."""
    db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (hash TEXT PRIMARY KEY)")
    db.execute("DELETE FROM wanted")
    db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((h,) for h in hashes))
    extra = f", {columns}" if columns else ""
    return db.execute(f"SELECT e.hash{extra} FROM entries e JOIN wanted USING (hash)").fetchall()


class CacheUnavailable(OSError):
    """The cache folder cannot be read or written; the message names it."""


def decoded_root(cache_dir: Path) -> Path:
    """Where the decoded images of every size live under ``data.cache_dir``."""
    return Path(cache_dir) / DECODED


def _decode(args: tuple[str, int, int, int | None]) -> np.ndarray | str:
    path, size, in_chans, max_pixels = args
    try:
        image = fit_to(decode(path, in_chans, max_pixels, size), size)
        return image.reshape(size, size, in_chans)  # OpenCV drops a single channel
    except Exception as err:  # reported with the file name by the caller
        return f"{type(err).__name__}: {err}"


def _bytes_under(folder: Path, pattern: str = "*") -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def max_bytes(cache_dir: Path, max_gb: float | None) -> int:
    """The cache's size cap: ``max_gb`` (train.decode_cache_max_gb), or when unset half the
    disk space the cache could use (what it holds plus the free space), stated in the log."""
    if max_gb is not None:
        return int(max_gb * 1e9)
    probe = Path(cache_dir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    cap = (free + _bytes_under(decoded_root(cache_dir))) // 2
    log.info(
        "decode cache: up to %.1f GB in %s (train.decode_cache_max_gb unset: half of the "
        "%.1f GB free plus what it holds)",
        cap / 1e9,
        cache_dir,
        free / 1e9,
    )
    return cap


@contextmanager
def _locked(path: Path, mode: int) -> Iterator[IO[bytes]]:
    with path.open("ab") as handle:
        fcntl.flock(handle, mode)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Decoded:
    """Row ``i``'s decoded pixels, or None where the cache does not hold the image (the
    dataset then decodes its file). Shards are memory-mapped on first use, in each loader
    worker on its own (the maps are not pickled); the open read lock keeps :func:`prune`
    from deleting them meanwhile."""

    def __init__(
        self, folder: Path, shards: list[str], shard_of: np.ndarray, row_of: np.ndarray
    ) -> None:
        self.folder = folder
        self.shards = shards
        self.shard_of = shard_of  # int32 per row: index into ``shards``, -1 = not cached
        self.row_of = row_of
        self._maps: dict[int, np.ndarray] = {}
        self._lock: IO[bytes] | None = None
        if shards:
            try:
                self._lock = (folder / _READ_LOCK).open("ab")
                fcntl.flock(self._lock, fcntl.LOCK_SH)
            except OSError:  # a read-only cache: nobody prunes it from here either
                self._lock = None

    def __len__(self) -> int:
        return len(self.shard_of)

    @property
    def n_cached(self) -> int:
        return int((self.shard_of >= 0).sum())

    def get(self, index: int) -> np.ndarray | None:
        shard = int(self.shard_of[index])
        if shard < 0:
            return None
        if shard not in self._maps:
            pixels = np.load(self.folder / self.shards[shard], mmap_mode="r")
            # an epoch reads rows in a shuffled order: read-ahead would fetch pages no one asks for
            pixels._mmap.madvise(mmap.MADV_RANDOM)
            self._maps[shard] = pixels
        return np.array(self._maps[shard][self.row_of[index]])  # a writable copy

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}, "_lock": None}

    def close(self) -> None:
        self._maps.clear()
        if self._lock is not None:
            self._lock.close()  # closing the file releases its lock
            self._lock = None


@dataclass(frozen=True)
class CacheFolder:
    """The entries of one (size, channels, decoder version) combination."""

    folder: Path
    size: int
    in_chans: int

    @classmethod
    def of(cls, cache_dir: Path, size: int, in_chans: int) -> CacheFolder:
        name = f"{size}x{size}x{in_chans}-v{DECODE_VERSION}"
        return cls(decoded_root(cache_dir) / name, size, in_chans)

    @property
    def image_bytes(self) -> int:
        return self.size * self.size * self.in_chans

    @property
    def shard_rows(self) -> int:
        return max(1, SHARD_BYTES // self.image_bytes)

    def _connect(self, readonly: bool = False) -> sqlite3.Connection:
        index = self.folder / INDEX
        if readonly:
            return sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=60)
        db = sqlite3.connect(index, timeout=60)
        db.executescript(_SCHEMA)
        return db

    def lookup(self, hashes: Sequence[str]) -> Decoded:
        """Where each image is cached, row for row with ``hashes`` (read-only)."""
        located: dict[str, tuple[str, int]] = {}
        if (self.folder / INDEX).is_file():
            with closing(self._connect(readonly=True)) as db:
                if _has_index(db):  # an index a full disk left empty holds nothing
                    located = {h: (s, r) for h, s, r in _wanted(db, hashes, "shard, pos")}
        names = sorted({shard for shard, _ in located.values()})
        number = {name: i for i, name in enumerate(names)}
        shard_of = np.full(len(hashes), -1, dtype=np.int32)
        row_of = np.zeros(len(hashes), dtype=np.int64)
        for i, digest in enumerate(hashes):
            if digest in located:
                shard, row = located[digest]
                shard_of[i], row_of[i] = number[shard], row
        return Decoded(self.folder, names, shard_of, row_of)

    def repair(self, db: sqlite3.Connection) -> None:
        """Drop what a kill or a damaged disk left: temp files, shards the index does not
        name, and indexed shards whose file is missing or of the wrong size (their images
        are decoded again). Call with the fill lock held."""
        recorded = dict(db.execute("SELECT name, bytes FROM shards").fetchall())
        for path in self.folder.iterdir():
            if path.name.endswith(".tmp") or (path.suffix == ".npy" and path.name not in recorded):
                path.unlink(missing_ok=True)
        damaged = [
            name
            for name, size in recorded.items()
            if not (self.folder / name).is_file() or (self.folder / name).stat().st_size != size
        ]
        for name in damaged:
            log.warning("decode cache: %s is damaged; its images are decoded again", name)
            with db:
                db.execute("DELETE FROM entries WHERE shard = ?", (name,))
                db.execute("DELETE FROM shards WHERE name = ?", (name,))
            (self.folder / name).unlink(missing_ok=True)

    def _write_shard(self, db: sqlite3.Connection, images: np.ndarray, hashes: list[str]) -> None:
        """One shard: written whole, flushed, renamed; then indexed in one transaction."""
        name = f"{uuid.uuid4().hex}.npy"

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.save(f, images)
                f.flush()
                os.fsync(f.fileno())

        path = atomic_write(self.folder / name, write)
        with db:
            db.execute(
                "INSERT INTO shards VALUES (?, ?, ?)", (name, len(hashes), path.stat().st_size)
            )
            db.executemany(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?)",
                [(h, name, row) for row, h in enumerate(hashes)],
            )

    def compact(self, db: sqlite3.Connection) -> None:
        """Rewrite shards holding removed entries, and merge small ones (each retrain after
        an import adds one), into full shards: one shard's images in RAM at a time. Entries
        move to their new shard before the old one is dropped, so a kill in between leaves
        an old shard with no entries, which the next compaction deletes. Fill lock held."""
        stats = db.execute(
            "SELECT s.name, s.rows, COUNT(e.hash) FROM shards s "
            "LEFT JOIN entries e ON e.shard = s.name GROUP BY s.name ORDER BY s.name"
        ).fetchall()
        loose = [name for name, rows, live in stats if live < rows or rows < self.shard_rows // 2]
        if len(loose) < 2 and all(live == rows for _, rows, live in stats):
            return  # one small shard and nothing removed: nothing to gain
        images: list[np.ndarray] = []
        hashes: list[str] = []
        for name in loose:
            pixels = np.load(self.folder / name, mmap_mode="r")
            for digest, pos in db.execute(
                "SELECT hash, pos FROM entries WHERE shard = ? ORDER BY pos", (name,)
            ).fetchall():
                images.append(np.array(pixels[pos]))
                hashes.append(digest)
                if len(hashes) == self.shard_rows:
                    self._write_shard(db, np.stack(images), hashes)
                    images, hashes = [], []
        if hashes:
            self._write_shard(db, np.stack(images), hashes)
        for name in loose:
            with db:
                db.execute("DELETE FROM shards WHERE name = ?", (name,))
            (self.folder / name).unlink(missing_ok=True)

    def fill(
        self,
        paths: Sequence[str],
        hashes: Sequence[str],
        max_bytes: int,
        max_pixels: int | None = MAX_IMAGE_PIXELS,
        workers: int | None = None,
    ) -> int:
        """Decode the images not cached yet, in order, while the cache (every size) stays
        under ``max_bytes``; returns how many were decoded. An unreadable file is an error
        naming it. Raises :class:`CacheUnavailable` when the folder cannot be written."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with _locked(self.folder / _FILL_LOCK, fcntl.LOCK_EX), closing(self._connect()) as db:
                self.repair(db)
                return self._fill_locked(db, paths, hashes, max_bytes, max_pixels, workers)
        except (OSError, sqlite3.Error) as err:
            raise CacheUnavailable(f"{self.folder}: {err}") from err

    def _fill_locked(
        self,
        db: sqlite3.Connection,
        paths: Sequence[str],
        hashes: Sequence[str],
        max_bytes: int,
        max_pixels: int | None,
        workers: int | None,
    ) -> int:
        cached = {h for (h,) in _wanted(db, hashes)}
        missing: dict[str, str] = {}  # hash -> a file with that content, first seen
        for path, digest in zip(paths, hashes, strict=True):
            if digest not in cached and digest not in missing:
                missing[digest] = path
        todo = list(missing.items())
        chunks, used = [], _bytes_under(self.folder.parent, "*.npy")
        while todo:  # shard by shard while the pixels stay under max_bytes
            fits = (max_bytes - used - _NPY_HEADER) // self.image_bytes
            if fits <= 0:
                break
            chunks.append(todo[: min(self.shard_rows, fits)])
            todo = todo[len(chunks[-1]) :]
            used += _NPY_HEADER + len(chunks[-1]) * self.image_bytes
        if todo:
            log.warning(
                "decode cache full (%.2f GB, train.decode_cache_max_gb): %d images are decoded "
                "from their files every epoch instead; `opensig cache --prune` frees the "
                "entries no manifest uses",
                max_bytes / 1e9,
                len(todo),
            )
        total = sum(map(len, chunks))
        if not total:
            return 0
        pool = ThreadPoolExecutor(workers or os.cpu_count() or 1)
        with pool, image_bar(total, "decoding once") as bar:
            for chunk in chunks:
                shard = np.empty((len(chunk), self.size, self.size, self.in_chans), np.uint8)
                jobs = [(p, self.size, self.in_chans, max_pixels) for _, p in chunk]
                for i, image in enumerate(pool.map(_decode, jobs)):  # Pillow releases the GIL
                    if isinstance(image, str):
                        raise RuntimeError(
                            f"{chunk[i][1]}: {image}; the data changed since ingest: rerun it"
                        )
                    shard[i] = image
                    bar.update()
                self._write_shard(db, shard, [h for h, _ in chunk])
        return total


def prepare(
    paths: Sequence[str],
    hashes: Sequence[str],
    size: int,
    in_chans: int,
    cache_dir: Path,
    max_bytes: int,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> Decoded:
    """Cache what fits of these images under ``max_bytes`` and say where each one is: the
    training's entry. A folder that cannot be written is warned about, and what it already
    holds is still used."""
    folder = CacheFolder.of(cache_dir, size, in_chans)
    try:
        decoded = folder.fill(paths, hashes, max_bytes, max_pixels)
    except CacheUnavailable as err:
        log.warning("decode cache unavailable (%s): decoding from the files instead", err)
        decoded = 0
    try:
        found = folder.lookup(hashes)
    except (OSError, sqlite3.Error) as err:
        log.warning("decode cache %s unreadable (%s): decoding from the files", folder.folder, err)
        return Decoded(folder.folder, [], np.full(len(hashes), -1, np.int32), np.zeros(0))
    log.info(
        "decode cache %s: %d of %d images cached (%d decoded now), %d from their files",
        folder.folder,
        found.n_cached,
        len(hashes),
        decoded,
        len(hashes) - found.n_cached,
    )
    return found


@dataclass(frozen=True)
class Usage:
    """One cache folder: what it holds, and how much of it a set of manifests uses."""

    folder: Path
    entries: int
    shards: int
    bytes: int
    used: int | None  # entries whose hash a manifest holds; None: no manifest given


def _folders(cache_dir: Path) -> tuple[list[CacheFolder], list[Path]]:
    """The folders of this decoder version, and those of older ones (never read again)."""
    root = decoded_root(cache_dir)
    current, stale = [], []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        shape, _, version = path.name.partition("-v")
        size, _, chans = shape.rpartition("x")
        if not (path.is_dir() and chans.isdigit() and size.partition("x")[0].isdigit()):
            continue
        if version == DECODE_VERSION:
            current.append(CacheFolder(path, int(size.partition("x")[0]), int(chans)))
        else:
            stale.append(path)
    return current, stale


def usage(cache_dir: Path, used_hashes: Sequence[str] | None = None) -> list[Usage]:
    """What each folder of the decode cache holds (read-only)."""
    rows = []
    for cache in _folders(cache_dir)[0]:
        entries = shards = used = 0
        if (cache.folder / INDEX).is_file():
            with closing(cache._connect(readonly=True)) as db:
                if _has_index(db):
                    (entries,) = db.execute("SELECT COUNT(*) FROM entries").fetchone()
                    (shards,) = db.execute("SELECT COUNT(*) FROM shards").fetchone()
                    if used_hashes is not None:
                        used = len(_wanted(db, used_hashes))
        rows.append(
            Usage(
                cache.folder,
                entries,
                shards,
                _bytes_under(cache.folder),
                used if used_hashes is not None else None,
            )
        )
    return rows


def prune(cache_dir: Path, keep_hashes: Sequence[str]) -> tuple[int, int]:
    """Remove the entries whose hash is not in ``keep_hashes`` (every folder), then compact;
    returns (entries removed, bytes freed). Refuses while a training reads the cache."""
    removed = 0
    before = _bytes_under(decoded_root(cache_dir))
    current, stale = _folders(cache_dir)
    for folder in stale:
        log.info("removing %s: an older decoder's images", folder)
        shutil.rmtree(folder)
    for cache in current:
        with (
            _locked(cache.folder / _FILL_LOCK, fcntl.LOCK_EX),
            (cache.folder / _READ_LOCK).open("ab") as readers,
            closing(cache._connect()) as db,
        ):
            try:
                fcntl.flock(readers, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(
                    f"{cache.folder}: a training is reading this cache; prune it when it ends"
                ) from None
            cache.repair(db)
            _wanted(db, keep_hashes)
            with db:
                removed += db.execute(
                    "DELETE FROM entries WHERE hash NOT IN (SELECT hash FROM wanted)"
                ).rowcount
            cache.compact(db)
    return removed, before - _bytes_under(decoded_root(cache_dir))
