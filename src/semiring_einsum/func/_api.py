"""The public pure functions: parse, plan and execute, thinly wrapped."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import _kernels as K
from ._autograd import apply, derivative_possible
from ._budget import BlockSize, Budget, budget_of, resolve_budget
from ._compile import in_graph
from ._parse import (
    Contraction,
    Equation,
    Recipe,
    analyze,
    apply_recipe,
    check_operands,
    parse_subscripts,
    resolve,
)
from ._plan import Plan, Step, _optimize_key, clear_plan_caches, make_plan
from ._rules import CUSTOM_RULE, LOG_RULE, MAX_RULE, REAL_RULE, Spec, neg_inf_policy
from ._semiring import LOG, MAX_PLUS, MIN_PLUS, REAL, Semiring

Tensor = torch.Tensor
Optimize = str | bool | Sequence[Sequence[int]]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Setup:
    """Everything about a call that depends only on shapes, dtypes and options."""

    recipe: Recipe
    plan: Plan
    compute: torch.dtype
    specs: dict[int, Spec]  # id(step) -> the step's Spec


@functools.lru_cache(maxsize=1024)
def _setup(
    semiring: str,
    real: bool,
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    dtypes: tuple[torch.dtype, ...],
    device_type: str,
    budget: Budget,
    optimize: object,
    blas: bool,
    joint: bool,
    policy: float | str,
    extras: bool,
) -> _Setup:
    """Validate, canonicalize and plan a call (cached: one lookup per call)."""
    recipe = analyze(equation, shapes, dtypes)
    dtype = recipe.dtype
    if not real and not dtype.is_floating_point:
        raise TypeError(
            f"the {semiring} semiring needs floating-point operands, got "
            f"{dtype} (equation {equation!r})"
        )
    compute = torch.float32 if dtype in _LOW_PRECISION else dtype  # accumulate in float32
    itemsize = compute.itemsize
    plan = make_plan(
        equation,
        recipe.contraction,
        semiring=semiring,
        blas=blas,
        joint=joint,
        itemsize=itemsize,
        budget=budget,
        optimize=optimize,
        device_type=device_type,
    )
    last = plan.steps[-1]
    # grad_of_neg_inf is about the cells of the *whole* contraction.  An
    # intermediate cell that is all -inf only matters through a final cell:
    # if that final cell is finite, the intermediate's terms have weight 0
    # there (exactly as in the joint sum); if it is all -inf too, the final
    # step's policy already reaches the intermediate through the chain rule.
    # So intermediate steps use weight 0, which also passes a NaN cotangent on.
    specs = {
        id(step): Spec(step, budget, itemsize, device_type, policy if step is last else 0.0, extras)
        for step in plan.steps
    }
    return _Setup(recipe, plan, compute, specs)


# Setups of recent calls by their raw arguments (see _Prepared), with whether
# their operands need no diagonal, broadcast or cast.  Bounded: emptied when full.
_SEEN: dict[tuple[object, ...], tuple[_Setup, bool]] = {}
_SEEN_MAX = 1024


class _Prepared:
    """A canonicalized call: clean operands, their plan, and how to finish."""

    __slots__ = (
        "recipe",
        "equation",
        "contraction",
        "operands",
        "plan",
        "spec",
        "out_dtype",
        "compute_dtype",
    )

    def __init__(
        self,
        semiring: Semiring,
        equation: str,
        operands: Sequence[Tensor],
        budget: Budget,
        optimize: Optimize,
        *,
        blas: bool = False,
        joint: bool = False,
        neg_inf: object = math.nan,
        extras: bool = False,
        device: torch.device | None = None,
    ) -> None:
        # The common case first: a call like one seen before (same options,
        # shapes, dtypes and devices) reuses its validated setup without
        # re-checking anything.  Unhashable options (an explicit path) and
        # symbolic shapes take the full route.
        key: tuple[object, ...] | None = None
        try:
            raw = (
                semiring.name,
                semiring is REAL,
                equation,
                budget,
                optimize,
                blas,
                joint,
                neg_inf,
                extras,
                device,
                *[(x.shape, x.dtype, x.device) for x in operands],
            )
            hit = _SEEN.get(raw)
            key = raw
        except (TypeError, AttributeError):
            hit = None
        if hit is not None:
            setup, as_is = hit
        else:
            setup, as_is = self._validate(
                semiring, equation, operands, budget, optimize, blas, joint, neg_inf, extras, device
            )
            if key is not None:
                if len(_SEEN) >= _SEEN_MAX:
                    _SEEN.clear()
                _SEEN[key] = (setup, as_is)
        # Only now, with everything validated, touch the tensors.
        self.recipe = setup.recipe
        self.equation: Equation = setup.recipe.equation
        self.contraction: Contraction = setup.recipe.contraction
        self.plan: Plan = setup.plan
        self.out_dtype = setup.recipe.dtype
        self.compute_dtype = setup.compute
        ops = list(operands) if as_is else apply_recipe(setup.recipe, operands, setup.compute)
        self.operands = ops
        specs = setup.specs
        self.spec: Callable[[Step], Spec] = lambda step: specs[id(step)]

    @staticmethod
    def _validate(
        semiring: Semiring,
        equation: str,
        operands: Sequence[Tensor],
        budget: Budget,
        optimize: Optimize,
        blas: bool,
        joint: bool,
        neg_inf: object,
        extras: bool,
        device: torch.device | None,
    ) -> tuple[_Setup, bool]:
        """The call's setup, and whether its operands are already clean."""
        shapes, dtypes = check_operands(equation, operands)
        device = device or operands[0].device
        setup = _setup(
            semiring.name,
            semiring is REAL,
            equation,
            shapes,
            dtypes,
            device.type,
            budget,
            _optimize_key(equation, optimize, len(operands)),
            blas,
            joint,
            neg_inf_policy(neg_inf, equation),
            extras,
        )
        recipe = setup.recipe
        as_is = (
            not any(recipe.diagonals)
            and recipe.shapes == shapes
            and all(dtype == setup.compute for dtype in dtypes)
        )
        return setup, as_is

    def canonical(self, operands: Sequence[Tensor]) -> list[Tensor]:
        """The clean operands of ``operands`` (differentiably), as in ``__init__``."""
        return apply_recipe(self.recipe, operands, self.compute_dtype)

    def run(
        self,
        run_step: Callable[[Step, list[Tensor]], Tensor],
        operands: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Execute the plan's steps in order (opt_einsum's path convention)."""
        ops = list(self.operands if operands is None else operands)
        for step in self.plan.steps:
            args = [ops[i] for i in step.operands]
            for i in sorted(step.operands, reverse=True):
                del ops[i]
            ops.append(run_step(step, args))
        return self.finish(ops[0])

    def finish(self, out: Tensor) -> Tensor:
        return out if out.dtype == self.out_dtype else out.to(self.out_dtype)


def _blas(step: Step, args: list[Tensor]) -> Tensor:
    """A real step of at most two operands, on torch.einsum (BLAS)."""
    out = K.einsum_letters(step.inputs, step.output, *args)
    if len(args) == 1 and not step.windows:  # a pure permutation may be a view
        out = out.clone()
    return out


def _budget(block_size: object, operands: Sequence[object], equation: object) -> Budget:
    """Resolve ``block_size`` for the operands' device (validating it)."""
    first = operands[0] if operands else None
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    return resolve_budget(block_size, device, equation)


@in_graph
def _contract(
    kind: str,
    equation: str,
    extent: int,
    nbytes: int,
    optimize: Optimize,
    policy: float | str,
    *operands: Tensor,
) -> Tensor | tuple[Tensor, Tensor]:
    """Every built-in contraction, behind one signature of tensors and constants.

    This is the node ``torch.compile`` sees (see :mod:`._compile`); the public
    functions only validate and resolve their options into constants.
    """
    budget = budget_of(extent, nbytes)
    if kind == "real":
        p = _Prepared(REAL, equation, operands, budget, optimize, blas=True)

        def real_step(s: Step, args: list[Tensor]) -> Tensor:
            if s.blas:
                return _blas(s, args)
            return apply(REAL_RULE, p.spec(s), *args)[0]

        return p.run(real_step)
    if kind == "log":
        joint = policy != "nan"
        p = _Prepared(LOG, equation, operands, budget, optimize, joint=joint, neg_inf=policy)
        return p.run(lambda s, args: apply(LOG_RULE, p.spec(s), *args)[0])
    if kind in ("max", "min"):
        p = _Prepared(MAX_PLUS if kind == "max" else MIN_PLUS, equation, operands, budget, optimize)
        # The argmax is the backward's residual: skip it when no derivative can come.
        values_only = not derivative_possible(operands)

        def max_step(s: Step, args: list[Tensor]) -> Tensor:
            return apply(MAX_RULE, replace(p.spec(s), values_only=values_only), *args)[0]

        if kind == "max":
            return p.run(max_step)
        return -p.run(max_step, [-x for x in p.operands])
    if kind == "viterbi":
        p = _Prepared(MAX_PLUS, equation, operands, budget, optimize)
        backpointers: list[tuple[Step, Tensor]] = []

        def viterbi_step(s: Step, args: list[Tensor]) -> Tensor:
            values, linear = apply(MAX_RULE, p.spec(s), *args)
            backpointers.append((s, linear))
            return values

        values = p.run(viterbi_step)
        return values, _backtrack(p, backpointers)
    raise AssertionError(f"unknown contraction kind {kind!r}")  # pragma: no cover


def _backtrack(p: _Prepared, backpointers: list[tuple[Step, Tensor]]) -> Tensor:
    """The argmax of every summed index, from each step's own argmax.

    Walking the steps backwards, every index a step's result is indexed by is
    known (an output index, or one summed by a later step), so its argmax can
    be looked up for every output cell and unravelled into the indices it sums.
    """
    size = p.contraction.size
    out = p.contraction.output
    shape = [size[c] for c in out]
    device = p.operands[0].device if p.operands else torch.device("cpu")
    known: dict[str, Tensor] = {}
    for d, c in enumerate(out):
        view = [1] * len(out)
        view[d] = size[c]
        known[c] = torch.arange(size[c], device=device).reshape(view)
    for step, linear in reversed(backpointers):
        if not step.windows:
            continue
        if not step.output or step.output == out:  # indexed as the result is: as it is
            at = linear
        else:
            at = linear[tuple(known[c] for c in step.output)]
        # At least 1-d: indexing with 0-d index tensors would call .item().
        coords = K.unravel(step, at.reshape(at.shape or (1,)))
        for i, (c, _) in enumerate(step.windows):
            known[c] = coords[..., i]
    summed = p.equation.summed
    if not summed:
        return torch.zeros(shape + [0], dtype=torch.int64, device=device)
    cells = shape or [1]  # a scalar output was walked as one cell
    stacked = torch.stack([known[c].expand(cells) for c in summed], dim=-1)
    return stacked.reshape(shape + [len(summed)])


def _run(
    kind: str,
    equation: str,
    operands: Sequence[Tensor],
    block_size: BlockSize,
    optimize: Optimize,
    policy: float | str = "nan",
) -> Any:
    b = _budget(block_size, operands, equation)
    return _contract(kind, equation, *b.as_ints(), optimize, policy, *operands)


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
        The contraction, a new tensor.

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> a, b = torch.ones(2, 3), torch.ones(3, 4)
        >>> func.einsum("ij,jk->ik", a, b)
        tensor([[3., 3., 3., 3.],
                [3., 3., 3., 3.]])
    """
    return _run("real", equation, operands, block_size, optimize)


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
            (weight ``1/N`` for ``N`` terms).  Any value other than NaN sums
            every index jointly, since the weights are defined on the terms of
            the whole contraction.

    Returns:
        The contraction, a new tensor.

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> a = torch.zeros(2, 3)
        >>> func.log_einsum("ij,jk->ik", a, a.T)  # log(3) everywhere
        tensor([[1.0986, 1.0986],
                [1.0986, 1.0986]])
    """
    policy = neg_inf_policy(grad_of_neg_inf, equation)
    return _run("log", equation, operands, block_size, optimize, policy)


def log_einsum_with_extras(
    equation: str, *operands: Tensor, block_size: BlockSize = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Joint log einsum that also returns each cell's largest term and scaled sum.

    Returns ``(out, max, sumexpsub)`` with ``max`` clipped to the dtype's
    finite range and ``sumexpsub = Σ exp(term - max)``; ``max`` and
    ``sumexpsub`` are not differentiable.  (Used by the compatibility layer.)
    """
    budget = _budget(block_size, operands, equation)
    p = _Prepared(LOG, equation, operands, budget, False, extras=True)
    (step,) = p.plan.steps
    out, m, s = apply(LOG_RULE, p.spec(step), *p.operands)
    return p.finish(out), p.finish(torch.nan_to_num(m, nan=math.nan)), p.finish(s)


def log_einsum_vjp(
    equation: str,
    operands: Sequence[Tensor],
    cotangent: Tensor,
    *,
    out: Tensor | None = None,
    block_size: BlockSize = None,
    grad_of_neg_inf: float | str = math.nan,
) -> tuple[Tensor, ...]:
    """Gradients of the joint log einsum w.r.t. every operand.

    ``out`` (the forward's result), when known, spares recomputing it.  The
    result is differentiable: it is built from the same rule as the backward
    of :func:`log_einsum`.  (Used by the compatibility layer.)
    """
    budget = _budget(block_size, operands, equation)
    p = _Prepared(LOG, equation, operands, budget, False, neg_inf=grad_of_neg_inf)
    clean, pull = torch.func.vjp(lambda *xs: tuple(p.canonical(xs)), *operands)[:2]
    (step,) = p.plan.steps
    spec = p.spec(step)
    if out is None:
        out = apply(LOG_RULE, spec, *clean)[0]
    dtype = clean[0].dtype
    grads = LOG_RULE.vjp(spec, clean, (out.to(dtype),), (cotangent.to(dtype),), [True] * len(clean))
    return tuple(pull(tuple(grads)))


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
        The contraction, a new tensor.

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> a = torch.tensor([[0., 2.], [1., -1.]])
        >>> func.max_einsum("ij,jk->ik", a, a)
        tensor([[3., 2.],
                [1., 3.]])
    """
    return _run("max", equation, operands, block_size, optimize)


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
        The contraction, a new tensor.

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> d = torch.tensor([[0., 4.], [1., 0.]])
        >>> func.min_einsum("ij,jk->ik", d, d)
        tensor([[0., 4.],
                [1., 0.]])
    """
    return _run("min", equation, operands, block_size, optimize)


def viterbi_einsum(
    equation: str,
    *operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = False,
) -> tuple[Tensor, Tensor]:
    """Max-plus einsum that also returns which summed indices achieved each max.

    Returns:
        ``(values, argmax)``.  ``values`` is :func:`max_einsum`'s result and is
        differentiable.  ``argmax`` is an int64 tensor of shape
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
        optimize: ``False`` (default) sums every index jointly, so ties follow
            the row-major rule above exactly.  An opt_einsum strategy such as
            ``'auto'`` contracts pairwise (much faster with three or more
            operands) and rebuilds the argmax from each step's backpointers;
            on ties each step then keeps its own first maximiser, so the
            chosen term follows the contraction order.

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> a = torch.tensor([[0., 2.], [1., -1.]])
        >>> values, argmax = func.viterbi_einsum("ij,jk->ik", a, a)
        >>> argmax[..., 0]  # the best j for each (i, k)
        tensor([[1, 0],
                [0, 0]])
    """
    values, argmax = _run("viterbi", equation, operands, block_size, optimize)
    return values, argmax


def semiring_einsum(
    semiring: Semiring,
    equation: str,
    *operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> Tensor:
    """Einsum in any commutative semiring.

    The built-in semirings (:data:`REAL`, :data:`LOG`, :data:`MAX_PLUS`,
    :data:`MIN_PLUS`) go to their fast, custom-differentiated paths; any other
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
        The contraction, a new tensor.

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
    # By identity (a semiring equal to a built-in one takes the generic path), and
    # without hashing: a Semiring hashes by value, which is not free.
    builtin = ((REAL, einsum), (LOG, log_einsum), (MAX_PLUS, max_einsum), (MIN_PLUS, min_einsum))
    for known, fn in builtin:
        if semiring is known:
            return fn(equation, *operands, block_size=block_size, optimize=optimize)
    b = _budget(block_size, operands, equation)
    return _contract_custom(semiring, equation, *b.as_ints(), optimize, *operands)


@in_graph
def _contract_custom(
    semiring: Semiring,
    equation: str,
    extent: int,
    nbytes: int,
    optimize: Optimize,
    *operands: Tensor,
) -> Tensor:
    """A user semiring's contraction; the semiring travels as itself (a graph constant)."""
    budget = budget_of(extent, nbytes)
    p = _Prepared(semiring, equation, operands, budget, optimize)
    return p.run(
        lambda s, args: apply(CUSTOM_RULE, replace(p.spec(s), semiring=semiring), *args)[0]
    )


def plan(
    equation: str,
    *operands_or_shapes: Tensor | Sequence[int],
    semiring: Semiring = REAL,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> Plan:
    """Inspect how a contraction would run, without running it.

    Args:
        equation: An einsum equation.
        *operands_or_shapes: Tensors, or shapes (tuples of ints).
        semiring: The semiring the plan is for (``REAL`` allows BLAS steps).
        dtype: dtype for shapes (default: the tensors' dtype, else float32).
        device: device for shapes (default: the tensors' device, else CPU).
        block_size: As for the contraction functions.
        optimize: As for the contraction functions.

    Returns:
        The immutable plan, with ``path``, ``steps``, ``block_sizes`` and
        ``peak_bytes``; ``print(plan)`` shows a table.

    Example:
        >>> from semiring_einsum import func
        >>> p = func.plan("ab,bc,cd->ad", (8, 9), (9, 10), (10, 11), semiring=func.LOG)
        >>> p.path
        ((0, 1), (0, 1))
    """
    first = next((t for t in operands_or_shapes if isinstance(t, torch.Tensor)), None)
    default_dtype = first.dtype if first is not None else torch.float32
    tensors = []
    for k, x in enumerate(operands_or_shapes):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            continue
        shape = _shape(x)
        if shape is None:
            raise TypeError(
                f"operand {k} must be a tensor or a shape (a sequence of ints), got {x!r} "
                f"(equation {equation!r})"
            )
        if any(n < 0 for n in shape):
            raise ValueError(
                f"operand {k} has a negative size in shape {shape} (equation {equation!r})"
            )
        tensors.append(torch.empty(shape, dtype=dtype or default_dtype, device="meta"))
    target = torch.device(device) if device is not None else None
    if target is None:
        real = next((t for t in tensors if t.device.type != "meta"), None)
        target = real.device if real is not None else torch.device("cpu")
    meta = [t if t.device.type == "meta" else t.to("meta") for t in tensors]
    if dtype is not None:
        meta = [t.to(dtype) for t in meta]
    budget = resolve_budget(block_size, target, equation)
    p = _Prepared(semiring, equation, meta, budget, optimize, blas=semiring is REAL, device=target)
    return p.plan


def _shape(x: object) -> tuple[int, ...] | None:
    """``x`` as a shape, or ``None`` if it is not a sequence of ints."""
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in x):
        return None
    return tuple(x)


def clear_caches() -> None:
    """Empty every cache of the package (parsed equations, plans, windows).

    The caches are bounded; clearing them is only useful to free their memory
    or to measure cold-start costs.

    Example:
        >>> from semiring_einsum import func
        >>> func.clear_caches()
    """
    _setup.cache_clear()
    _SEEN.clear()
    analyze.cache_clear()
    resolve.cache_clear()
    parse_subscripts.cache_clear()
    clear_plan_caches()


__all__ = [
    "einsum",
    "log_einsum",
    "max_einsum",
    "min_einsum",
    "viterbi_einsum",
    "semiring_einsum",
    "plan",
    "clear_caches",
]
