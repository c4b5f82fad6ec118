"""Cutting a stream into batches without reading it all (``itertools.batched`` arrives with Python 3.12)."""

from __future__ import annotations

from typing import Iterable, Iterator, List, TypeVar

Item = TypeVar("Item")


def batched(items: Iterable[Item], size: int) -> Iterator[List[Item]]:
    """Lists of ``size`` consecutive items (the last may be shorter), pulled from ``items`` as they are needed."""
    batch: List[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
