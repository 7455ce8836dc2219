"""Make our contractions opaque, single nodes for ``torch.compile``.

Dynamo should not trace our Python planning (parsing, opt_einsum's path
search, window sizing): it is pure bookkeeping on shapes, and Dynamo either
chokes on it or turns sizes symbolic.  Functions marked with :func:`in_graph`
are registered with Dynamo's ``nonstrict_trace``: Dynamo puts one call in
its graph and AOTAutograd then runs our Python on fake tensors, where shapes
are concrete, our autograd Functions and their backward rules are traced as
written, and the windows become ordinary graph ops.  Such a function takes
tensors, Python constants and :class:`~._semiring.Semiring` values: a
semiring is registered as a pytree constant, so the graph holds the semiring
object itself (never an id that could outlive it) and Dynamo guards on its
equality, so an equal semiring built anew reuses the compiled graph.  On a
torch without ``nonstrict_trace`` (before 2.8), ``allow_in_graph`` is used
instead, which takes tensors and Python constants only.

Importing Dynamo costs about a second, so registration waits until
something else imports it (``torch.compile`` does), through a one-shot
import hook; if it is already imported, registration is immediate.  Until
then an in-graph function runs as itself.  (Dynamo's private names are bound
in :mod:`._torch_compat`.)
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar, cast

from ._semiring import Semiring
from ._torch_compat import DYNAMO_MODULE as _DYNAMO
from ._torch_compat import nonstrict_trace, register_pytree_constant

F = TypeVar("F", bound=Callable[..., Any])

# (function, the one-element list its caller reads the registered version from)
_pending: list[tuple[Callable[..., Any], list[Callable[..., Any]]]] = []
_lock = threading.Lock()

register_pytree_constant(Semiring)


def _register(entries: Sequence[tuple[Callable[..., Any], list[Callable[..., Any]]]]) -> None:
    for fn, slot in entries:
        slot[0] = nonstrict_trace(fn)


class _AfterDynamoImport(importlib.abc.MetaPathFinder):
    """Runs the pending registrations right after Dynamo is imported."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _DYNAMO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            with _lock:
                entries, _pending[:] = list(_pending), []
            _register(entries)

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


_hook = _AfterDynamoImport()


def in_graph(fn: F) -> F:
    """Mark ``fn`` to appear as one node in ``torch.compile`` graphs.

    ``nonstrict_trace`` returns a new function, and registration may come
    later than the import of the caller, so the returned function calls
    whichever version is registered by then.
    """
    slot: list[Callable[..., Any]] = [fn]

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        return slot[0](*args)

    with _lock:
        if _DYNAMO in sys.modules:
            _register([(fn, slot)])
        else:
            _pending.append((fn, slot))
            if _hook not in sys.meta_path:
                sys.meta_path.insert(0, _hook)
    return cast(F, call)
