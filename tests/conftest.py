"""How much of the test matrix runs: a pairwise-covering sample by default, all of it with --full.

``python -m pytest`` (the README's test command) runs, of every test function parametrized
over three or more axes (equation x semiring x block size x dtype x plan kind, ...), a subset
that still covers every *pair* of parameter values at least once (all-pairs testing): each
equation meets each semiring, each block size, each dtype; each semiring each block size; and
so on.  Matrices of one or two axes run whole, since all pairs are all cases.  The Hypothesis
tests draw an eighth of their examples, expensive one-axis matrices keep a few values
(:func:`matrix.pick`), tests marked ``@pytest.mark.full`` wait for the full run, and the
4-process distributed world runs only its 2 x 2 meshes (see :mod:`matrix` and
:mod:`distributed_cases`).  ``python -m pytest --full`` runs every case and every example;
``.ci/run`` runs both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Hashable, Iterator
from pathlib import Path

import pytest
import torch

import distributed_cases
import matrix

_FOLDER = pytest.StashKey[str]()

# A parametrized function with at most this many cases runs whole.
SAMPLE_ABOVE = 16


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="run every case of the parametrized matrices and every Hypothesis example "
        "(default: a sample covering every pair of parameter values)",
    )


def pytest_configure(config: pytest.Config) -> None:
    matrix.FULL = bool(config.getoption("--full"))
    config.addinivalue_line(
        "markers", "full: runs only under --full (a subprocess, a docs build: seconds each)"
    )
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        # One thread each: two workers and the background distributed worlds already fill
        # two cores, and an OpenMP region whose threads are descheduled waits for them
        # (measured: an example took 13 s instead of 0.3 s).  Tests of threading set theirs.
        torch.set_num_threads(1)
    else:  # the session's first process (xdist controller, or the only one under -n 0)
        # One folder for the session's distributed runs, inherited by the xdist workers.
        folder = tempfile.mkdtemp(prefix="semiring-einsum-distributed-")
        os.environ[distributed_cases.FOLDER] = folder
        os.environ[distributed_cases.FULL] = "1" if matrix.FULL else "0"
        config.stash[_FOLDER] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_FOLDER, None)
    if folder is not None:
        distributed_cases.stop_all(Path(folder))
        shutil.rmtree(folder, ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> str:
    if matrix.FULL:
        return "semiring_einsum tests: the full matrix (--full)"
    return "semiring_einsum tests: a pairwise-covering sample of the matrices (--full runs all)"


def _value(name: str, value: object) -> Hashable:
    """A parameter value as a hashable key (by identity when it is not hashable)."""
    try:
        hash(value)
    except TypeError:
        return name, "id", id(value)  # the same parameter object in every case that uses it
    return name, type(value), value


def _features(item: pytest.Item) -> list[Hashable]:
    """The parameter values of a case, alone and in pairs."""
    params = item.callspec.params  # type: ignore[attr-defined]
    values = [_value(name, params[name]) for name in sorted(params)]
    features: list[Hashable] = list(values)
    features += [(a, b) for i, a in enumerate(values) for b in values[i + 1 :]]
    return features


@pytest.hookimpl(trylast=True)  # after -k / -m, so that a case picked by hand always runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not matrix.FULL:
        _deselect(config, items, [item for item in items if item.get_closest_marker("full")])
    if not config.option.collectonly:  # (collecting only runs nothing)
        _start_distributed_runs(items)
    if matrix.FULL:
        return
    groups: dict[object, list[pytest.Item]] = {}
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and len(callspec.params) >= 3:
            key = (item.path, getattr(item, "cls", None), getattr(item, "originalname", None))
            groups.setdefault(key, []).append(item)
    dropped: set[int] = set()
    for group in groups.values():
        if len(group) <= SAMPLE_ABOVE:
            continue
        covered: set[Hashable] = set()
        for item in group:  # in collection order: deterministic
            new = set(_features(item)) - covered
            if new:
                covered |= new
            else:
                dropped.add(id(item))
    _deselect(config, items, [i for i in items if id(i) in dropped])


def _deselect(config: pytest.Config, items: list[pytest.Item], drop: list[pytest.Item]) -> None:
    if drop:
        gone = {id(i) for i in drop}
        config.hook.pytest_deselected(items=drop)
        items[:] = [i for i in items if id(i) not in gone]


def _start_distributed_runs(items: list[pytest.Item]) -> None:
    """Start the multi-process runs of ``test_distributed`` in the background, right away.

    Each world (2 and 4 processes) runs once per session, whichever xdist worker gets there
    first, while the other tests run; its tests then read the results.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return  # the tests skip themselves
    worlds = {
        n
        for item in items
        for prefix, n in (("test_two_processes", 2), ("test_four_processes", 4))
        if item.name.startswith(prefix)
    }
    for world in sorted(worlds, reverse=True):  # the longer one first
        distributed_cases.launch(world, distributed_cases.shared_folder())


@pytest.fixture
def pure_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Max-plus steps on the pure-torch kernels: the native one off, every cache cleared."""
    from semiring_einsum import func

    monkeypatch.setenv("SEMIRING_EINSUM_NATIVE", "0")
    func.clear_caches()
    yield
    func.clear_caches()  # (the environment is restored after this, by monkeypatch)
