"""The decode cache: the same pixels as decoding the files, one entry per image, bounded in
size, incremental, shared, and never a half-written entry read after a kill or a full disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from typer.testing import CliRunner

from opensig.cli import app
from opensig.config import load_config
from opensig.data import cache
from opensig.data.cache import CacheFolder, prepare, prune, usage
from opensig.data.dataset import ImageDataset
from opensig.data.manifest import read_manifest
from opensig.stages import HERE, ingest
from opensig.train import train_model
from tests.conftest import REPO, write_params

SIZE = 16


def _images(folder: Path, n: int, start: int = 0) -> tuple[list[str], list[str]]:
    """``n`` distinct PNGs of different sizes and aspect ratios, with stand-in hashes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        shape = (20 + i % 9, 30 - i % 7)
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths, [f"h{i}" for i in range(start, start + n)]


def _pixels(paths: list[str], decoded: cache.Decoded | None, in_chans: int = 1) -> np.ndarray:
    dataset = ImageDataset(paths, None, SIZE, in_chans, decoded)
    return np.stack([dataset[i]["image"].numpy() for i in range(len(paths))])


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> int:
    """Shards of 8 grey 16 px images, so a few dozen images make several."""
    monkeypatch.setattr(cache, "SHARD_BYTES", 8 * SIZE * SIZE)
    return 8


@pytest.mark.parametrize("in_chans", [1, 3])
def test_cached_pixels_are_exactly_the_files(tmp_path: Path, in_chans: int) -> None:
    paths, hashes = _images(tmp_path / "img", 5)
    decoded = prepare(paths, hashes, SIZE, in_chans, tmp_path / "cache", 10**9)
    assert decoded.n_cached == 5
    assert np.array_equal(_pixels(paths, decoded, in_chans), _pixels(paths, None, in_chans))


def test_adding_images_decodes_only_them(tmp_path: Path, small_shards: int) -> None:
    paths, hashes = _images(tmp_path / "img", 40)
    folder = CacheFolder.of(tmp_path / "cache", SIZE, 1)
    assert folder.fill(paths, hashes, 10**9) == 40
    before = usage(tmp_path / "cache")[0].bytes
    more, more_hashes = _images(tmp_path / "img", 10, start=40)
    assert folder.fill(paths + more, hashes + more_hashes, 10**9) == 10  # exactly the new ones
    grown = usage(tmp_path / "cache")[0].bytes - before
    assert 10 * SIZE * SIZE <= grown < 10 * SIZE * SIZE + 4096  # their pixels, not a copy
    assert folder.fill(paths + more, hashes + more_hashes, 10**9) == 0
    decoded = folder.lookup(hashes + more_hashes)
    assert decoded.n_cached == 50
    assert np.array_equal(_pixels(paths + more, decoded), _pixels(paths + more, None))


def test_a_cap_caches_what_fits_and_decodes_the_rest(tmp_path: Path, small_shards: int) -> None:
    paths, hashes = _images(tmp_path / "img", 30)
    cap = 20 * (SIZE * SIZE + 128)  # 20 images and their shards' headers, not 30
    decoded = prepare(paths, hashes, SIZE, 1, tmp_path / "cache", cap)
    assert 10 < decoded.n_cached < 30
    assert sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.npy")) <= cap
    assert np.array_equal(_pixels(paths, decoded), _pixels(paths, None))


def test_duplicates_are_cached_once(tmp_path: Path) -> None:
    paths, hashes = _images(tmp_path / "img", 3)
    folder = CacheFolder.of(tmp_path / "cache", SIZE, 1)
    assert folder.fill(paths + paths[:1], hashes + hashes[:1], 10**9) == 3
    assert folder.lookup(hashes + hashes[:1]).n_cached == 4


def test_an_unreadable_file_names_itself(tmp_path: Path) -> None:
    paths, hashes = _images(tmp_path / "img", 2)
    Path(paths[1]).write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match=r"1\.png: .*rerun"):
        CacheFolder.of(tmp_path / "cache", SIZE, 3).fill(paths, hashes, 10**9)


def _child(script: str, *args: str, wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python process (it may kill itself), from the repository;
    ``wrap``: a command it runs under."""
    return subprocess.run(
        [*wrap, sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"},
        capture_output=True,
        text=True,
        timeout=120,
    )


# Root writes anywhere: without these capabilities, it obeys the folders' modes.
NO_OVERRIDE = "-dac_override,-dac_read_search"
AS_ROOT_WITHOUT_OVERRIDE = (
    "setpriv",
    f"--inh-caps={NO_OVERRIDE}",
    f"--bounding-set={NO_OVERRIDE}",
)


# A fill in a child process, SIGKILLed at a chosen point of its second shard's write.
KILLED_FILL = """
    import os, signal, sys
    from pathlib import Path
    import opensig.data.cache as cache
    from tests.test_cache import SIZE, _images

    where, folder = sys.argv[1], Path(sys.argv[2])
    cache.SHARD_BYTES = 8 * SIZE * SIZE
    real, calls = cache.atomic_write, []

    def dying_write(path, write):
        calls.append(path)
        if len(calls) == 2 and where == "writing":
            tmp = path.parent / f".{path.name}.x.tmp"
            tmp.write_bytes(b"\\x93NUMPY half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(path, write)
        if len(calls) == 2 and where == "renamed":  # in place, not in the index yet
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    cache.atomic_write = dying_write
    paths, hashes = _images(folder / "img", 24)
    cache.CacheFolder.of(folder / "cache", SIZE, 1).fill(paths, hashes, 10**9)
"""


@pytest.mark.parametrize("where", ["writing", "renamed"])
def test_a_killed_fill_leaves_nothing_half_written(
    tmp_path: Path, small_shards: int, where: str
) -> None:
    done = _child(KILLED_FILL, where, str(tmp_path))
    assert done.returncode == -9
    folder = CacheFolder.of(tmp_path / "cache", SIZE, 1)
    left = sorted(p.name for p in folder.folder.iterdir() if not p.name.startswith(".fill"))
    assert len([n for n in left if n.endswith((".npy", ".tmp"))]) == 2  # shard 1 + debris
    paths, hashes = _images(tmp_path / "img", 24)
    assert folder.lookup(hashes).n_cached == 8  # only the committed shard counts
    assert folder.fill(paths, hashes, 10**9) == 16  # the rest decoded again, once
    names = [p.name for p in folder.folder.iterdir()]
    assert (
        not [n for n in names if n.endswith(".tmp")]
        and len([n for n in names if n.endswith(".npy")]) == 3
    )
    assert np.array_equal(_pixels(paths, folder.lookup(hashes)), _pixels(paths, None))


def test_a_shard_cut_short_is_dropped_and_rebuilt(
    tmp_path: Path, small_shards: int, caplog: pytest.LogCaptureFixture
) -> None:
    paths, hashes = _images(tmp_path / "img", 16)
    folder = CacheFolder.of(tmp_path / "cache", SIZE, 1)
    folder.fill(paths, hashes, 10**9)
    shard = sorted(folder.folder.glob("*.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # a disk that lost the file's tail
    assert folder.fill(paths, hashes, 10**9) == 8
    assert f"{shard.name} is damaged" in caplog.text
    assert np.array_equal(_pixels(paths, folder.lookup(hashes)), _pixels(paths, None))


# Files beyond 3000 bytes fail with EFBIG (SIGXFSZ ignored): a disk that fills mid-shard.
FULL_DISK_FILL = """
    import json, logging, resource, signal, sys
    from pathlib import Path
    import opensig.data.cache as cache
    from tests.test_cache import SIZE, _images

    logging.basicConfig(level=logging.INFO)
    folder = Path(sys.argv[1])
    paths, hashes = _images(folder / "img", 24)
    cache.SHARD_BYTES = 8 * SIZE * SIZE  # 2048 pixel bytes a shard: the index outgrows 3000
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
    decoded = cache.prepare(paths, hashes, SIZE, 1, folder / "cache", 10**9)
    print(json.dumps({"cached": decoded.n_cached}))
"""


def test_a_full_disk_warns_and_decodes_on_the_fly(tmp_path: Path, small_shards: int) -> None:
    run = _child(FULL_DISK_FILL, str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "decode cache unavailable" in run.stderr and "decoding from the files" in run.stderr
    assert "Traceback" not in run.stderr
    folder = CacheFolder.of(tmp_path / "cache", SIZE, 1)
    cached = json.loads(run.stdout)["cached"]
    assert not list(folder.folder.glob("*.tmp"))
    paths, hashes = _images(tmp_path / "img", 24)
    assert folder.lookup(hashes).n_cached == cached < 24  # what the index names is there
    assert folder.fill(paths, hashes, 10**9) == 24 - cached  # room again: the rest, once
    assert np.array_equal(_pixels(paths, folder.lookup(hashes)), _pixels(paths, None))


# Reads and fills the cache as another user, for whom the folder is read-only.
READ_ONLY_FILL = """
    import json, logging, sys
    from pathlib import Path
    from opensig.data.cache import prepare
    from tests.test_cache import SIZE

    logging.basicConfig(level=logging.INFO)
    folder, n = Path(sys.argv[1]), int(sys.argv[2])
    paths = [str(folder / "img" / f"{i}.png") for i in range(n)]  # as _images wrote them
    hashes = [f"h{i}" for i in range(n)]
    decoded = prepare(paths, hashes, SIZE, 1, folder / "cache", 10**9)
    print(json.dumps({"cached": decoded.n_cached}))
"""


def test_a_read_only_cache_is_read_and_never_written(tmp_path: Path) -> None:
    """Where the tests run as root, the child drops the capability to write anywhere."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): cannot make a folder read-only")
    shared = tmp_path / "shared"
    try:
        paths, hashes = _images(shared / "img", 6)
        CacheFolder.of(shared / "cache", SIZE, 1).fill(paths[:4], hashes[:4], 10**9)
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        wrap = AS_ROOT_WITHOUT_OVERRIDE if os.geteuid() == 0 else ()
        run = _child(READ_ONLY_FILL, str(shared), "6", wrap=wrap)
        assert run.returncode == 0, run.stderr
        assert "decode cache unavailable" in run.stderr and "Traceback" not in run.stderr
        assert json.loads(run.stdout) == {"cached": 4}  # what it holds is still used
    finally:
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o755)
        shutil.rmtree(shared)


def test_prune_removes_unused_entries_and_compacts(tmp_path: Path, small_shards: int) -> None:
    paths, hashes = _images(tmp_path / "img", 30)
    folder = CacheFolder.of(tmp_path / "cache", SIZE, 1)
    folder.fill(paths[:20], hashes[:20], 10**9)
    folder.fill(paths, hashes, 10**9)  # a retrain after an import: one more, small shard
    keep = hashes[5:25]
    reading = folder.lookup(keep)
    with pytest.raises(RuntimeError, match="a training is reading this cache"):
        prune(tmp_path / "cache", keep)
    reading.close()
    before = usage(tmp_path / "cache", keep)[0]
    assert (before.entries, before.used) == (30, 20)
    removed, freed = prune(tmp_path / "cache", keep)
    after = usage(tmp_path / "cache", keep)[0]
    assert removed == 10 and (after.entries, after.used) == (20, 20)
    assert after.shards == 20 // small_shards + 1 < before.shards  # full shards again
    assert freed >= 10 * SIZE * SIZE and after.bytes == before.bytes - freed
    kept = [paths[hashes.index(h)] for h in keep]
    decoded = folder.lookup(keep)
    assert decoded.n_cached == 20
    assert np.array_equal(_pixels(kept, decoded), _pixels(kept, None))
    assert folder.lookup(hashes[:5]).n_cached == 0


def test_cache_command_reports_and_prunes(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config()
    ingest(cfg)
    manifest = read_manifest(HERE.manifest, cfg.data.root)
    paths, hashes = manifest["path"].tolist(), manifest["hash"].tolist()
    extra, extra_hashes = _images(project / "elsewhere", 5)
    prepare(paths + extra, hashes + extra_hashes, SIZE, 1, cfg.data.cache_dir, 10**9)
    runner = CliRunner()
    caplog.set_level("INFO", logger="opensig")
    assert runner.invoke(app, ["cache"]).exit_code == 0
    assert f"{len(paths) + 5} images in 1 shards" in caplog.text
    assert f"{len(paths)} used by artifacts/manifest.parquet" in caplog.text
    caplog.clear()
    assert runner.invoke(app, ["cache", "--prune"]).exit_code == 0
    assert "removed 5 entries" in caplog.text
    assert f"{len(paths)} images in 1 shards" in caplog.text


def test_training_gives_the_same_weights_with_a_cap_below_the_data(project: Path) -> None:
    """Bit-exact on CPU: a third of the images cached, the rest decoded every epoch, or all
    cached; each run with a cache of its own, so neither reuses the other's entries."""
    weights = {}
    for name, cap in {"capped": 0.00012, "uncapped": None}.items():
        write_params(
            project,
            {
                "train": {"epochs": 1, "decode_cache_max_gb": cap},
                "data": {"cache_dir": f"cache-{name}"},
            },
        )
        cfg = load_config()
        ingest(cfg)
        manifest = read_manifest(HERE.manifest, cfg.data.root)
        out = project / name
        train_model(cfg, manifest, out / "model", out / "last")
        weights[name] = load_file(out / "model" / "weights.safetensors")
        held = usage(project / f"cache-{name}")[0]
        if cap is not None:
            assert 0 < held.entries < len(manifest) / 2
            assert sum(p.stat().st_size for p in held.folder.glob("*.npy")) <= cap * 1e9
        else:
            assert held.entries == len(manifest[manifest["split"].isin(["train", "val"])])
    assert weights["capped"].keys() == weights["uncapped"].keys()
    for key, value in weights["uncapped"].items():
        assert np.array_equal(weights["capped"][key], value), key
