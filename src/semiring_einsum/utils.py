"""In-place semiring operations (mirrors ``torch_semiring_einsum.utils``).

These are the building blocks that torch-semiring-einsum's own semirings pass
to ``compute_sum`` (see :func:`semiring_einsum.semiring_einsum_forward`):
``*_in_place(a, b)`` update ``a`` and return nothing; ``*_block(a, dims)``
reduce ``dims`` of a window's term tensor and return ``a`` itself when
``dims`` is empty.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

__all__ = [
    "add_in_place",
    "clip_inf_in_place",
    "max_block",
    "max_in_place",
    "multiply_in_place",
    "sum_block",
]


def add_in_place(a: Tensor, b: Tensor) -> None:
    """``a += b``.

    Example:
        >>> import torch
        >>> from semiring_einsum.utils import add_in_place
        >>> a = torch.tensor([1.0, 2.0])
        >>> add_in_place(a, torch.tensor([10.0, 20.0]))
        >>> a
        tensor([11., 22.])
    """
    a.add_(b)


def multiply_in_place(a: Tensor, b: Tensor) -> None:
    """``a *= b``."""
    a.mul_(b)


def max_in_place(a: Tensor, b: Tensor) -> None:
    """``a = max(a, b)`` elementwise (NaN wins, as in :func:`torch.maximum`)."""
    torch.maximum(a, b, out=a)


def sum_block(a: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The sum of ``a`` over ``dims``; ``a`` itself when ``dims`` is empty.

    (:func:`torch.sum` with ``dim=()`` would sum everything.)

    Example:
        >>> import torch
        >>> from semiring_einsum.utils import sum_block
        >>> sum_block(torch.ones(2, 3), (1,))
        tensor([3., 3.])
    """
    return a.sum(dims) if dims else a


def max_block(a: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The max of ``a`` over ``dims``; ``a`` itself when ``dims`` is empty."""
    return a.amax(dims) if dims else a


def clip_inf_in_place(a: Tensor) -> None:
    """Replace ``±inf`` in ``a`` with the dtype's largest finite values; NaN stays.

    Example:
        >>> import torch
        >>> from semiring_einsum.utils import clip_inf_in_place
        >>> a = torch.tensor([-math.inf, 0.0])
        >>> clip_inf_in_place(a)
        >>> a[0] == torch.finfo(a.dtype).min
        tensor(True)
    """
    torch.nan_to_num(a, nan=math.nan, out=a)
