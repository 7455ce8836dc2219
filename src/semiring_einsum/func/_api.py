"""The public pure functions: parse, plan and execute, thinly wrapped."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _native as N
from ._budget import (
    BlockSize,
)
from ._engine import plan_call, run
from ._plan import (
    Plan,
)
from ._prepare import selecting_family
from ._results import ViterbiResult
from ._rules import (
    neg_inf_policy,
)
from ._semiring import LOG, MAX_PLUS, MIN_PLUS, REAL, Semiring

Tensor = torch.Tensor
Optimize = str | bool | Sequence[Sequence[int]]


def einsum(
    equation: str,
    *operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> Tensor:
    """Einsum in the real semiring (sum of products), like :func:`torch.einsum`.

    Steps of at most two operands run on :func:`torch.einsum` (BLAS); a step
    over three or more operands (``optimize=False``, or a budget too small for
    pairwise intermediates) runs in windows bounded by ``block_size``.

    Args:
        equation: An einsum equation in :func:`torch.einsum` syntax.
        *operands: The tensors.
        block_size: A window extent (int), an :class:`AutomaticBlockSize`, or
            ``None`` for the default budget.
        optimize: An opt_einsum strategy (``'auto'``, ``'greedy'``,
            ``'optimal'``, ``'dp'``, ...), an explicit path, or ``False`` to
            sum every index jointly in windows.

    Returns:
        The contraction, a new tensor; for an equation with several
        comma-separated outputs (``"bij,bjk->,bij,bjk"``), a tuple of them,
        computed together in one inside-outside pass (see :doc:`/structured`).
        Its dtype is the operands' common dtype, as :func:`torch.einsum`'s
        (integers stay integers); ``torch.bool`` operands give int64 counts of
        the true terms when an index is summed (as :func:`torch.sum` of
        booleans, and torch-semiring-einsum), and ``bool`` (their AND) when
        none is.

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> func.einsum("ij,j->i", torch.tensor([[True, True], [False, True]]),
        ...             torch.tensor([True, True]))
        tensor([2, 1])
        >>> a, b = torch.ones(2, 3), torch.ones(3, 4)
        >>> func.einsum("ij,jk->ik", a, b)
        tensor([[3., 3., 3., 3.],
                [3., 3., 3., 3.]])
    """
    return run(REAL, equation, operands, block_size, optimize)


def log_einsum(
    equation: str,
    *operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
    grad_of_neg_inf: float | str = math.nan,
) -> Tensor:
    """Einsum in the log semiring: ``log Σ exp(Σ operands)``, computed stably.

    Each step reduces its windows in one pass with a running maximum, so
    entries of any magnitude (and -inf, meaning probability zero) are exact.

    Args:
        equation: An einsum equation in :func:`torch.einsum` syntax.
        *operands: Log-space tensors.
        block_size: A window extent (int), an :class:`AutomaticBlockSize`, or
            ``None`` for the default budget.
        optimize: opt_einsum strategy, explicit path, or ``False``.
        grad_of_neg_inf: The gradient weight of each term of an output cell
            whose terms are all -inf: NaN (default, as :func:`torch.logsumexp`),
            a float ``c`` (every term gets weight ``c``), or ``'uniform'``
            (weight ``1/N`` for ``N`` terms).  With ``0`` such a cell does not
            use its cotangent at all, so a NaN that a later operation sends
            back there stays out of the operands' gradients (as in
            torch-semiring-einsum).  Any value other than NaN sums every index
            jointly, since the weights are defined on the terms of the whole
            contraction.

    Returns:
        The contraction, a new tensor; for an equation with several
        comma-separated outputs (``"bij,bjk->,bij,bjk"``), a tuple of them,
        computed together in one inside-outside pass (see :doc:`/structured`).

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> a = torch.zeros(2, 3)
        >>> func.log_einsum("ij,jk->ik", a, a.T)  # log(3) everywhere
        tensor([[1.0986, 1.0986],
                [1.0986, 1.0986]])
    """
    policy = neg_inf_policy(grad_of_neg_inf, equation)
    return run(LOG, equation, operands, block_size, optimize, policy)


def max_einsum(
    equation: str,
    *operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> Tensor:
    """Einsum in the max-plus (tropical) semiring: ``max Σ operands``.

    Differentiable: the gradient of each output cell goes to its maximising
    term (the first in row-major order of the summed indices on ties).  When
    no gradient can be asked for, the argmax behind it is not computed.

    Args:
        equation: An einsum equation in :func:`torch.einsum` syntax.
        *operands: Score (log-space) tensors.
        block_size: A window extent (int), an :class:`AutomaticBlockSize`, or
            ``None`` for the default budget.
        optimize: opt_einsum strategy, explicit path, or ``False``.

    Returns:
        The contraction, a new tensor; for an equation with several
        comma-separated outputs (``"bij,bjk->,bij,bjk"``), a tuple of them,
        computed together in one inside-outside pass (see :doc:`/structured`).

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> a = torch.tensor([[0., 2.], [1., -1.]])
        >>> func.max_einsum("ij,jk->ik", a, a)
        tensor([[3., 2.],
                [1., 3.]])
    """
    return run(MAX_PLUS, equation, operands, block_size, optimize)


def min_einsum(
    equation: str,
    *operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> Tensor:
    """Einsum in the min-plus semiring: ``min Σ operands`` (shortest paths).

    Computed as ``-max_einsum(-operands)``, so ties and gradients follow
    :func:`max_einsum` (first minimiser in row-major order).

    Args:
        equation: An einsum equation in :func:`torch.einsum` syntax.
        *operands: Cost tensors (e.g. edge lengths).
        block_size: A window extent (int), an :class:`AutomaticBlockSize`, or
            ``None`` for the default budget.
        optimize: opt_einsum strategy, explicit path, or ``False``.

    Returns:
        The contraction, a new tensor; for an equation with several
        comma-separated outputs (``"bij,bjk->,bij,bjk"``), a tuple of them,
        computed together in one inside-outside pass (see :doc:`/structured`).

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> d = torch.tensor([[0., 4.], [1., 0.]])
        >>> func.min_einsum("ij,jk->ik", d, d)
        tensor([[0., 4.],
                [1., 0.]])
    """
    return run(MIN_PLUS, equation, operands, block_size, optimize)


def viterbi_einsum(
    equation: str,
    *operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
    semiring: Semiring = MAX_PLUS,
) -> ViterbiResult:
    """Max-plus einsum that also returns which summed indices achieved each max.

    With ``semiring=MIN_PLUS``, the min-plus einsum and its argmin (the shortest
    path and the path), by the same rule: the first minimiser in row-major order.

    Returns:
        A :class:`ViterbiResult` ``(values, argmax)`` (a named tuple).
        ``values`` is :func:`max_einsum`'s result and is differentiable.
        ``argmax`` is an int64 tensor of shape
        ``values.shape + (k,)`` holding, for each output cell, the values of
        the ``k`` summed indices (in order of first appearance in the
        equation; summed ``...`` dimensions stand where ``...`` stands) of the
        first maximising term in row-major order.  All terms -inf gives
        argmax zeros; a NaN term wins.

    Args:
        equation: An einsum equation in :func:`torch.einsum` syntax.
        *operands: Log-space (or score) tensors.
        block_size: A window extent (int), an :class:`AutomaticBlockSize`, or
            ``None`` for the default budget.
        optimize: An opt_einsum strategy (default ``'auto'``: pairwise, in
            opt_einsum's order), an explicit path, or ``False`` to sum every
            index jointly.  The tie rule above holds exactly for every one:
            on a pairwise plan each intermediate carries the partial
            row-major rank of the assignment it stands for, and each step
            breaks ties by the smallest rank.  (Ranks are int64: with
            2**62 or more assignments of the summed indices -- a chain of
            30 steps over 8 states, say -- a pairwise plan breaks ties in
            its own step order instead; values and gradients are the same,
            and the argmax is still a maximising assignment.)
        semiring: :data:`MAX_PLUS` (default) or :data:`MIN_PLUS`.

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> a = torch.tensor([[0., 2.], [1., -1.]])
        >>> values, argmax = func.viterbi_einsum("ij,jk->ik", a, a)
        >>> argmax[..., 0]  # the best j for each (i, k)
        tensor([[1, 0],
                [0, 0]])
    """
    selecting_family(semiring, "viterbi_einsum", equation)
    values, argmax = run(semiring, equation, operands, block_size, optimize, viterbi=True)
    return ViterbiResult(values, argmax)


def semiring_einsum(
    semiring: Semiring,
    equation: str,
    *operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> Tensor:
    """Einsum in any commutative semiring.

    The built-in semirings (:data:`REAL`, :data:`LOG`, :data:`MAX_PLUS`,
    :data:`MIN_PLUS`), and any semiring equal to one of them (a pickled copy,
    say), go to their fast, custom-differentiated kernels; any other
    :class:`Semiring` runs the blocked loop with its own operations.  It is
    differentiable (reverse mode recomputes windows from √n checkpoints, so
    memory stays bounded; forward mode too) as long as those operations are.

    Args:
        semiring: The :class:`Semiring`.
        equation: An einsum equation in :func:`torch.einsum` syntax.
        *operands: The tensors.
        block_size: A window extent (int), an :class:`AutomaticBlockSize`, or
            ``None`` for the default budget.
        optimize: opt_einsum strategy, explicit path, or ``False``.

    Returns:
        The contraction, a new tensor; for an equation with several
        comma-separated outputs (``"bij,bjk->,bij,bjk"``), a tuple of them,
        computed together in one inside-outside pass (see :doc:`/structured`).

    Example:
        >>> import torch
        >>> from semiring_einsum.func import LOG, semiring_einsum
        >>> semiring_einsum(LOG, "i->", torch.zeros(4))  # log(4)
        tensor(1.3863)
    """
    if not isinstance(semiring, Semiring):
        raise TypeError(
            f"semiring must be a Semiring, got {type(semiring).__name__} (equation {equation!r})"
        )
    return run(semiring, equation, operands, block_size, optimize)


def plan(
    equation: str,
    *operands_or_shapes: Tensor | Sequence[int],
    semiring: Semiring = REAL,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
    compiled: bool = False,
    grad_of_neg_inf: float | str = math.nan,
    viterbi: bool = False,
    requires_grad: bool | None = None,
) -> Plan:
    """How a contraction will run, without running it; the plan also runs it.

    The plan is the one the call makes: the steps, windows and kernels of
    ``semiring_einsum(semiring, equation, ...)`` (``log_einsum`` with
    ``grad_of_neg_inf``, ``viterbi_einsum`` with ``viterbi=True``) on these operands,
    including the choices that depend on whether a derivative will be asked for (a
    max-plus argmax, the small joint log step): by default, whether some operand
    tensor requires grad.

    A plan is callable on operands of the planned shapes and dtype:
    ``p = func.plan("bij,bjk->bik", a, b, semiring=func.LOG); p(a, b)`` runs that
    call, differentiably and under ``torch.func`` and ``torch.compile`` as the
    function itself, reusing the call's cached setup (no parsing or planning again).

    Args:
        equation: An einsum equation.
        *operands_or_shapes: Tensors, or shapes (tuples of ints).
        semiring: The semiring the plan is for; it decides each step's kernel.
        dtype: dtype for shapes (default: the tensors' dtype, else float32).
        device: device for shapes (default: the tensors' device, else CPU).
        block_size: As for the contraction functions.
        optimize: As for the contraction functions.
        compiled: The plan of the call under ``torch.compile`` (the max-plus
            steps then take the kernels the compiler fuses) instead of eager.
        grad_of_neg_inf: As for :func:`log_einsum` (log semiring only).
        viterbi: The plan of :func:`viterbi_einsum` (max-plus or min-plus): with its
            argmax, the ranked steps of a pairwise plan (kernel ``ranked``).
        requires_grad: Whether a derivative will be asked for (default: whether
            some operand tensor requires grad).

    Returns:
        The immutable plan, with ``path``, ``steps`` (each naming its
        ``kernel``), ``block_sizes`` and ``peak_bytes``; ``print(plan)`` shows
        a table; ``plan(*operands)`` runs it.

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> p = func.plan("ab,bc,cd->ad", (8, 9), (9, 10), (10, 11), semiring=func.LOG)
        >>> [step.kernel.name for step in p.steps]  # values alone: one small joint step
        ['small']
        >>> grads = func.plan(
        ...     "ab,bc,cd->ad", (8, 9), (9, 10), (10, 11), semiring=func.LOG, requires_grad=True
        ... )
        >>> grads.path, [step.kernel.name for step in grads.steps]
        (((0, 1), (0, 1)), ['log_blas', 'log_blas'])
        >>> xs = [torch.zeros(8, 9), torch.zeros(9, 10), torch.zeros(10, 11)]
        >>> torch.equal(p(*xs), func.log_einsum("ab,bc,cd->ad", *xs))
        True
    """
    return plan_call(
        equation, operands_or_shapes, semiring, dtype, device, block_size, optimize, compiled,
        grad_of_neg_inf, viterbi, requires_grad,
    )  # fmt: skip


def native_status() -> str:
    """Whether max-plus steps run on the native kernel, and why not when they do not.

    The kernel (a small C loop, see :doc:`/performance`) is built with the system
    C compiler the first time a process needs it and cached per machine; without a
    compiler, where the build fails, or with ``SEMIRING_EINSUM_NATIVE=0`` in the
    environment, the pure-torch kernels run instead (same results, slower).
    Calling this builds or loads the kernel if that has not happened yet.

    Example:
        >>> from semiring_einsum import func
        >>> func.native_status().startswith(("native:", "pure torch:"))
        True
    """
    return N.status()


__all__ = [
    "einsum",
    "log_einsum",
    "max_einsum",
    "min_einsum",
    "viterbi_einsum",
    "semiring_einsum",
    "plan",
    "native_status",
]
