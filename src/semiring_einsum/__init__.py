"""Einsum over semirings for PyTorch.

``import semiring_einsum as torch_semiring_einsum`` runs code written for
torch-semiring-einsum 1.2.0 unchanged.  The functional core, with more
semirings and options, is :mod:`semiring_einsum.func`.
"""

from . import func
from ._interop import (
    Equation,
    combine,
    compile_equation,
    einsum,
    log_einsum,
    log_einsum_backward,
    log_einsum_forward,
    log_viterbi_einsum_forward,
    real_einsum_backward,
    real_einsum_forward,
    semiring_einsum_forward,
)
from .func._budget import AUTOMATIC_BLOCK_SIZE, AutomaticBlockSize

__version__ = "0.1.0"

__all__ = [
    "compile_equation",
    "Equation",
    "einsum",
    "real_einsum_forward",
    "real_einsum_backward",
    "log_einsum",
    "log_einsum_forward",
    "log_einsum_backward",
    "log_viterbi_einsum_forward",
    "AUTOMATIC_BLOCK_SIZE",
    "AutomaticBlockSize",
    "semiring_einsum_forward",
    "combine",
    "func",
]
