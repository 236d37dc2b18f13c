"""What the benchmarks share: the budget they apply to the user's params, the machine and
versions a figure is measured on, and how rounds are summed up (median and spread) and
tabled."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

import opensig
from opensig.config import Config
from opensig.numerics import numerics


def budget_params(base: Config, opts: Any) -> dict:
    """The user's params (as a dict) with a benchmark's shared budget applied: the model
    from scratch, epochs, batch, device, and a decode cache shared by every run in
    ``opts.work``. ``opts`` is any options object with those fields."""
    raw = base.model_dump(mode="json")
    raw["model"].update(
        backbone=opts.backbone,
        image_size=opts.image_size,
        in_chans=opts.in_chans,
        pretrained=False,
        pretrained_file=None,
    )
    raw["train"].update(epochs=opts.epochs, batch_size=opts.batch_size, device=opts.device)
    raw["data"]["cache_dir"] = str(opts.work / "cache")
    return raw


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# Where and when a result ran, not what ran: kept per file by `bench merge`, never a
# setting `bench compare` or `merge` holds two results to.
MACHINE_KEYS = ("machine", "cpu_count", "gpu", "cpu_capability", "threads", "date")


def environment(device: torch.device | None = None) -> dict:
    """Machine, accelerator and versions: what a figure needs beside it to mean anything,
    and the kernels and threads it ran on (the same seed elsewhere is another network)."""
    path = numerics(device or torch.device("cpu"))
    return {
        "machine": f"{_cpu_model()} ({platform.machine()}, {platform.system()})",
        "cpu_count": os.cpu_count(),
        "gpu": path["gpu"],
        "cpu_capability": path["cpu_capability"],
        "threads": path["threads"],
        "opensig": opensig.__version__,
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "timm": version("timm"),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def summary(rounds: list[dict]) -> dict:
    """The median of every figure over the rounds, and its spread: ``spread[key]`` = [min, max]."""
    keys = [key for key, value in rounds[0].items() if not isinstance(value, str)]
    values = {key: [r[key] for r in rounds] for key in keys}
    medians = {key: float(np.median(v)) for key, v in values.items()}
    return {**medians, "spread": {key: [float(min(v)), float(max(v))] for key, v in values.items()}}


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, its first column left-aligned and the figures right-aligned."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [line(header), line(["---"] + ["---:"] * (len(header) - 1)), *map(line, rows)]
