"""Batches made ahead in a thread arrive as the loader makes them, errors included."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from opensig.data.prefetch import overlapped, prefetched, spare_core

GPU = torch.device("cuda")  # an accelerator: a core is spare (no CUDA needed to say so)


def _producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "opensig-prefetch"]


def test_items_arrive_in_order_and_are_made_ahead() -> None:
    made: list[int] = []

    def slow() -> Iterator[int]:
        for i in range(6):
            made.append(i)
            yield i

    out = prefetched(slow(), depth=2)
    assert next(out) == 0
    time.sleep(0.2)
    assert made == [0, 1, 2, 3]  # one handed over, two queued, one waiting to be queued
    assert [0, *out] == list(range(6))
    assert not _producers()


def test_an_error_is_raised_at_the_item_it_replaced() -> None:
    def broken() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetched(broken()):
            got.append(item)
    assert got == [1, 2]
    assert not _producers()


def test_leaving_the_block_early_stops_the_thread() -> None:
    def endless() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    with pytest.raises(ZeroDivisionError), overlapped(endless(), GPU) as batches:
        for item in batches:
            if item == 3:
                _ = 1 / 0
    assert not _producers()


def test_a_loader_without_workers_is_read_ahead_and_gives_the_same_batches() -> None:
    data = TensorDataset(torch.arange(10))
    shuffled = DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator())

    def seeded(loader: DataLoader) -> DataLoader:
        loader.generator.manual_seed(7)
        return loader

    with overlapped(seeded(shuffled), GPU) as batches:
        ahead = [batch[0].tolist() for batch in batches]
    assert ahead == [batch[0].tolist() for batch in seeded(shuffled)]
    assert not _producers()
    with_workers = DataLoader(data, batch_size=3, num_workers=1)
    with overlapped(with_workers, GPU) as batches:
        assert batches is with_workers  # its worker process reads ahead already


def test_on_cpu_the_thread_runs_only_when_torch_leaves_a_core_spare() -> None:
    cores = len(os.sched_getaffinity(0))
    data = DataLoader(TensorDataset(torch.arange(10)), batch_size=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        assert not spare_core(torch.device("cpu"))
        with overlapped(data, torch.device("cpu")) as batches:
            assert batches is data and not _producers()
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert spare_core(torch.device("cpu"))
            with overlapped(data, torch.device("cpu")) as batches:
                assert batches is not data  # a generator fed by the thread
                assert [b[0].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    finally:
        torch.set_num_threads(threads)
    assert spare_core(GPU)
