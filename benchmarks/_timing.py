"""Interleaved timing for the scripts in benchmarks/ (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def medians_ms(fns: list[Callable[[], object]], rounds: int = 15, warmup: int = 1) -> list[float]:
    """Median milliseconds of each function, over rounds that call each one in turn."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        for _ in range(warmup):  # first calls: caches, compilation
            fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            samples[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(s) for s in samples]
