"""Whether this test run is the full matrix (``python -m pytest --full``; set by conftest.py)."""

from __future__ import annotations

FULL = False


def examples(full: int) -> int:
    """Hypothesis examples for a test that draws ``full`` of them in the full run."""
    return full if FULL else max(1, full // 4)
