"""Functional core: pure semiring einsum functions that compose with torch.func.

Every contraction function here is pure: its result depends on its arguments
alone (the package's caches -- parsed equations, plans, call setups, all bounded
and emptied by :func:`clear_caches` -- only spare recomputation), it never
modifies its inputs, returns fresh tensors, and works under ``torch.func``
transforms, ``torch.compile`` and ordinary autograd.  :func:`register_kernel`
is the one call that changes how later calls run (on the device it names).
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
