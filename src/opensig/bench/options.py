"""The options of the `opensig bench` commands, one dataclass per command.

Each field is one command-line option, written once: its type, its default and, in the
field's metadata, its ``help`` and (where it is not the field's name) its ``option`` name;
`opensig.cli` builds each command from its dataclass. Plain data, importing nothing of
opensig: `opensig` imports this module at every start (the commands need their options),
so that whatever it imported would be every dvc stage's code dep. The benchmarks check the
values (`openset.checked`, `speed.check`) before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


@dataclass
class BenchOptions:
    """`opensig bench openset`: every method with every feature score, same budget."""

    dataset: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist or digits"})
    seeds: int = field(default=1, metadata={"help": "number of seeds (0..n-1): mean ± std"})
    first_seed: int = field(
        default=0, metadata={"help": "start the seeds here (a part of a table: `bench merge`)"}
    )
    methods: list[str] | None = field(  # None: every method
        default=None, metadata={"option": "--method", "help": "repeat; default all"}
    )
    feature_scores: list[str] | None = field(  # None: every feature score
        default=None,
        metadata={
            "option": "--feature-score",
            "help": "repeat; default all (mahalanobis, mahalanobis++, rmd, knn, "
            "mahalanobis+ratio, none)",
        },
    )
    splits: int = field(
        default=0,
        metadata={"help": "0: the fixed class split; N: N random 6/2/2 splits of the classes"},
    )
    near: bool = field(
        default=False,
        metadata={"help": "novel classes nearest the known ones, far ones as training unknowns"},
    )
    epochs: int = 16  # params.yaml's default recipe (bench/README.md: Recipe ablations)
    backbone: str = "resnet18d"  # params.yaml's too
    image_size: int = field(
        default=40,
        metadata={"help": "px; 28 px images upsampled past resnet18d's 32x downsampling"},
    )
    in_chans: int = 1
    batch_size: int = 128
    device: str = "auto"
    per_class: int | None = field(default=1000, metadata={"help": "train images per class (cap)"})
    test_per_class: int | None = field(default=None, metadata={"help": "test images per class cap"})
    cross_check: bool = field(
        default=True,
        metadata={"help": "also score each network with pytorch-ood's detectors ([bench] extra)"},
    )
    pictures: bool = field(
        default=True,
        metadata={"help": "draw each evaluation's pictures for MLflow (most of a tiny run's time)"},
    )
    out: Path = Path("bench/results")
    work: Path = Path("bench/work")


@dataclass
class WarmStartOptions:
    """`opensig bench warm-start`: the open-set protocol's Fashion-MNIST split, one seed."""

    # Not options: fixed for this benchmark, read by `prepare_manifest` and `run_config`.
    dataset: ClassVar[str] = "fashion-mnist"
    in_chans: ClassVar[int] = 1

    added: str = field(default="sandal", metadata={"help": "the class the champion never saw"})
    epochs: int = field(default=6, metadata={"help": "from-scratch epochs; warm runs try 1..this"})
    backbone: str = "resnet18"
    image_size: int = 28
    batch_size: int = 128
    device: str = "auto"
    per_class: int = field(default=500, metadata={"help": "train images per class (cap)"})
    test_per_class: int = field(default=100, metadata={"help": "test images per class cap"})
    seed: int = 0
    out: Path = Path("bench/results")
    work: Path = Path("bench/work/warm-start")


@dataclass
class SpeedOptions:
    """`opensig bench speed`: train, predict and ingest throughput against their limits."""

    backbone: str = "resnet18"
    image_size: int = 64
    in_chans: int = 1
    batch_size: int = 128
    device: str = "auto"
    epochs: int = field(  # the first epoch pays for warm-up and decoding
        default=2, metadata={"help": "train epochs; the last is measured"}
    )
    per_class: int = field(  # of the 6 known classes
        default=500, metadata={"help": "Fashion-MNIST train images per class"}
    )
    rounds: int = field(  # stage, limit and reference interleaved
        default=3, metadata={"help": "interleaved repeats; medians and min-max reported"}
    )
    ingest_images: int | None = field(  # train then test files; None: all 70k
        default=None, metadata={"help": "ingest test: images per class [default: all 70k]"}
    )
    out: Path = Path("bench/results")
    work: Path = Path("bench/work/speed")


@dataclass
class ScaleOptions:
    """`opensig bench scale`: images/s of predict on one process and on Spark local[1], local[2]."""

    backbone: str = "resnet18"
    image_size: int = field(  # large enough that one configuration runs 30 s or more
        default=128, metadata={"help": "model input size: scoring, not reading, should dominate"}
    )
    images: int = field(default=4000, metadata={"help": "Fashion-MNIST PNGs scored per run"})
    threads: int = field(default=2, metadata={"help": "torch threads of the one-process predict"})
    rounds: int = field(
        default=3, metadata={"help": "interleaved repeats; medians and min-max reported"}
    )
    out: Path = Path("bench/results")
    work: Path = Path("bench/work/scale")


@dataclass
class CacheOptions:
    """`opensig bench cache`: the decode cache filled under a memory limit, then grown."""

    images: int = field(default=12_000, metadata={"help": "Fashion-MNIST images to cache"})
    image_size: int = field(  # 224 px x 3 channels: 150 kB an image, 1.8 GB for 12k
        default=224, metadata={"help": "model input size the images are cached at"}
    )
    in_chans: int = 3
    memory_limit_gb: float = field(
        default=1.0, metadata={"help": "cgroup memory limit of the filling process (root only)"}
    )
    added: int = field(default=120, metadata={"help": "images added for the incremental fill"})
    out: Path = Path("bench/results")
    work: Path = Path("bench/work/cache")


@dataclass
class IngestScaleOptions:
    """`opensig bench ingest-scale`: per-file costs of ingest, DVC and the prediction log."""

    files: int = field(  # at least 200k for the per-file figure (issue: docs/scale.md)
        default=200_000, metadata={"help": "small PNG files in the synthetic data tree"}
    )
    added: int | None = field(  # the next retrain's new images: the incremental re-run
        default=None, metadata={"help": "files added before the incremental re-run [1% of --files]"}
    )
    log_rows: int = field(default=1_000_000, metadata={"help": "rows in the prediction log"})
    log_batch: int = field(  # predict --log writes one file per job, a served worker per request
        default=1000, metadata={"help": "rows per prediction-log file (one append)"}
    )
    review_max: int = field(default=200, metadata={"help": "review export: images per batch"})
    dvc: bool = field(default=True, metadata={"help": "time dvc add, status, push and pull"})
    out: Path = Path("bench/results")
    work: Path = Path("bench/work/ingest-scale")
