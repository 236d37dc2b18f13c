"""bench/gpu-check.sh on a machine without CUDA: it says what it needs and exits 0."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_gpu_check_says_it_needs_cuda_and_exits_0() -> None:
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu-check.sh")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA GPU" in done.stdout and "nothing measured" in done.stdout
