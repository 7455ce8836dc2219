"""Make our contractions opaque, single nodes for ``torch.compile``.

Dynamo should not trace our Python planning (parsing, opt_einsum's path
search, window sizing): it is pure bookkeeping on shapes, and Dynamo either
chokes on it or turns sizes symbolic.  Functions marked with :func:`in_graph`
are registered with ``torch._dynamo.allow_in_graph``: Dynamo puts one call in
its graph and AOTAutograd then runs our Python on fake tensors, where shapes
are concrete (``int()`` specialises symbolic ones), our autograd Functions and
their backward rules are traced as written, and the windows become ordinary
graph ops.  Such a function may only take tensors and Python constants.

Importing ``torch._dynamo`` costs about a second, so registration waits until
something else imports it (``torch.compile`` does), through a one-shot
import hook; if it is already imported, registration is immediate.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_DYNAMO = "torch._dynamo"
_pending: list[Callable[..., Any]] = []
_lock = threading.Lock()


def _register(fns: Sequence[Callable[..., Any]]) -> None:
    import torch._dynamo

    for fn in fns:
        torch._dynamo.allow_in_graph(fn)


class _AfterDynamoImport(importlib.abc.MetaPathFinder):
    """Runs the pending registrations right after ``torch._dynamo`` is imported."""

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
                fns, _pending[:] = list(_pending), []
            _register(fns)

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


_hook = _AfterDynamoImport()


def in_graph(fn: F) -> F:
    """Mark ``fn`` to appear as one node in ``torch.compile`` graphs."""
    with _lock:
        if _DYNAMO in sys.modules:
            _register([fn])
            return fn
        _pending.append(fn)
        if _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)
    return fn
