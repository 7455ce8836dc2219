"""Viterbi einsum (mirrors ``torch_semiring_einsum.log_viterbi_forward``).

:func:`log_viterbi_einsum_forward` is the drop-in function.  The helpers are
the max-with-argmax operations of torch-semiring-einsum's Viterbi semiring in
the ``compute_sum`` protocol, for extensions that reuse them; the other names
are what the reference's module imports, kept at the same path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._interop import log_viterbi_einsum_forward, semiring_einsum_forward
from .equation import AUTOMATIC_BLOCK_SIZE, AutomaticBlockSize, Equation
from .utils import add_in_place

Tensor = torch.Tensor

__all__ = [
    "ARGMAX_DTYPE",
    "AUTOMATIC_BLOCK_SIZE",
    "AutomaticBlockSize",
    "Equation",
    "add_in_place",
    "log_viterbi_einsum_forward",
    "lookup_dim",
    "max_argmax_block",
    "semiring_einsum_forward",
    "viterbi_max_block",
    "viterbi_max_in_place",
]

ARGMAX_DTYPE = torch.int64
"""The dtype of argmax tensors."""


def viterbi_max_in_place(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> None:
    """Fold ``b = (max, argmax)`` into ``a``: where ``b``'s max is larger, take ``b``'s pair.

    On a tie ``a`` is kept, so the earlier window wins.
    """
    a_max, a_argmax = a
    b_max, b_argmax = b
    better = b_max > a_max
    a_max.copy_(torch.where(better, b_max, a_max))
    a_argmax.copy_(torch.where(better.unsqueeze(-1), b_argmax, a_argmax))


def viterbi_max_block(
    a: Tensor, dims: tuple[int, ...], var_values: Sequence[slice]
) -> tuple[Tensor, Tensor]:
    """:func:`max_argmax_block` of one window, with the argmax offset to whole-tensor indices.

    Args:
        a: A window's term tensor.
        dims: The dims to reduce.
        var_values: The window's slice of each reduced variable (their starts
            are added to the argmax).

    Example:
        >>> import torch
        >>> from semiring_einsum.log_viterbi_forward import viterbi_max_block
        >>> viterbi_max_block(torch.tensor([[0.0, 5.0], [7.0, 1.0]]), (1,), (slice(10, 12),))
        (tensor([5., 7.]), tensor([[11],
                [10]]))
    """
    values, argmax = max_argmax_block(a, dims)
    starts = torch.tensor([s.start for s in var_values], dtype=argmax.dtype, device=argmax.device)
    argmax.add_(starts)
    return values, argmax


def max_argmax_block(a: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The max of ``a`` over ``dims`` and where it is.

    Returns:
        ``(values, argmax)``: ``values`` has the remaining dims (``a`` itself
        when ``dims`` is empty); ``argmax`` has them plus a last dim holding
        one index per reduced dim, in the order of ``dims``.  Ties go to the
        first maximiser in row-major order of ``dims``.

    Example:
        >>> import torch
        >>> from semiring_einsum.log_viterbi_forward import max_argmax_block
        >>> max_argmax_block(torch.tensor([[[1.0, 3.0], [3.0, 0.0]]]), (1, 2))
        (tensor([3.]), tensor([[0, 1]]))
    """
    if not dims:
        return a, torch.empty((*a.shape, 0), dtype=ARGMAX_DTYPE, device=a.device)
    reduced = [d % a.dim() for d in dims]
    kept = [d for d in range(a.dim()) if d not in reduced]
    extents = [a.shape[d] for d in reduced]
    flat = a.permute(*kept, *reduced).reshape(*[a.shape[d] for d in kept], math.prod(extents))
    values, index = flat.max(-1)
    coords = []
    for extent in reversed(extents):
        coords.append(index % extent)
        index = index // extent
    return values, torch.stack(coords[::-1], -1).to(ARGMAX_DTYPE)


def lookup_dim(x: Tensor, i: Tensor, dim: int) -> Tensor:
    """``x`` indexed along ``dim`` by ``i``, elementwise over the other dims.

    ``result[..., k, ...] = x[..., i[..., k, ...], ...]`` where ``i`` has
    ``x``'s shape without ``dim``.

    Example:
        >>> import torch
        >>> from semiring_einsum.log_viterbi_forward import lookup_dim
        >>> lookup_dim(torch.tensor([[1, 2], [3, 4]]), torch.tensor([1, 0]), 1)
        tensor([2, 3])
    """
    return torch.gather(x, dim, i.unsqueeze(dim)).squeeze(dim)
