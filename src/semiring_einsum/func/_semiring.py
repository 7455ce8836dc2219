"""Semirings as values: an immutable record of pure operations."""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from dataclasses import FrozenInstanceError, dataclass
from typing import Any, NoReturn, cast

import torch

Tensor = torch.Tensor
Identity = float | tuple[Any, ...]
"""A semiring identity: a number, or nested tuples of numbers of the element shape."""


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
        zero: The ⊕ identity (what an empty sum gives): a Python number, or
            for a semiring with element dimensions either a number (every
            component) or nested tuples/lists of numbers of the element shape.
        one: The ⊗ identity, given like ``zero``.
        shape: The element shape (keyword-only, default ``()``: scalar
            elements).  A semiring whose elements are vectors -- k-best lists
            ``(k,)``, the expectation semiring's pairs ``(2,)`` -- declares it
            here.  Every operand then carries these trailing dimensions after
            the ones the equation names, the result has them too, and the
            operations see them as the trailing dimensions of their
            arguments: ``add``/``mul`` broadcast over the leading dimensions
            and combine elements along the trailing ones, and ``sum(x, dims)``
            reduces leading dimensions only (``dims`` never names an element
            dimension).

    Raises:
        TypeError: If ``name`` is not a string, an operation is not
            callable, or an identity is not a real number (or numbers of the
            element shape).
        ValueError: If ``shape`` is not a tuple of non-negative ints, or an
            identity's shape is not the element shape.

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
    zero: Identity
    one: Identity
    shape: tuple[int, ...]

    def __init__(
        self,
        name: str,
        add: Callable[[Tensor, Tensor], Tensor],
        mul: Callable[[Tensor, Tensor], Tensor],
        sum: Callable[[Tensor, tuple[int, ...]], Tensor],
        zero: Identity,
        one: Identity,
        *,
        shape: Sequence[int] = (),
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Semiring name must be a str, got {type(name).__name__}")
        for field, op in (("add", add), ("mul", mul), ("sum", sum)):
            if not callable(op):
                raise TypeError(
                    f"Semiring {name!r}: {field} must be callable, got {type(op).__name__}"
                )
        element = _element_shape(name, shape)
        zero = _identity(name, "zero", zero, element)
        one = _identity(name, "one", one, element)
        fields: dict[str, object] = {
            "name": name,
            "add": add,
            "mul": mul,
            "sum": sum,
            "zero": zero,
            "one": one,
            "shape": element,
        }
        for key, field_value in fields.items():
            object.__setattr__(self, key, field_value)

    def __setattr__(self, key: str, value: Any) -> NoReturn:
        raise FrozenInstanceError(f"cannot assign to field {key!r}: a Semiring is immutable")

    def __delattr__(self, key: str) -> NoReturn:
        raise FrozenInstanceError(f"cannot delete field {key!r}: a Semiring is immutable")

    def _key(self) -> tuple[object, ...]:
        ops = (_operation_key(op) for op in (self.add, self.mul, self.sum))
        return (self.name, *ops, self.zero, self.one, self.shape)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Semiring):
            return NotImplemented
        return self is other or self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple[Callable[..., Semiring], tuple[Any, ...]]:
        # Rebuilt through __init__: a copy is validated like any new semiring.
        fields = (self.name, self.add, self.mul, self.sum, self.zero, self.one)
        if not self.shape:
            return Semiring, fields
        return _rebuild, (*fields, self.shape)

    def __repr__(self) -> str:
        if self.shape:
            return f"Semiring({self.name!r}, shape={self.shape})"
        return f"Semiring({self.name!r})"

    def identity(self, which: str, like: Tensor) -> Tensor:
        """``zero`` or ``one`` as a tensor of the element shape, ``like``'s dtype and device."""
        value = self.zero if which == "zero" else self.one
        return like.new_tensor(value).expand(self.shape)


def _rebuild(
    name: str,
    add: Callable[[Tensor, Tensor], Tensor],
    mul: Callable[[Tensor, Tensor], Tensor],
    sum: Callable[[Tensor, tuple[int, ...]], Tensor],
    zero: Identity,
    one: Identity,
    shape: tuple[int, ...],
) -> Semiring:
    """Unpickle a semiring with element dimensions (``shape`` is keyword-only)."""
    return Semiring(name, add, mul, sum, zero, one, shape=shape)


def _element_shape(name: str, shape: object) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if (
        not isinstance(shape, (tuple, list))
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
        or any(n < 0 for n in shape)
    ):
        raise ValueError(
            f"Semiring {name!r}: shape must be a tuple of non-negative ints, got {shape!r}"
        )
    return tuple(shape)


def _identity(name: str, field: str, value: object, shape: tuple[int, ...]) -> Identity:
    """An identity as a number or nested tuples of the element shape (hashable)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, tuple, list)):
        raise TypeError(
            f"Semiring {name!r}: {field} must be a Python int or float"
            + (" or nested sequences of them" if shape else "")
            + f", got {type(value).__name__}"
        )
    if isinstance(value, (int, float)):
        return value

    def nested(v: object, depth: int) -> Any:
        if depth == len(shape):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(
                    f"Semiring {name!r}: {field} must hold Python ints or floats, "
                    f"got {type(v).__name__}"
                )
            return v
        if not isinstance(v, (tuple, list)) or len(v) != shape[depth]:
            raise ValueError(
                f"Semiring {name!r}: {field} must be a number or nested sequences of "
                f"the element shape {shape}, got {value!r}"
            )
        return tuple(nested(x, depth + 1) for x in v)

    if not shape:
        raise TypeError(
            f"Semiring {name!r}: {field} must be a Python int or float, got {type(value).__name__}"
        )
    return cast(Identity, nested(value, 0))


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


# ------------------------------------------- semirings with element dimensions
def _kbest_add(a: Tensor, b: Tensor) -> Tensor:
    k = a.shape[-1]
    a, b = torch.broadcast_tensors(a, b)
    return torch.cat([a, b], dim=-1).topk(k, dim=-1).values


def _kbest_mul(a: Tensor, b: Tensor) -> Tensor:
    k = a.shape[-1]
    return (a.unsqueeze(-1) + b.unsqueeze(-2)).flatten(-2).topk(k, dim=-1).values


def _kbest_sum(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    if not dims:
        return x
    k = x.shape[-1]
    kept = [d for d in range(x.dim() - 1) if d not in dims]
    x = x.permute(*kept, *dims, x.dim() - 1)
    return x.flatten(len(kept)).topk(k, dim=-1).values


def kbest_semiring(k: int) -> Semiring:
    """The k-best (k-max-plus) semiring: elements are lists of the ``k`` best scores.

    An element is a vector of ``k`` scores in descending order (-inf where
    fewer than ``k`` exist); ⊕ keeps the ``k`` largest of both lists, ⊗ the
    ``k`` largest pairwise sums.  ``k = 1`` is max-plus.  Through
    :func:`semiring_einsum` it gives the values only;
    :func:`kbest_einsum` also returns which assignments reached them.

    Args:
        k: The list length, a positive int.

    Example:
        >>> import torch
        >>> from semiring_einsum.func import kbest_semiring, semiring_einsum
        >>> scores = torch.tensor([[1.0, 5.0, 3.0]])      # one term per index
        >>> lists = torch.cat([scores.T, torch.full((3, 1), float("-inf"))], dim=1)
        >>> semiring_einsum(kbest_semiring(2), "i->", lists)   # elements of shape (2,)
        tensor([5., 3.])
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"kbest_semiring needs a positive int k, got {k!r}")
    one = (0.0,) + (-math.inf,) * (k - 1)
    return Semiring(f"kbest{k}", _kbest_add, _kbest_mul, _kbest_sum, -math.inf, one, shape=(k,))


def _weights(logw: Tensor, total: Tensor) -> Tensor:
    """``exp(logw - total)``, 0 where ``total`` is -inf (no mass at all)."""
    return torch.where(total == -math.inf, 0.0, torch.exp(logw - total))


def _expectation_add(a: Tensor, b: Tensor) -> Tensor:
    total = torch.logaddexp(a[..., 0], b[..., 0])
    r = _weights(a[..., 0], total) * a[..., 1] + _weights(b[..., 0], total) * b[..., 1]
    return torch.stack([total, r], dim=-1)


def _expectation_mul(a: Tensor, b: Tensor) -> Tensor:
    return a + b


def _expectation_sum(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    if not dims:
        return x
    logw, r = x[..., 0], x[..., 1]
    total = torch.logsumexp(logw, dims, keepdim=True)
    r = (_weights(logw, total) * r).sum(dims)
    return torch.stack([total.squeeze(dims), r], dim=-1)


EXPECTATION = Semiring(
    "expectation",
    _expectation_add,
    _expectation_mul,
    _expectation_sum,
    (-math.inf, 0.0),
    (0.0, 0.0),
    shape=(2,),
)
"""The first-order expectation semiring over log weights: elements ``(log w, r)``.

``r`` is the expected value of a sum of per-factor values under the weights
(normalised): ⊗ adds both components, ⊕ adds the weights in log space and
averages ``r`` by them.  A factor enters as ``(log score, value)``; the result
is ``(log Z, E[Σ values])``.  :func:`expectation_einsum` and
:func:`entropy_einsum` give the same results faster.
"""
