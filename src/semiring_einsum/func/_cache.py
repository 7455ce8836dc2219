"""The package's one cache registry: every cache is bounded, evicts its least recently used
entry when full, and is emptied by :func:`clear` (``func.clear_caches``).

Two kinds of caches register here: memoized functions (:func:`cached`, an
:func:`functools.lru_cache` that registers itself) and keyed tables (:class:`LRU`, for lookups
keyed by raw call arguments, where a miss takes a slower route rather than calling one
function).  Anything else that holds state worth dropping registers its own clear function
(:func:`register`).  This module imports nothing from the package.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_CLEARS: list[Callable[[], object]] = []


def register(clear: Callable[[], object]) -> Callable[[], object]:
    """Have :func:`clear` call ``clear`` (returned, so this can decorate it)."""
    _CLEARS.append(clear)
    return clear


def cached(maxsize: int) -> Callable[[Callable[..., T]], functools._lru_cache_wrapper[T]]:
    """:func:`functools.lru_cache` (``maxsize`` entries, least recently used out first),
    registered; the result keeps ``cache_clear``, ``cache_info`` and ``__wrapped__``."""
    if maxsize < 1:
        raise ValueError(f"a cache must be bounded by a positive maxsize, got {maxsize}")

    def decorate(fn: Callable[..., T]) -> functools._lru_cache_wrapper[T]:
        memo = functools.lru_cache(maxsize=maxsize)(fn)
        register(memo.cache_clear)
        return memo

    return decorate


_tick = itertools.count().__next__
"""The clock of :class:`LRU` tables: a use stamps its entry with the next tick."""


class LRU(Generic[K, V]):
    """A bounded table, least recently used out first, registered.

    Each entry is ``[value, last use]``: a hit stamps it with :data:`tick` (no reordering,
    so the key is hashed once), and an insertion into a full table evicts the entry with
    the oldest stamp (a scan, paid on a miss only).  A hot path may read :attr:`data`
    itself: ``entry = data.get(key)``, then ``entry[1] = tick()`` on a hit.  ``get``
    raises :class:`TypeError` for an unhashable key, as a dict does.
    """

    __slots__ = ("maxsize", "data", "__weakref__")

    tick = staticmethod(_tick)

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"a cache must be bounded by a positive maxsize, got {maxsize}")
        self.maxsize = maxsize
        self.data: dict[K, list[Any]] = {}
        register(self.clear)

    def get(self, key: K) -> V | None:
        """The value at ``key`` (now the most recently used), or ``None``."""
        entry = self.data.get(key)
        if entry is None:
            return None
        entry[1] = _tick()
        return entry[0]

    def put(self, key: K, value: V) -> None:
        """Store ``value`` at ``key``; past ``maxsize`` entries, the least recently used goes."""
        data = self.data
        if key not in data and len(data) >= self.maxsize:
            del data[min(data, key=lambda k: data[k][1])]
        data[key] = [value, _tick()]

    def clear(self) -> None:
        self.data.clear()

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        return sorted(self.data, key=lambda k: self.data[k][1])

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key: object) -> bool:
        return key in self.data


def clear() -> None:
    """Empty every registered cache."""
    for clear_one in _CLEARS:
        clear_one()
