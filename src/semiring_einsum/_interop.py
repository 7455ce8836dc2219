"""Adapters from torch-semiring-einsum 1.2.0's API to the functional core.

Every function adapts its arguments and calls :mod:`semiring_einsum.func`, except
the reference's callback protocol (``semiring_einsum_forward`` with a user's
``compute_sum``), whose windows are walked here, since the user's function computes
each one.  What the reference returns, we return
(including its flag-dependent tuples); where the reference is wrong or
unimplemented, we are right instead (see each docstring).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import func
from .equation import Equation
from .func import _kernels as K
from .func._autograd import apply
from .func._budget import AUTOMATIC_BLOCK_SIZE, AutomaticBlockSize, Budget, resolve_budget
from .func._cache import LRU, cached
from .func._context import Context, call_context
from .func._distributed import refuse as refuse_dtensors
from .func._engine import log_einsum_vjp, log_einsum_with_extras
from .func._parse import Recipe, analyze, apply_recipe, check_operands
from .func._plan import Step, joint_step
from .func._rules import Rule

Tensor = torch.Tensor
BlockSize = int | AutomaticBlockSize


def subscripts_of(equation: Equation | str, args: Sequence[Tensor], *prepare: str) -> str:
    """The einsum string to hand to the core, after the reference's ``prepare_for_*`` calls.

    A string goes as is.  An :class:`Equation` is checked against ``args`` and
    its string is computed from its fields; ``prepare`` names the
    ``prepare_for_*`` methods that the reference's function calls, since code
    that extends it reads their results.
    """
    if isinstance(equation, str):
        return equation
    if not isinstance(equation, Equation):
        raise TypeError(f"equation must be an Equation or a str, got {type(equation).__name__}")
    subscripts = equation.subscripts_of()
    equation._check_arguments(args)
    for method in prepare:
        getattr(equation, method)()
    return subscripts


def _as_reference_sums(equation: str, args: Sequence[Tensor]) -> Sequence[Tensor]:
    """Bool and integer operands of a contraction that sums, in int64.

    The reference sums each window with :func:`torch.sum`, which gives int64
    for bool and integer tensors: so does this layer (bool counts the true
    terms).  The core keeps integer dtypes as :func:`torch.einsum` does.
    """
    if not args or not all(isinstance(x, Tensor) for x in args):
        return args  # (the core names what is wrong)
    common = functools.reduce(torch.promote_types, [x.dtype for x in args])
    if common.is_floating_point or common.is_complex or common == torch.int64:
        return args
    shapes, dtypes = check_operands(equation, args)
    if not analyze(equation, shapes, dtypes).contraction.summed:
        return args
    return [x.to(torch.int64) for x in args]


FORWARD_PREPARED = "prepare_for_forward"
_BACKWARD = "prepare_for_backward"
_LOG_BACKWARD = "prepare_for_log_backward"


def einsum(
    equation: Equation | str, *args: Tensor, block_size: BlockSize = AUTOMATIC_BLOCK_SIZE
) -> Tensor:
    """Differentiable real einsum (sum of products).

    Same results as :func:`torch.einsum`; differentiable with autograd and
    ``torch.func``.

    Args:
        equation: An :class:`Equation` (computed from its fields) or an equation string.
        *args: The tensors.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.

    Example:
        >>> import torch, semiring_einsum
        >>> semiring_einsum.einsum("ij,jk->ik", torch.ones(2, 3), torch.ones(3, 2))
        tensor([[3., 3.],
                [3., 3.]])
    """
    source = subscripts_of(equation, args, FORWARD_PREPARED, _BACKWARD)
    return func.einsum(source, *_as_reference_sums(source, args), block_size=block_size)


def real_einsum_forward(
    equation: Equation | str, *args: Tensor, block_size: BlockSize = AUTOMATIC_BLOCK_SIZE
) -> Tensor:
    """Real einsum (the forward of :func:`einsum`; also differentiable here).

    Args:
        equation: An :class:`Equation` (computed from its fields) or an equation string.
        *args: The tensors.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.

    Example:
        >>> import torch, semiring_einsum
        >>> semiring_einsum.real_einsum_forward("i,i->", torch.ones(3), torch.ones(3))
        tensor(3.)
    """
    source = subscripts_of(equation, args, FORWARD_PREPARED)
    return func.einsum(source, *_as_reference_sums(source, args), block_size=block_size)


def _needs(needs_grad: Sequence[bool], args: Sequence[Tensor]) -> list[bool]:
    needs = [bool(n) for n in needs_grad]
    if len(needs) != len(args):
        raise ValueError(f"needs_grad has {len(needs)} entries but there are {len(args)} args")
    return needs


def real_einsum_backward(
    equation: Equation | str,
    args: Sequence[Tensor],
    needs_grad: Sequence[bool],
    grad: Tensor,
    block_size: BlockSize = AUTOMATIC_BLOCK_SIZE,
) -> list[Tensor | None]:
    """Gradients of :func:`real_einsum_forward` w.r.t. each arg.

    Args:
        equation: An :class:`Equation` (computed from its fields) or an equation string.
        args: The forward's tensors.
        needs_grad: One flag per arg.
        grad: The cotangent of the output.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.

    Returns:
        One gradient per arg, ``None`` where ``needs_grad`` is false.

    Example:
        >>> import torch, semiring_einsum
        >>> a, b = torch.ones(2, 3), torch.ones(3)
        >>> semiring_einsum.real_einsum_backward("ij,j->i", [a, b], [False, True],
        ...                                      torch.ones(2))
        [None, tensor([2., 2., 2.])]
    """
    refuse_dtensors(args, "real_einsum_backward")
    source = subscripts_of(equation, args, _BACKWARD)
    needs = _needs(needs_grad, args)
    pull = torch.func.vjp(lambda *xs: func.einsum(source, *xs, block_size=block_size), *args)[1]
    grads = pull(grad)
    return [g if n else None for g, n in zip(grads, needs)]


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def log_einsum(
    equation: Equation | str,
    *args: Tensor,
    block_size: BlockSize = AUTOMATIC_BLOCK_SIZE,
    save_max: bool = True,
    save_sumexpsub: bool = True,
    grad_of_neg_inf: float | Literal["uniform"] = math.nan,
) -> Tensor:
    """Differentiable log-space einsum (``log Σ exp``).

    ``save_max`` and ``save_sumexpsub`` are accepted for compatibility: the
    backward here needs only the output, which is always kept (one
    output-sized tensor instead of the reference's two).  ``grad_of_neg_inf``
    supports NaN, any float and ``'uniform'`` (see
    :func:`semiring_einsum.func.log_einsum`).

    Args:
        equation: An :class:`Equation` (computed from its fields) or an equation string.
        *args: Log-space tensors.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.
        save_max: Accepted for compatibility (no effect).
        save_sumexpsub: Accepted for compatibility (no effect).
        grad_of_neg_inf: NaN, a float, or ``'uniform'``.

    Example:
        >>> import torch, semiring_einsum
        >>> semiring_einsum.log_einsum("i->", torch.zeros(2))  # log 2
        tensor(0.6931)
    """
    _check_flag("save_max", save_max)
    _check_flag("save_sumexpsub", save_sumexpsub)
    source = subscripts_of(equation, args, FORWARD_PREPARED, _LOG_BACKWARD)
    return func.log_einsum(source, *args, block_size=block_size, grad_of_neg_inf=grad_of_neg_inf)


def log_einsum_forward(
    equation: Equation | str,
    *args: Tensor,
    block_size: BlockSize = AUTOMATIC_BLOCK_SIZE,
    return_max: bool = False,
    return_sumexpsub: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Log-space einsum, optionally with each cell's max term and scaled sum.

    Args:
        equation: An :class:`Equation` (computed from its fields) or an equation string.
        *args: Log-space tensors.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.
        return_max: Also return each cell's largest term.
        return_sumexpsub: Also return each cell's scaled sum.

    Returns:
        The output alone, or ``(output, max?, sumexpsub?)`` when
        ``return_max`` / ``return_sumexpsub`` is set: ``max`` is each output
        cell's largest term (clipped to the dtype's finite range) and
        ``sumexpsub`` is ``Σ exp(term - max)``.  Both can be passed to
        :func:`log_einsum_backward`.

    Example:
        >>> import torch, semiring_einsum
        >>> out, m = semiring_einsum.log_einsum_forward(
        ...     "i->", torch.tensor([0.0, 1.0]), return_max=True)
        >>> m
        tensor(1.)
    """
    _check_flag("return_max", return_max)
    _check_flag("return_sumexpsub", return_sumexpsub)
    source = subscripts_of(equation, args, FORWARD_PREPARED)
    if not (return_max or return_sumexpsub):
        return func.log_einsum(source, *args, block_size=block_size)
    refuse_dtensors(args, "log_einsum_forward with return_max or return_sumexpsub")
    out, m, s = log_einsum_with_extras(source, *args, block_size=block_size)
    return (out,) + ((m,) if return_max else ()) + ((s,) if return_sumexpsub else ())


def log_einsum_backward(
    equation: Equation | str,
    args: Sequence[Tensor],
    needs_grad: Sequence[bool],
    grad: Tensor,
    block_size: BlockSize = AUTOMATIC_BLOCK_SIZE,
    grad_of_neg_inf: float | Literal["uniform"] = math.nan,
    saved_max: Tensor | None = None,
    saved_sumexpsub: Tensor | None = None,
) -> list[Tensor | None]:
    """Gradients of :func:`log_einsum_forward` w.r.t. each arg.

    When both ``saved_max`` and ``saved_sumexpsub`` are given (from
    :func:`log_einsum_forward`), the forward is not recomputed.

    Args:
        equation: An :class:`Equation` (computed from its fields) or an equation string.
        args: The forward's tensors.
        needs_grad: One flag per arg.
        grad: The cotangent of the output.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.
        grad_of_neg_inf: NaN, a float, or ``'uniform'``.
        saved_max: ``max`` from :func:`log_einsum_forward`, or ``None``.
        saved_sumexpsub: ``sumexpsub`` from :func:`log_einsum_forward`, or ``None``.

    Example:
        >>> import torch, semiring_einsum
        >>> semiring_einsum.log_einsum_backward("i->", [torch.zeros(2)], [True],
        ...                                     torch.tensor(1.0))
        [tensor([0.5000, 0.5000])]
    """
    refuse_dtensors(args, "log_einsum_backward")
    source = subscripts_of(equation, args, FORWARD_PREPARED, _LOG_BACKWARD)
    needs = _needs(needs_grad, args)
    out = None
    if saved_max is not None and saved_sumexpsub is not None:
        out = saved_max + torch.log(saved_sumexpsub)
    grads = log_einsum_vjp(
        source, args, grad, out=out, block_size=block_size, grad_of_neg_inf=grad_of_neg_inf
    )
    return [g if n else None for g, n in zip(grads, needs)]


def log_viterbi_einsum_forward(
    equation: Equation | str, *args: Tensor, block_size: BlockSize = AUTOMATIC_BLOCK_SIZE
) -> tuple[Tensor, Tensor]:
    """Max-plus einsum with the argmax of the summed indices.

    Args:
        equation: An :class:`Equation` (computed from its fields) or an equation string.
        *args: Score (log-space) tensors.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.

    Returns:
        ``(max, argmax)``; ``argmax`` has shape ``max.shape + (k,)`` for ``k``
        summed indices, in order of first appearance.  Ties go to the first
        maximiser in row-major order, whatever ``block_size`` is.

    Example:
        >>> import torch, semiring_einsum
        >>> semiring_einsum.log_viterbi_einsum_forward("i->", torch.tensor([0., 2., 1.]))
        (tensor(2.), tensor([1]))
    """
    source = subscripts_of(equation, args, FORWARD_PREPARED)
    values, argmax = func.viterbi_einsum(source, *args, block_size=block_size)
    return values, argmax  # (a plain tuple, as the reference's)


Window = tuple[slice, ...]


def semiring_einsum_forward(
    equation: Equation | str,
    args: Sequence[Tensor],
    block_size: BlockSize,
    func: Callable[[Callable[..., Any]], Any],
) -> Any:
    """Run a user-defined einsum through the ``compute_sum`` callback protocol.

    ``func(compute_sum)`` is called once and its result returned.  Each call
    ``compute_sum(add_in_place, sum_block, multiply_in_place,
    include_indexes=False, output_dtypes=(None,))`` makes one pass over the
    windows of the summed indices: for each window it builds a fresh term
    tensor -- output dims (in output order) then the window's summed dims (in
    order of first appearance) -- by starting from a copy of the first
    operand's slice and calling ``multiply_in_place(term, factor)`` with each
    other slice; then ``sum_block(term, dims)`` (or ``sum_block(term, dims,
    var_values)`` with ``include_indexes=True``, where ``var_values`` holds one
    ``slice`` per summed index) reduces the window, and
    ``add_in_place(acc, part)`` accumulates it into the first window's part,
    which is returned.  When a summed index has size 0, ``sum_block`` is
    called once on the empty window, so it defines the empty sum.
    ``output_dtypes`` is accepted for compatibility; the budget here bounds
    the window tensor itself, so it is not needed.  With an
    :class:`Equation`, ``equation.prepare_for_forward()`` runs first, as in
    the reference, so ``func`` may read ``equation.reduce_input_to_output``
    (as :func:`semiring_einsum.log_forward.resize_max_values` does).

    Args:
        equation: An :class:`Equation` (computed from its fields) or an equation string.
        args: The tensors.
        block_size: A window extent (int) or an :class:`AutomaticBlockSize`.
        func: Called once as ``func(compute_sum)``; its result is returned.

    Example:
        >>> import torch, semiring_einsum
        >>> def max_plus(compute_sum):
        ...     def add(a, b):
        ...         torch.maximum(a, b, out=a)
        ...     def reduce(a, dims):
        ...         return a.amax(dims) if dims else a
        ...     def mul(a, b):
        ...         a += b
        ...     return compute_sum(add, reduce, mul)
        >>> x = torch.tensor([[0., 5.], [2., 1.]])
        >>> semiring_einsum.semiring_einsum_forward("ij,jk->ik", [x, x], 1, max_plus)
        tensor([[7., 6.],
                [3., 7.]])
    """
    refuse_dtensors(args, "semiring_einsum_forward")
    source = subscripts_of(equation, args, FORWARD_PREPARED)
    device = args[0].device if args and isinstance(args[0], Tensor) else torch.device("cpu")
    budget = resolve_budget(block_size, device, source)
    try:  # a call like one seen before: no checks again
        key = (source, budget, *[(x.shape, x.dtype, x.device) for x in args])
        found = _PROTOCOLS.get(key)
    except (AttributeError, TypeError):
        key, found = None, None
    if found is None:
        shapes, dtypes = check_operands(source, args)
        found = _protocol(source, shapes, dtypes, device.type, budget)
        if key is not None:
            _PROTOCOLS.put(key, found)
    recipe, step, ranges, whole = found
    xs = apply_recipe(recipe, args)
    size = step.size
    nout = len(step.output)

    def compute_sum(
        add_in_place: Callable[[Any, Any], object],
        sum_block: Callable[..., Any],
        multiply_in_place: Callable[[Tensor, Tensor], object],
        include_indexes: bool = False,
        output_dtypes: Sequence[torch.dtype | None] = (None,),
    ) -> Any:
        for dtype in output_dtypes:
            if dtype is not None and not isinstance(dtype, torch.dtype):
                raise TypeError(f"output_dtypes must hold torch dtypes or None, got {dtype!r}")
        # The protocol's term layout: output dims first, then the window's summed dims.
        laid = K.output_first(step, xs)
        nsum = len(step.windows)
        dims = tuple(range(nout, nout + nsum))
        out_sizes = [size[c] for c in step.output]
        acc: Any = None
        for rng in ranges:
            views = laid if whole else _narrowed(laid, nout, rng)
            shape = out_sizes + [hi - lo for lo, hi in rng]
            term = views[0].expand(shape).clone()
            for factor in views[1:]:
                multiply_in_place(term, factor)
            if include_indexes:
                part = sum_block(term, dims, tuple(slice(lo, hi) for lo, hi in rng))
            else:
                part = sum_block(term, dims)
            if acc is None:
                acc = part
            else:
                add_in_place(acc, part)
        return acc

    return func(compute_sum)


# The protocol plans of recent calls by their raw arguments.
_PROTOCOLS: LRU[tuple[object, ...], tuple[Any, ...]] = LRU(1024)


@cached(maxsize=1024)
def _protocol(
    source: str,
    shapes: tuple[tuple[int, ...], ...],
    dtypes: tuple[torch.dtype, ...],
    device_type: str,
    budget: Budget,
) -> tuple[Recipe, Step, list[tuple[tuple[int, int], ...]], bool]:
    """The callback protocol's plan of a call (cached): the recipe that cleans the
    operands, the joint step, its windows (one empty window for an empty sum), and
    whether its one window is the whole of every summed index."""
    recipe = analyze(source, shapes, dtypes)
    clean = recipe.contraction
    step = joint_step(clean, budget, recipe.dtype.itemsize, device_type, recipe.equation.summed)
    size = step.size
    ranges = list(step.ranges()) or [tuple((0, 0) for _ in step.windows)]
    whole = len(ranges) == 1 and all(
        hi == size[c] for (c, _), (_, hi) in zip(step.windows, ranges[0])
    )
    return recipe, step, ranges, whole


def _narrowed(laid: Sequence[Tensor], nout: int, rng: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Output-first operands narrowed to one window of the summed dims (not where broadcast)."""
    views = []
    for x in laid:
        for d, (lo, hi) in enumerate(rng, start=nout):
            if x.shape[d] != 1:
                x = x.narrow(d, lo, hi - lo)
        views.append(x)
    return views


@dataclass(frozen=True, eq=False)
class _CombinedSpec:
    equation: Any
    forward_kwargs: dict[str, Any]
    backward_kwargs: dict[str, Any]


@cached(maxsize=256)
def _combined_rule(
    forward: Callable[..., Tensor],
    backward: Callable[..., Sequence[Tensor | None]],
    forward_options: tuple[str, ...],
    backward_options: tuple[str, ...],
) -> Rule:
    """The rule of :func:`combine`'s function (cached: calling ``combine`` in a loop makes
    no new autograd Function classes)."""

    def forward_rule(spec: _CombinedSpec, ctx: Context, *xs: Tensor) -> tuple[Tensor]:
        return (forward(spec.equation, *xs, **spec.forward_kwargs),)

    def vjp_rule(
        spec: _CombinedSpec,
        xs: Sequence[Tensor],
        outs: Sequence[Tensor],
        grads: Sequence[Tensor],
        needs: Sequence[bool],
    ) -> Sequence[Tensor | None]:
        result = list(
            backward(spec.equation, tuple(xs), tuple(needs), grads[0], **spec.backward_kwargs)
        )
        if len(result) != len(xs):
            raise ValueError(
                f"the backward given to combine() returned {len(result)} gradients "
                f"for {len(xs)} args"
            )
        return result

    name = f"Combined_{getattr(forward, '__name__', 'einsum')}"
    return Rule(name, forward_rule, vjp_rule, None, batched=False)


def combine(
    forward: Callable[..., Tensor],
    backward: Callable[..., Sequence[Tensor | None]],
    forward_options: Sequence[str] = (),
    backward_options: Sequence[str] = (),
) -> Callable[..., Tensor]:
    """Join an einsum forward and its backward into one differentiable function.

    ``forward(equation, *args, block_size=..., **forward_options)`` computes
    the output; ``backward(equation, args, needs_grad, grad, block_size=...,
    **backward_options)`` returns one gradient per arg (``None`` where
    ``needs_grad`` is false).  The result is called as ``f(equation, *args,
    block_size=..., **options)``; each keyword in ``forward_options`` /
    ``backward_options`` is routed to the function that names it.  The
    function is an ``autograd.Function`` in the ``setup_context`` style, so it
    also works under ``torch.func.grad`` and ``vmap`` when ``forward`` and
    ``backward`` are written with vmappable torch operations.  Calling ``combine``
    again with the same functions and options (in a loop, say) reuses that
    ``autograd.Function``; :func:`semiring_einsum.func.clear_caches` forgets it.

    Args:
        forward: ``forward(equation, *args, block_size=..., **options)``.
        backward: ``backward(equation, args, needs_grad, grad, block_size=..., **options)``.
        forward_options: Keyword options routed to ``forward``.
        backward_options: Keyword options routed to ``backward``.

    Example:
        >>> import torch, semiring_einsum
        >>> f = semiring_einsum.combine(semiring_einsum.real_einsum_forward,
        ...                             semiring_einsum.real_einsum_backward)
        >>> x = torch.ones(3, requires_grad=True)
        >>> f("i->", x, block_size=2).backward()
        >>> x.grad
        tensor([1., 1., 1.])
    """
    forward_options = tuple(forward_options)
    backward_options = tuple(backward_options)
    try:  # one rule (and so one set of autograd Functions) per distinct combination
        rule = _combined_rule(forward, backward, forward_options, backward_options)
    except TypeError:  # an unhashable callable: a rule of its own
        rule = _combined_rule.__wrapped__(forward, backward, forward_options, backward_options)

    def combined(
        equation: Any, *args: Tensor, block_size: BlockSize = AUTOMATIC_BLOCK_SIZE, **kwargs: Any
    ) -> Tensor:
        unknown = set(kwargs) - set(forward_options) - set(backward_options)
        if unknown:
            raise TypeError(f"got an unexpected keyword argument {sorted(unknown)[0]!r}")
        fwd = {k: kwargs[k] for k in forward_options if k in kwargs}
        bwd = {k: kwargs[k] for k in backward_options if k in kwargs}
        fwd["block_size"] = bwd["block_size"] = block_size
        return apply(rule, _CombinedSpec(equation, fwd, bwd), call_context(args), *args)[0]

    return combined
