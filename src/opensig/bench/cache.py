"""Decode-cache benchmark: does filling the cache stay within a memory limit smaller than
the data it caches, and what does each image cost?

Fashion-MNIST PNGs cached at the model's size (224 px, 3 channels by default: 150 kB an
image, so 12k images are 1.8 GB of pixels). Each phase runs in a child process, inside a
cgroup (v1) memory limit when this process may create one (root on Linux): the child is
killed if the cache holds more than the limit in RAM. Reported per phase: seconds, images/s,
the child's peak RSS (VmHWM, and its RSS once imports are done, before any image) and the
cgroup's peak usage (page cache included), and the cache's bytes on disk:

- fill: every image decoded once, into an empty cache;
- incremental: ``added`` more images, after which only they are decoded;
- read: every cached image read back in a random order, as an epoch reads them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from opensig.bench.common import environment, markdown_table
from opensig.bench.options import CacheOptions
from opensig.data import demo
from opensig.data.cache import usage
from opensig.io import atomic_write, write_json

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")

# One phase, in the child: the files listed in argv[1] (JSON), cached or read back.
PHASE = """
import json, sys, time
import numpy as np
from pathlib import Path
from opensig.data import cache

def status(key):  # kB figures of this process, from the kernel
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

imported = status("VmRSS")  # the interpreter, torch and opencv: before any image
phase, listing, cache_dir, size, chans = sys.argv[1:6]
paths = json.loads(Path(listing).read_text())
hashes = [Path(p).stem for p in paths]
start = time.perf_counter()
if phase == "read":
    decoded = cache.CacheFolder.of(Path(cache_dir), int(size), int(chans)).lookup(hashes)
    for i in np.random.default_rng(0).permutation(len(paths)):
        decoded.get(int(i))
    done = len(paths)
else:
    done = cache.CacheFolder.of(Path(cache_dir), int(size), int(chans)).fill(paths, hashes, 10**13)
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds, "images": done, "rss_after_imports_bytes": imported,
    "peak_rss_bytes": status("VmHWM"),
}))
"""


def _cgroup(limit_bytes: int) -> Path | None:
    """A fresh memory cgroup with that limit, or None where this process may not make one."""
    group = CGROUP_ROOT / f"opensig-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except OSError as err:
        log.warning("no memory cgroup (%s): the phases run without a limit", err)
        return None
    return group


def _phase(name: str, listing: Path, opts: CacheOptions, limit: int) -> dict:
    """One phase in a child (inside a fresh cgroup where possible): its figures."""
    group = _cgroup(limit)
    enter = None if group is None else (lambda: (group / "cgroup.procs").write_text("0"))
    args = [name, str(listing), str(opts.work / "cache"), str(opts.image_size), str(opts.in_chans)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", PHASE, *args],
            capture_output=True,
            text=True,
            preexec_fn=enter,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"bench cache: phase {name} failed (exit {done.returncode}; killed at the "
                f"memory limit if -9):\n{done.stderr[-2000:]}"
            )
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        if group is not None:
            figures["cgroup_peak_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
            figures["cgroup_limit_hits"] = int((group / "memory.failcnt").read_text())
    finally:
        if group is not None:
            group.rmdir()
    figures["images_per_s"] = figures["images"] / figures["seconds"] if figures["images"] else 0
    figures["cache_bytes"] = sum(u.bytes for u in usage(opts.work / "cache"))
    return figures


def run_cache(opts: CacheOptions) -> dict:
    """Every phase; writes ``cache_<size>px.{json,md}`` under ``opts.out``."""
    if opts.images < 10 or opts.added < 1:
        raise ValueError("--images must be at least 10 and --added at least 1")
    data = opts.work / "data"
    total = opts.images + opts.added
    if not data.is_dir() or len(list(data.rglob("*.png"))) < total:
        shutil.rmtree(data, ignore_errors=True)
        demo.write_fashion_mnist(data, per_class=-(-total // 10))
    files = sorted(str(p) for p in data.rglob("*.png"))[:total]
    shutil.rmtree(opts.work / "cache", ignore_errors=True)
    limit = int(opts.memory_limit_gb * 1e9)
    phases = {}
    for name, subset in (("fill", files[: opts.images]), ("incremental", files), ("read", files)):
        listing = opts.work / f"{name}.json"
        listing.write_text(json.dumps(subset))
        log.info("bench cache: %s (%d images)", name, len(subset))
        phases[name] = _phase("read" if name == "read" else "fill", listing, opts, limit)
    pixels = opts.images * opts.image_size**2 * opts.in_chans
    results = {
        "phases": phases,
        "pixels_bytes": pixels,
        "memory_limit_bytes": limit,
        "meta": {**environment(), "options": {k: str(v) for k, v in asdict(opts).items()}},
    }
    stem = opts.out / f"cache_{opts.image_size}px"
    write_json(stem.with_suffix(".json"), results)
    table = to_markdown(results)
    atomic_write(stem.with_suffix(".md"), lambda tmp: tmp.write_text(table))
    return results


def _gb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e9:.2f}"


def to_markdown(results: dict) -> str:
    """One row per phase: images, time, rate, memory peaks, cache size on disk."""
    rows = [
        [
            name,
            str(p["images"]),
            f"{p['seconds']:.1f}",
            f"{p['images_per_s']:.0f}",
            _gb(p["rss_after_imports_bytes"]),
            _gb(p["peak_rss_bytes"]),
            _gb(p.get("cgroup_peak_bytes")),
            _gb(p["cache_bytes"]),
        ]
        for name, p in results["phases"].items()
    ]
    header = ["phase", "images", "s", "images/s", "RSS after imports GB", "peak RSS GB"]
    header += ["cgroup peak GB", "cache GB"]
    lines = [
        f"Pixels cached: {results['pixels_bytes'] / 1e9:.2f} GB; memory limit of each phase: "
        f"{results['memory_limit_bytes'] / 1e9:.2f} GB (cgroup v1, page cache included).",
        "",
        *markdown_table(header, rows),
    ]
    return "\n".join(lines) + "\n"
