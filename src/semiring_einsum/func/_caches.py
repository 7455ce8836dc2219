"""Every cache of the package, emptied by :func:`clear_caches`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import _kernels as K
from . import _logblas as LB
from . import _native as N
from . import _prepare, _viterbi
from ._autograd import clear_functions
from ._budget import cache_clear as budget_of_cache_clear
from ._context import cache_clear as context_cache_clear
from ._parse import (
    analyze,
    parse_subscripts,
    resolve,
    summed_of,
)
from ._plan import (
    clear_plan_caches,
)

Tensor = torch.Tensor
Optimize = str | bool | Sequence[Sequence[int]]


# Caches of the layers above the core (the drop-in layer's), emptied by clear_caches too.
_OTHER_CACHES: list[Callable[[], object]] = []


def register_cache(clear: Callable[[], object]) -> None:
    """Have :func:`clear_caches` call ``clear`` (a cache of a layer above the core)."""
    _OTHER_CACHES.append(clear)


def clear_caches() -> None:
    """Empty every cache of the package.

    Parsed equations, plans and their kernels, call setups, window sizes, the
    products chosen for BLAS steps, small steps' layouts and argmax tables, the
    drop-in layer's compiled equations and callback plans,
    the log steps' BLAS programs, budgets,
    call contexts, the ranks a Viterbi plan needs, the native kernel's step layouts
    and loaded library, and the
    autograd Functions made for steps of more operands than the ones built at
    import.  Every cache is bounded; clearing them is only useful to free their
    memory or to measure cold-start costs.

    Example:
        >>> from semiring_einsum import func
        >>> func.clear_caches()
    """
    _prepare.cache_clear()
    _viterbi.cache_clear()
    analyze.cache_clear()
    resolve.cache_clear()
    parse_subscripts.cache_clear()
    summed_of.cache_clear()
    clear_plan_caches()
    budget_of_cache_clear()
    context_cache_clear()
    K.cache_clear()
    for clear in _OTHER_CACHES:
        clear()
    LB.program.cache_clear()
    N.cache_clear()
    clear_functions()
