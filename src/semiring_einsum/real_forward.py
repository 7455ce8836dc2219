"""Real einsum, forward (mirrors ``torch_semiring_einsum.real_forward``).

:func:`real_einsum_forward` is the drop-in function; the other names are what
the reference's module imports, kept at the same path.
"""

from __future__ import annotations

from ._interop import real_einsum_forward, semiring_einsum_forward
from .equation import AUTOMATIC_BLOCK_SIZE, AutomaticBlockSize, Equation
from .utils import add_in_place, multiply_in_place, sum_block

__all__ = [
    "AUTOMATIC_BLOCK_SIZE",
    "AutomaticBlockSize",
    "Equation",
    "add_in_place",
    "multiply_in_place",
    "real_einsum_forward",
    "semiring_einsum_forward",
    "sum_block",
]
