"""Bucketing a mixed batch by base model (paper App. E): each engine gets one batched call, results go back in order.

    buckets = bucket_by_engine(requests, key=lambda r: r.engine)
    results = buckets.scatter({name: run(name, buckets.select(name)) for name in buckets.groups})
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Buckets(Generic[T]):
    """A mixed batch grouped by engine: `groups[key]` holds original indices, in original order."""

    items: list[T]
    groups: dict[Hashable, list[int]] = field(default_factory=dict)

    def select(self, key: Hashable) -> list[T]:
        """The items of one bucket, in their original relative order."""
        return [self.items[i] for i in self.groups[key]]

    def scatter(self, results: dict[Hashable, Sequence[R]]) -> list[R]:
        """Per-bucket results (aligned with `select(key)`) back into one list in the original batch order."""
        out: list[Any] = [None] * len(self.items)
        for key, indices in self.groups.items():
            if key not in results:
                raise KeyError(f"no results for bucket {key!r}")
            got = results[key]
            if len(got) != len(indices):
                raise ValueError(f"bucket {key!r}: {len(got)} results for {len(indices)} items")
            for i, r in zip(indices, got):
                out[i] = r
        return out


def bucket_by_engine(items: Sequence[T], key: Callable[[T], Hashable]) -> Buckets[T]:
    """Group a mixed batch by base model (`key(item)` = engine name) so each engine gets one batched call."""
    buckets: Buckets[T] = Buckets(list(items))
    for i, item in enumerate(buckets.items):
        buckets.groups.setdefault(key(item), []).append(i)
    return buckets
