"""Interleaved timing for the scripts in benchmarks/ (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def medians_ms(
    fns: list[Callable[[], object]], rounds: int = 15, warmup: int = 1, number: int = 1
) -> list[float]:
    """Median milliseconds of each function, over rounds that call each one in turn.

    Each sample times ``number`` calls in a row (per call: the mean), which steadies
    calls of a few hundred microseconds, where one call is within the timer's and the
    scheduler's noise."""
    samples: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        for _ in range(warmup):  # first calls: caches, compilation
            fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[i].append((time.perf_counter() - start) * 1e3 / number)
    return [statistics.median(s) for s in samples]
