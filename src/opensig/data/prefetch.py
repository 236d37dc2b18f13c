"""Batches made ahead in a background thread while the model works on the current one.

On CPU the loaders have no worker processes (they would take the cores the convolutions
run on), so without this the model waits while each batch is read, decoded and collated.
Pillow's decoding and torch's kernels release the GIL: a thread lets the two overlap, where
there is a core for it. On GPU the loaders' worker processes already do it. Where torch's
threads already use every core (2 cores, bench/README.md) the thread only competes with
them: the decoding still takes its CPU time, and a torch thread that loses its core holds
up the others. So on CPU the thread runs only when a core is spare (``spare_core``).

The batches come in the order the loader makes them, the loader's random state lives in
the one producing thread, and ``iter(loader)`` is called before that thread starts, so a
seeded run sees exactly the batches it would see without the thread.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")

_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(batches: Iterable[T], depth: int = 2) -> Generator[T, None, None]:
    """Yield the items of ``batches``, producing up to ``depth`` of them ahead in a thread.

    An error raised while producing is raised here, at the item it replaced. Closing the
    generator (``overlapped`` does) stops the thread and waits for it.
    """
    source = iter(batches)
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not hand_over(item):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            hand_over(_Failed(err))
            return
        hand_over(_END)

    thread = threading.Thread(target=produce, name="opensig-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def spare_core(device: torch.device) -> bool:
    """Whether a thread making batches would not take a core from the model: always when
    it computes on an accelerator; on CPU, when torch's threads leave a core unused."""
    if device.type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) > torch.get_num_threads()


@contextmanager
def overlapped(batches: Iterable[T], device: torch.device) -> Iterator[Iterable[T]]:
    """``batches`` made ahead in a thread, unless it is a loader with worker processes (they
    read ahead already) or no core is spare for it on ``device`` (``spare_core``). The
    thread is stopped when the block ends, however it ends: a stage stopped by SIGTERM or
    an error exits with no thread left running."""
    if getattr(batches, "num_workers", 0) > 0 or not spare_core(device):
        yield batches
        return
    ahead = prefetched(batches)
    try:
        yield ahead
    finally:
        ahead.close()
