"""Functional core: pure semiring einsum functions that compose with torch.func.

Every function here is stateless (apart from a bounded plan cache, see
:func:`clear_caches`), never modifies its inputs, returns fresh tensors, and
works under ``torch.func`` transforms and ordinary autograd.
"""

from ._api import (
    einsum,
    log_einsum,
    max_einsum,
    min_einsum,
    native_status,
    plan,
    semiring_einsum,
    viterbi_einsum,
)
from ._boolean import bool_einsum
from ._budget import AUTOMATIC_BLOCK_SIZE, AutomaticBlockSize
from ._caches import clear_caches
from ._errors import EquationError
from ._plan import Kernel, Plan, Step, kernels, register_kernel
from ._results import EntropyResult, ExpectationResult, KBestResult, ViterbiResult
from ._sample import sample_einsum
from ._semiring import EXPECTATION, LOG, MAX_PLUS, MIN_PLUS, REAL, Semiring, kbest_semiring
from ._structured import entropy_einsum, expectation_einsum, kbest_einsum

__all__ = [
    "einsum",
    "log_einsum",
    "max_einsum",
    "min_einsum",
    "viterbi_einsum",
    "kbest_einsum",
    "entropy_einsum",
    "expectation_einsum",
    "sample_einsum",
    "bool_einsum",
    "semiring_einsum",
    "plan",
    "Plan",
    "Step",
    "Kernel",
    "kernels",
    "register_kernel",
    "Semiring",
    "REAL",
    "LOG",
    "MAX_PLUS",
    "MIN_PLUS",
    "EXPECTATION",
    "kbest_semiring",
    "AutomaticBlockSize",
    "AUTOMATIC_BLOCK_SIZE",
    "EquationError",
    "clear_caches",
    "native_status",
    "ViterbiResult",
    "KBestResult",
    "EntropyResult",
    "ExpectationResult",
]
