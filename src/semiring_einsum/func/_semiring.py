"""Semirings as values: a frozen record of pure operations."""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Semiring:
    """A commutative semiring ``(⊕, ⊗, zero, one)`` over tensors.

    A semiring is data, not a subclass: pass one to
    :func:`semiring_einsum.func.semiring_einsum`.  Every operation must be
    pure (never modify its arguments) and written with torch operations, so
    that autograd and ``torch.func`` see through it.

    Attributes:
        name: A short name used in messages and plans.
        add: ``add(a, b)``, elementwise ⊕ of two broadcastable tensors.
        mul: ``mul(a, b)``, elementwise ⊗ of two broadcastable tensors.
        sum: ``sum(x, dims)``, ⊕-reduction of ``x`` over the tuple ``dims``
            (possibly empty, in which case ``x`` itself is returned).
        zero: The ⊕ identity (what an empty sum gives), a Python scalar.
        one: The ⊗ identity, a Python scalar.

    Example:
        Boolean reachability as a semiring over 0/1 float tensors:

        >>> import torch
        >>> from semiring_einsum.func import Semiring, semiring_einsum
        >>> BOOL = Semiring("bool", add=torch.maximum, mul=torch.minimum,
        ...                 sum=lambda x, dims: x.amax(dims) if dims else x,
        ...                 zero=0.0, one=1.0)
        >>> a = torch.tensor([[0., 1.], [0., 0.]])
        >>> semiring_einsum(BOOL, "ij,jk->ik", a, a)
        tensor([[0., 0.],
                [0., 0.]])
    """

    name: str
    add: Callable[[Tensor, Tensor], Tensor]
    mul: Callable[[Tensor, Tensor], Tensor]
    sum: Callable[[Tensor, tuple[int, ...]], Tensor]
    zero: float
    one: float
    # A plain int naming this semiring in compiled graphs, which take only
    # tensors and constants (see lookup()).
    token: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        token = next(_tokens)
        object.__setattr__(self, "token", token)
        _live[token] = self

    def __repr__(self) -> str:
        return f"Semiring({self.name!r})"


_tokens = itertools.count(1)
_live: weakref.WeakValueDictionary[int, Semiring] = weakref.WeakValueDictionary()


def lookup(token: int) -> Semiring:
    """The live semiring with this ``token``."""
    return _live[token]


def _sum(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return x.sum(dims) if dims else x


def _logsumexp(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return torch.logsumexp(x, dims) if dims else x


def _amax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return x.amax(dims) if dims else x


def _amin(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return x.amin(dims) if dims else x


REAL = Semiring("real", torch.add, torch.mul, _sum, 0.0, 1.0)
"""Ordinary arithmetic: ⊕ = +, ⊗ = ×."""
LOG = Semiring("log", torch.logaddexp, torch.add, _logsumexp, -math.inf, 0.0)
"""Log space: ⊕ = logaddexp, ⊗ = +."""
MAX_PLUS = Semiring("max_plus", torch.maximum, torch.add, _amax, -math.inf, 0.0)
"""Tropical max-plus (Viterbi scores): ⊕ = max, ⊗ = +."""
MIN_PLUS = Semiring("min_plus", torch.minimum, torch.add, _amin, math.inf, 0.0)
"""Tropical min-plus (shortest paths): ⊕ = min, ⊗ = +."""

BUILTINS = (REAL, LOG, MAX_PLUS, MIN_PLUS)
