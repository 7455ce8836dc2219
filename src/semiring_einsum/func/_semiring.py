"""Semirings as values: an immutable record of pure operations."""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import FrozenInstanceError, dataclass
from typing import Any, NoReturn

import torch

Tensor = torch.Tensor


class _Same:
    """Compares and hashes by identity (for objects compared as "the same one")."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and self.obj is other.obj

    def __hash__(self) -> int:
        return id(self.obj)


def _operation_key(op: Callable[..., Any]) -> object:
    """What an operation is compared by: a Python function by what it runs.

    Two function objects made by the same ``def`` or ``lambda`` from the same
    globals, defaults and closure contents (each the very same object) behave
    alike, so a semiring built anew by the same code on each call is equal to
    the previous one.  Any other callable compares as itself (``==``).
    """
    if type(op) is not types.FunctionType:
        return op
    try:
        closure = tuple(_Same(c.cell_contents) for c in op.__closure__ or ())
    except ValueError:  # an empty cell: only the function itself is the same
        return _Same(op)
    kwdefaults = op.__kwdefaults__ or {}
    return (
        op.__code__,
        _Same(op.__globals__),
        tuple(_Same(d) for d in op.__defaults__ or ()),
        tuple((k, _Same(v)) for k, v in sorted(kwdefaults.items())),
        closure,
    )


# Immutable by __setattr__ rather than ``frozen=True``: torch.compile cannot
# hand a frozen dataclass to an opaque in-graph function, but it can hand any
# other hashable object registered as a pytree constant (see ._compile), and
# then guards on equality, so an equal semiring built anew reuses the graph.
@dataclass(init=False, eq=False)
class Semiring:
    """A commutative semiring ``(⊕, ⊗, zero, one)`` over tensors.

    A semiring is data, not a subclass: pass one to
    :func:`semiring_einsum.func.semiring_einsum`.  Every operation must be
    pure (never modify its arguments) and written with torch operations, so
    that autograd and ``torch.func`` see through it.

    A semiring is immutable and compares by value: two semirings are equal
    when they have the same name and identities and the same operations.  A
    Python function counts as the same operation when it runs the same code
    with the same globals, defaults and closure contents, so a semiring built
    anew by the same code (lambdas included) equals the previous one, and
    ``torch.compile`` reuses its graph for it.  Copies (:func:`copy.deepcopy`,
    :mod:`pickle`) are equal, working semirings of their own; pickling needs
    operations that pickle, such as torch functions and module-level
    functions (the standard :mod:`pickle` refuses a lambda).  Everything that uses a semiring after
    a call returns (an autograd graph, a ``vjp`` closure, a compiled graph)
    holds the semiring object itself, so one built inline lives as long as
    what uses it.

    Attributes:
        name: A short name used in messages and plans.
        add: ``add(a, b)``, elementwise ⊕ of two broadcastable tensors.
        mul: ``mul(a, b)``, elementwise ⊗ of two broadcastable tensors.
        sum: ``sum(x, dims)``, ⊕-reduction of ``x`` over the tuple ``dims``
            (possibly empty, in which case ``x`` itself is returned).
        zero: The ⊕ identity (what an empty sum gives), a Python scalar.
        one: The ⊗ identity, a Python scalar.

    Raises:
        TypeError: If ``name`` is not a string, an operation is not
            callable, or an identity is not a real number.

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

    def __init__(
        self,
        name: str,
        add: Callable[[Tensor, Tensor], Tensor],
        mul: Callable[[Tensor, Tensor], Tensor],
        sum: Callable[[Tensor, tuple[int, ...]], Tensor],
        zero: float,
        one: float,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Semiring name must be a str, got {type(name).__name__}")
        for field, op in (("add", add), ("mul", mul), ("sum", sum)):
            if not callable(op):
                raise TypeError(
                    f"Semiring {name!r}: {field} must be callable, got {type(op).__name__}"
                )
        for field, value in (("zero", zero), ("one", one)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"Semiring {name!r}: {field} must be a Python int or float, "
                    f"got {type(value).__name__}"
                )
        fields: dict[str, object] = {
            "name": name,
            "add": add,
            "mul": mul,
            "sum": sum,
            "zero": zero,
            "one": one,
        }
        for key, field_value in fields.items():
            object.__setattr__(self, key, field_value)

    def __setattr__(self, key: str, value: Any) -> NoReturn:
        raise FrozenInstanceError(f"cannot assign to field {key!r}: a Semiring is immutable")

    def __delattr__(self, key: str) -> NoReturn:
        raise FrozenInstanceError(f"cannot delete field {key!r}: a Semiring is immutable")

    def _key(self) -> tuple[object, ...]:
        ops = (_operation_key(op) for op in (self.add, self.mul, self.sum))
        return (self.name, *ops, self.zero, self.one)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Semiring):
            return NotImplemented
        return self is other or self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple[type[Semiring], tuple[Any, ...]]:
        # Rebuilt through __init__: a copy is validated like any new semiring.
        return Semiring, (self.name, self.add, self.mul, self.sum, self.zero, self.one)

    def __repr__(self) -> str:
        return f"Semiring({self.name!r})"


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
