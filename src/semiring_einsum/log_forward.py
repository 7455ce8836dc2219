"""Log-space einsum, forward (mirrors ``torch_semiring_einsum.log_forward``).

:func:`log_einsum_forward` is the drop-in function.  :func:`compute_max`,
:func:`compute_sumexpsub` and :func:`resize_max_values` are the two passes of
a numerically stable ``log Σ exp`` (``max + log Σ exp(term - max)``) that
extensions of torch-semiring-einsum reuse; the other names are what the
reference's module imports, kept at the same path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import func
from ._interop import (
    FORWARD_PREPARED,
    log_einsum_forward,
    semiring_einsum_forward,
    subscripts_of,
)
from .equation import AUTOMATIC_BLOCK_SIZE, AutomaticBlockSize, Equation, as_equation
from .extend import semiring_einsum_forward_impl
from .utils import add_in_place, clip_inf_in_place, max_block, max_in_place, sum_block

Tensor = torch.Tensor

__all__ = [
    "AUTOMATIC_BLOCK_SIZE",
    "AutomaticBlockSize",
    "Equation",
    "add_in_place",
    "clip_inf_in_place",
    "compute_max",
    "compute_sumexpsub",
    "log_einsum_forward",
    "max_block",
    "max_in_place",
    "resize_max_values",
    "semiring_einsum_forward",
    "semiring_einsum_forward_impl",
    "sum_block",
]


def compute_max(
    equation: Equation | str, args: Sequence[Tensor], block_size: int | AutomaticBlockSize
) -> Tensor:
    """The largest term of each output cell, with ``±inf`` clipped to finite values.

    Clipping keeps ``term - max`` finite-or-``-inf`` when every term of a
    cell is ``-inf`` (or ``+inf``), as :func:`compute_sumexpsub` needs.  A
    cell with no terms (a size-0 summed variable) gets the dtype's lowest value.

    Args:
        equation: An :class:`Equation` or an equation string.
        args: Log-space tensors.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.

    Example:
        >>> import torch
        >>> from semiring_einsum.log_forward import compute_max
        >>> x = torch.tensor([[0.0, 2.0], [-float("inf"), -float("inf")]])
        >>> compute_max("ij->i", [x], 1)
        tensor([ 2.0000e+00, -3.4028e+38])
    """
    source = subscripts_of(equation, args, FORWARD_PREPARED)
    values = func.max_einsum(source, *args, block_size=block_size)
    return torch.nan_to_num(values, nan=math.nan)


def resize_max_values(max_values: Tensor, equation: Equation | str) -> Tensor:
    """``max_values`` (output-shaped) with a size-1 dim per summed variable appended.

    The result broadcasts against a window's term tensor in the ``compute_sum``
    protocol (output dims, then summed dims), as inside a ``sum_block``.

    Args:
        max_values: An output-shaped tensor, such as :func:`compute_max` returns.
        equation: An :class:`Equation` or an equation string.

    Example:
        >>> import torch
        >>> from semiring_einsum.log_forward import resize_max_values
        >>> resize_max_values(torch.zeros(2, 5), "ij,jk->ik").shape
        torch.Size([2, 5, 1])
    """
    eq = as_equation(equation)
    eq.prepare_for_forward()
    assert eq.reduce_input_to_output is not None
    summed = len(eq.reduce_input_to_output.reduced_variables)
    return max_values.reshape((*max_values.shape, *([1] * summed)))  # () for a scalar: fine


def compute_sumexpsub(
    equation: Equation | str,
    args: Sequence[Tensor],
    block_size: int | AutomaticBlockSize,
    max_values: Tensor,
) -> Tensor:
    """``Σ exp(term - max)`` for each output cell, given each cell's ``max``.

    Args:
        equation: An :class:`Equation` or an equation string.
        args: Log-space tensors.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.
        max_values: An output-shaped tensor, usually :func:`compute_max`'s result.

    Example:
        >>> import torch
        >>> from semiring_einsum.log_forward import compute_max, compute_sumexpsub
        >>> x = torch.zeros(2, 3)
        >>> compute_sumexpsub("ij->i", [x], 2, compute_max("ij->i", [x], 2))
        tensor([3., 3.])
    """
    shift = resize_max_values(max_values, equation)

    def passes(compute_sum: Callable[..., Any]) -> Any:
        def sumexpsub_block(term: Tensor, dims: tuple[int, ...]) -> Tensor:
            term.sub_(shift).exp_()
            return sum_block(term, dims)

        return compute_sum(add_in_place, sumexpsub_block, add_in_place)

    return semiring_einsum_forward(equation, args, block_size, passes)
