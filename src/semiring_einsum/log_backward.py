"""Log-space einsum, backward (mirrors ``torch_semiring_einsum.log_backward``).

:func:`log_einsum_backward` is the drop-in function; the other names are what
the reference's module imports, kept at the same path.
"""

from __future__ import annotations

from ._interop import log_einsum_backward
from .equation import (
    AUTOMATIC_BLOCK_SIZE,
    AutomaticBlockSize,
    Equation,
    get_summed_variable_indexes,
)
from .extend import adjust_size, reduce_in_place, semiring_einsum_forward_impl
from .log_forward import compute_max, compute_sumexpsub
from .utils import add_in_place, sum_block

__all__ = [
    "AUTOMATIC_BLOCK_SIZE",
    "AutomaticBlockSize",
    "Equation",
    "add_in_place",
    "adjust_size",
    "compute_max",
    "compute_sumexpsub",
    "get_summed_variable_indexes",
    "log_einsum_backward",
    "reduce_in_place",
    "semiring_einsum_forward_impl",
    "sum_block",
]
