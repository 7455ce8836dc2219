"""Whether this test run is the full matrix (``python -m pytest --full``; set by conftest.py).

Three ways a test asks for less in the default run and everything under ``--full``:

* a parametrized matrix of three or more axes is sampled by ``conftest.py`` (all pairs);
* :func:`examples` scales down a Hypothesis test's example count;
* :func:`pick` keeps a few named values of an expensive one-axis matrix (``torch.compile``
  tests, where each case costs a compilation), and ``@pytest.mark.full`` keeps a whole
  test (a subprocess, a Sphinx build) for the full run.

``.ci/run`` runs both the default command and ``--full``, so nothing here leaves CI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

FULL = False


def examples(full: int) -> int:
    """Hypothesis examples for a test that draws ``full`` of them in the full run."""
    return full if FULL else max(1, full // 8)


def pick(values: Sequence[T], *default: T) -> list[T]:
    """All of ``values`` under ``--full``; only ``default`` (each one of them) otherwise."""
    missing = [v for v in default if v not in values]
    if missing:
        raise ValueError(f"pick: {missing} are not among {list(values)}")
    return list(values) if FULL else [v for v in values if v in default]
