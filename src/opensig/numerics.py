"""What decides a training's floating-point path, recorded beside what it produced.

With the same data, params, code and seed, a training repeats bit for bit: every epoch
reseeds all it draws (``opensig.train``), and a resumed run ends with the uninterrupted
run's weights. The arithmetic itself is not fixed by those, though: torch picks its CPU
kernels by the instruction set it finds (AVX2, AVX-512) and splits sums over its threads,
a GPU's by its model and cuDNN. Change any of them and the first rounding differs, and
over thousands of steps the network ends as far from the first as another seed's would
(bench/README.md measures it). So the train report and the bench's results name the path.
"""

from __future__ import annotations

import torch


def numerics(device: torch.device) -> dict[str, str | int | None]:
    """The torch build, CPU kernel level and thread count, and on CUDA the GPU and cuDNN."""
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
    }
