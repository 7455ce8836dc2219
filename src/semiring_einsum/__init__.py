"""Einsum over semirings for PyTorch.

``import semiring_einsum as torch_semiring_einsum`` runs code written for
torch-semiring-einsum 1.2.0 unchanged, including its submodules
(``semiring_einsum.utils``, ``semiring_einsum.log_forward``, ...); or call
:func:`install_as_torch_semiring_einsum` first and leave the imports as they
are.  The functional core, with more semirings and options, is
:mod:`semiring_einsum.func`.
"""

# func, and the reference's module tree at the same paths (its __init__ imports them too).
from . import (  # noqa: F401
    equation,
    extend,
    func,
    function,
    log_backward,
    log_differentiable,
    log_forward,
    log_viterbi_forward,
    real_backward,
    real_differentiable,
    real_forward,
    utils,
)
from ._install import install_as_torch_semiring_einsum
from ._interop import (
    combine,
    einsum,
    log_einsum,
    log_einsum_backward,
    log_einsum_forward,
    log_viterbi_einsum_forward,
    real_einsum_backward,
    real_einsum_forward,
    semiring_einsum_forward,
)
from .equation import Equation, compile_equation
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
    "install_as_torch_semiring_einsum",
]
