"""Benchmarks that print figures: `openset` (methods side by side), `speed` (throughput)."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

import opensig


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None) -> dict:
    """Machine, accelerator and versions: what a figure needs beside it to mean anything."""
    gpu = (
        torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None
    )
    return {
        "machine": f"{_cpu_model()} ({platform.machine()}, {platform.system()})",
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "opensig": opensig.__version__,
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "timm": version("timm"),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
