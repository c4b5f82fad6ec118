"""Cutting work into batches: a stream without reading it all, a tensor batch into network calls."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, List, Optional, TypeVar

import torch

Item = TypeVar("Item")


def batched(items: Iterable[Item], size: int) -> Iterator[List[Item]]:
    """Lists of ``size`` consecutive items (the last may be shorter), pulled from ``items`` as they are needed
    (``itertools.batched`` arrives with Python 3.12)."""
    batch: List[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def in_calls(network: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
             per_call: Optional[int]) -> torch.Tensor:
    """``network`` over ``batch`` in calls of ``per_call`` items along the first dimension, the outputs
    concatenated; None: one call for the whole batch."""
    if per_call is None or len(batch) <= per_call:
        return network(batch)
    return torch.cat([network(part) for part in batch.split(per_call)])
