"""Page-number pagination of lists already in memory (upstreams, definitions, keys)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Pager(Generic[T]):
    items: Sequence[T]
    page: int
    pages: int
    total: int


def paginate(everything: Sequence[T], page: int, size: int) -> Pager[T]:
    """Page ``page`` (from 1; out-of-range numbers are brought in range) of ``size`` items."""
    pages = max(1, -(-len(everything) // size))
    page = min(max(page, 1), pages)
    start = (page - 1) * size
    return Pager(everything[start : start + size], page, pages, len(everything))
