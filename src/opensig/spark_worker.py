"""What the pyfunc model does differently inside a Spark task (:mod:`opensig.spark` runs it
there): torch on the task's cores only, and the bundle loaded once per Python worker.
Imports no pyspark: the served model reads this module too, where Spark is absent."""

from __future__ import annotations

import sys
from pathlib import Path

from opensig.predict import Bundle


def task_cpus() -> int | None:
    """The cores of the Spark task this Python worker runs, None outside a task: how many
    threads torch may use there without oversubscribing the executor."""
    if "pyspark" not in sys.modules:  # only a Spark worker has it loaded
        return None
    from pyspark import TaskContext

    context = TaskContext.get()
    return context.cpus() if context is not None else None


_WORKER_BUNDLES: dict[Path, Bundle] = {}


def worker_bundle(bundle_dir: Path) -> Bundle:
    """The bundle, loaded once per Python worker: in local mode ``spark_udf`` loads the model
    in every task, and Spark reuses its Python workers from task to task."""
    key = bundle_dir.resolve()
    if key not in _WORKER_BUNDLES:
        _WORKER_BUNDLES[key] = Bundle.load(bundle_dir)
    return _WORKER_BUNDLES[key]
