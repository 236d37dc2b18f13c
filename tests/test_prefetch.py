"""Batches made ahead in a thread arrive as the loader makes them, errors included."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from opensig.data.prefetch import overlapped, prefetched


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

    with pytest.raises(ZeroDivisionError), overlapped(endless()) as batches:
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

    with overlapped(seeded(shuffled)) as batches:
        ahead = [batch[0].tolist() for batch in batches]
    assert ahead == [batch[0].tolist() for batch in seeded(shuffled)]
    assert not _producers()
    with_workers = DataLoader(data, batch_size=3, num_workers=1)
    with overlapped(with_workers) as batches:
        assert batches is with_workers  # its worker process reads ahead already
