"""The ``compute_sum`` protocol (mirrors ``torch_semiring_einsum.extend``).

:func:`semiring_einsum_forward` is the drop-in function (our engine does the
windowing).  :func:`semiring_einsum_forward_impl` is torch-semiring-einsum's
lower-level entry point, which extensions call with a :class:`ReduceInfo` of
their own (for example one of an ``Equation``'s ``prepare_for_*`` results): it
runs one blocked pass over the windows that the ``ReduceInfo`` describes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ._interop import semiring_einsum_forward
from .equation import AutomaticBlockSize, Equation, ReduceInfo, as_equation

Tensor = torch.Tensor

__all__ = [
    "AutomaticBlockSize",
    "Equation",
    "adjust_size",
    "reduce_in_place",
    "semiring_einsum_forward",
    "semiring_einsum_forward_impl",
]


def semiring_einsum_forward_impl(
    equation: Equation | str,
    args: Sequence[Tensor],
    block_size: int | AutomaticBlockSize,
    inputs: Sequence[Tensor],
    add_in_place: Callable[[Any, Any], object],
    sum_block: Callable[..., Any],
    multiply_in_place: Callable[[Tensor, Tensor], object],
    reduce_info: ReduceInfo,
    include_indexes: bool,
    output_dtypes: Sequence[torch.dtype | None] = (None,),
) -> Any:
    """One blocked pass of the ``compute_sum`` protocol over ``reduce_info``'s windows.

    For each window of ``reduce_info.reduced_variables`` (sized from ``args``
    and ``block_size``), the window's slice of each of ``inputs`` is looked up
    with the matching ``reduce_info.lookup_info``; a copy of the first, at the
    full term size, is combined with the others by ``multiply_in_place``;
    ``sum_block(term, reduce_info.reduced_dims[, var_values])`` reduces it and
    ``add_in_place`` folds the parts into the first one, which is returned.
    When a reduced variable has size 0, ``sum_block`` sees one empty window
    (the reference raises ``StopIteration``).

    Args:
        equation: The equation (its ``variable_locations`` give the sizes).
        args: The tensors that the sizes are read from.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.
        inputs: The tensors to combine, one per entry of ``reduce_info.lookup_info``.
        add_in_place: ``add_in_place(acc, part)`` folds ``part`` into ``acc``.
        sum_block: Reduces a window's term over the reduced dims.
        multiply_in_place: ``multiply_in_place(term, factor)`` combines into ``term``.
        reduce_info: The layout (for example ``equation.reduce_input_to_output``).
        include_indexes: Pass each window's slices to ``sum_block`` as a third argument.
        output_dtypes: The output's component dtypes, for an automatic block size.

    Example:
        >>> import torch
        >>> from semiring_einsum import compile_equation
        >>> from semiring_einsum.extend import semiring_einsum_forward_impl
        >>> from semiring_einsum.utils import add_in_place, multiply_in_place, sum_block
        >>> eq = compile_equation("ij,jk->ik")
        >>> eq.prepare_for_forward()
        >>> x = torch.ones(2, 3)
        >>> semiring_einsum_forward_impl(eq, [x, x.T], 2, [x, x.T], add_in_place, sum_block,
        ...                              multiply_in_place, eq.reduce_input_to_output, False)
        tensor([[3., 3.],
                [3., 3.]])
    """
    eq = as_equation(equation)
    lookups = reduce_info.lookup_info
    dims = reduce_info.reduced_dims

    def part(var_values: tuple[Any, ...]) -> Any:
        factors = [info.lookup(x, var_values) for x, info in zip(inputs, lookups)]
        term = adjust_size(factors[0], reduce_info.get_term_size(eq, args, var_values))
        for factor in factors[1:]:
            multiply_in_place(term, factor)
        if include_indexes:
            return sum_block(term, dims, var_values)
        return sum_block(term, dims)

    windows: Iterable[tuple[Any, ...]] = reduce_info.get_summed_variable_indexes(
        eq, args, block_size, output_dtypes
    )
    acc: Any = None
    empty = True
    for var_values in windows:
        if empty:
            acc, empty = part(var_values), False
        else:
            add_in_place(acc, part(var_values))
    if empty:
        if not args:
            raise ValueError("semiring_einsum_forward_impl needs at least one tensor in args")
        # A reduced variable of size 0: one window covering everything (0 elements).
        sizes = eq.get_sizes(args, reduce_info.reduced_variables)
        acc = part(tuple(slice(0, n) for n in sizes))
    return acc


def adjust_size(arg: Tensor, size: Sequence[int]) -> Tensor:
    """A new tensor: ``arg`` broadcast along its size-1 dims to ``size``.

    Always a copy, never a view of ``arg``, so it can be updated in place.

    Example:
        >>> import torch
        >>> from semiring_einsum.extend import adjust_size
        >>> adjust_size(torch.tensor([[1.0], [2.0]]), [2, 3])
        tensor([[1., 1., 1.],
                [2., 2., 2.]])
    """
    if arg.dim() == 0:
        return arg.clone()
    shape = [n if extent == 1 else extent for n, extent in zip(size, arg.shape)]
    shape += arg.shape[len(shape) :]
    return arg.expand(shape).clone(memory_format=torch.contiguous_format)


def reduce_in_place(
    func: Callable[[Any, Any], object],
    args: Iterable[Any],
    initialize: Callable[[Any], Any] | None = None,
) -> Any:
    """Fold ``args`` into the first one (after ``initialize``) with ``func(acc, x)``.

    The first value is updated in place unless ``initialize`` copies it.

    Raises:
        ValueError: if ``args`` is empty.
    """
    items = iter(args)
    try:
        acc = next(items)
    except StopIteration:
        raise ValueError("reduce_in_place needs at least one value") from None
    if initialize is not None:
        acc = initialize(acc)
    for item in items:
        func(acc, item)
    return acc
