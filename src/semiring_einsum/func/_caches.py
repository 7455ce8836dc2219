"""``clear_caches``: every cache of the package, through the one registry (:mod:`._cache`)."""

from __future__ import annotations

from . import _cache


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
    _cache.clear()
