"""The engine: every contraction of the public functions runs through :func:`run`.

:func:`run` routes a call (DTensor operands to :mod:`._distributed`, several outputs to
:mod:`._multi`) and hands the rest to :func:`contract`, the one node ``torch.compile`` sees,
which prepares the call (:mod:`._prepare`) and walks its plan with the family's rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import torch

from . import _distributed as D
from . import _kernels as K
from . import _ops as OPS
from ._autograd import apply
from ._budget import (
    AUTOMATIC_BLOCK_SIZE,
    BlockSize,
    Budget,
    budget_of,
    resolve_budget,
)
from ._compile import in_graph
from ._context import Context, call_context
from ._multi import reject, several
from ._plan import (
    Plan,
    Step,
)
from ._prepare import JOINT_IF_SMALL, PARTIAL, Prepared, budget_for, selecting_family
from ._results import ViterbiResult
from ._rules import (
    GENERIC_FAMILY,
    LOG_FAMILY,
    LOG_RULE,
    LOG_SMALL,
    MAX_UNSUMMED,
    REAL_BLAS,
    REAL_FAMILY,
    CustomSpec,
    Family,
    LogSpec,
    MaxSpec,
    family_of,
    max_values,
    neg_inf_policy,
    run_vjp,
)
from ._semiring import LOG, MAX_PLUS, Semiring
from ._viterbi import backtrack, joint_where_not_finite, max_ranked

Tensor = torch.Tensor
Optimize = str | bool | Sequence[Sequence[int]]


@in_graph
def contract(
    semiring: Semiring,
    equation: str,
    extent: int,
    nbytes: int,
    optimize: Optimize,
    policy: float | str,
    viterbi: bool,
    *operands: Tensor,
) -> Tensor | tuple[Tensor, Tensor]:
    """Every contraction, behind one signature of tensors, constants and the semiring.

    This is the node ``torch.compile`` sees (see :mod:`._compile`); the public
    functions only validate and resolve their options into constants.  The
    semiring picks its family (:func:`._rules.family_of`); the call's context is
    worked out here, once.
    """
    budget = budget_of(extent, nbytes)
    ctx = call_context(operands)
    family = family_of(semiring)
    if family is REAL_FAMILY:  # (prepare()'s last route, without its layer)
        p = Prepared(semiring, family, equation, operands, budget, optimize, traced=ctx.traced)

        def real_step(s: Step, args: list[Tensor]) -> Tensor:
            # On BLAS, autograd and torch.func differentiate torch's own products.
            if s.kernel is REAL_BLAS:
                return OPS.REAL_BLAS(ctx, p.spec(s), args)
            return apply(family.rule, p.spec(s), ctx, *args)[0]

        return p.run(real_step)
    if family is LOG_FAMILY:
        p = prepare(semiring, family, equation, operands, budget, optimize, policy, ctx=ctx)
        if p.single and p.plan.steps[0].kernel is LOG_SMALL:  # values alone, no layers
            return p.finish(K.log_small(p.plan.steps[0], p.operands))
        return p.run(lambda s, args: apply(LOG_RULE, p.spec(s), ctx, *args)[0])
    if family is GENERIC_FAMILY:
        p = prepare(semiring, family, equation, operands, budget, optimize, policy, ctx=ctx)

        def custom_step(s: Step, args: list[Tensor]) -> Tensor:
            spec = replace(cast(CustomSpec, p.spec(s)), semiring=semiring)
            return apply(family.rule, spec, ctx, *args)[0]

        return p.run(custom_step)
    # Max-plus and min-plus.
    argmax = viterbi or ctx.derivative
    p = prepare(semiring, family, equation, operands, budget, optimize, policy, viterbi, ctx=ctx)
    backpointers: list[tuple[Step, Tensor]] = []

    plain = not (ctx.traced or ctx.transformed)  # nothing records, traces or batches

    def max_step(s: Step, args: list[Tensor]) -> Tensor:
        if plain and s.kernel is MAX_UNSUMMED:  # (no argmax, nothing to record: the sum)
            return K.add_only(s, args)
        values, linear = apply(family.rule, p.spec(s), ctx, *args)
        if viterbi:
            backpointers.append((s, linear))
        return values

    if not (argmax or ctx.traced or ctx.transformed):
        # Values of plain eager operands, nothing recording: straight to the kernels.
        def max_step(s: Step, args: list[Tensor]) -> Tensor:
            return max_values(cast(MaxSpec, p.spec(s)), ctx, args)

    def run_max(operands: list[Tensor]) -> Tensor:
        if p.ranked:  # where ties decide: the global rule
            return p.finish(max_ranked(p, family, ctx, operands, backpointers))
        return p.run(max_step, operands)

    ops = [-x for x in p.operands] if family.negate else p.operands  # min(x) = -max(-x)
    values = run_max(ops)
    if viterbi:
        found = backtrack(p, backpointers)
        if len(p.plan.steps) > 1:
            found = joint_where_not_finite(p, ctx, budget, ops, values, found, _joint_argmax)
    if family.negate:
        values = -values
    return (values, found) if viterbi else values


def prepare(
    semiring: Semiring,
    family: Family,
    equation: str,
    operands: Sequence[Tensor],
    budget: Budget,
    optimize: Optimize,
    policy: float | str = "nan",
    viterbi: bool = False,
    *,
    ctx: Context,
    device: torch.device | None = None,
) -> Prepared:
    """The call's setup, with the options every route resolves the same way (so that
    :func:`~._api.plan` shows what runs):

    * log: a ``grad_of_neg_inf`` other than NaN sums every index jointly (its weights are
      defined on the terms of the whole contraction).  Values alone (nothing traces,
      transforms or differentiates: the policy cannot matter) with the default strategy:
      a small contraction of three or more operands is one joint step, ``log.small`` --
      a pairwise plan of log-BLAS steps costs more than such terms (the CKY step of 5k
      terms: 220 -> 145 us).  (Two operands keep their one step: torch.logsumexp, eight
      calls inside, is no faster than the log-BLAS step there.)
    * max-plus and min-plus: the argmax is the backward's residual, computed only for
      Viterbi or where a derivative can come; with an argmax and the default strategy, a
      small contraction is one joint step (see :func:`._prepare.call_setup`).
    """
    traced = ctx.traced
    if family is LOG_FAMILY:
        joint: bool | str = policy not in ("nan", PARTIAL)
        values_only = len(operands) > 2 and not (ctx.traced or ctx.transformed or ctx.derivative)
        if values_only and isinstance(optimize, str) and optimize == "auto":
            joint = JOINT_IF_SMALL
        return Prepared(
            semiring, family, equation, operands, budget, optimize,
            traced=traced, joint=joint, neg_inf=policy, device=device,
        )  # fmt: skip
    if family.selects:
        argmax = viterbi or ctx.derivative
        small = argmax and isinstance(optimize, str) and optimize == "auto"
        return Prepared(
            semiring, family, equation, operands, budget, optimize, traced=traced,
            joint=JOINT_IF_SMALL if small else False, argmax=argmax, device=device,
        )  # fmt: skip
    return Prepared(semiring, family, equation, operands, budget, optimize, traced=traced)


def _joint_argmax(equation: str, operands: Sequence[Tensor], block_size: BlockSize) -> Tensor:
    """The argmax of a joint (one-step) Viterbi contraction."""
    found = run(MAX_PLUS, equation, operands, block_size, False, viterbi=True)
    return cast(Tensor, found[1])


def run(
    semiring: Semiring,
    equation: str,
    operands: Sequence[Tensor],
    block_size: BlockSize,
    optimize: Optimize,
    policy: float | str = "nan",
    viterbi: bool = False,
) -> Any:
    if D.involved(operands):
        return _distributed(semiring, equation, operands, block_size, optimize, policy, viterbi)
    if isinstance(equation, str) and "," in equation.partition("->")[2]:
        return _several(semiring, equation, operands, block_size, optimize, policy, viterbi)
    first = operands[0] if operands else None
    if block_size is None and type(first) is torch.Tensor and first.is_cpu:
        # The default budget on CPU, the common case, without resolving it anew.
        extent, nbytes = 0, AUTOMATIC_BLOCK_SIZE.max_cpu_bytes
    else:
        extent, nbytes = budget_for(block_size, operands, equation).as_ints()
    return contract(semiring, equation, extent, nbytes, optimize, policy, viterbi, *operands)


def _distributed(
    semiring: Semiring,
    equation: str,
    operands: Sequence[Tensor],
    block_size: BlockSize,
    optimize: Optimize,
    policy: float | str,
    viterbi: bool,
) -> Any:
    """DTensor operands: each rank contracts its shards; ⊕ combines them (:mod:`._distributed`)."""

    # NaN for cells all -inf on every rank comes from the combine; a cell all -inf on one
    # rank only weighs 0 there (like an intermediate step's cell).
    family = family_of(semiring)
    local_policy = PARTIAL if policy == "nan" and family is LOG_FAMILY else policy

    def local(eq: str, *shards: Tensor) -> Any:
        return run(semiring, eq, shards, block_size, optimize, local_policy, viterbi)

    def local_argmax(eq: str, *shards: Tensor) -> Tensor:
        if family.negate:  # the argmin of x: the argmax of -x
            shards = tuple(-x for x in shards)
        return cast(Tensor, run(MAX_PLUS, eq, shards, block_size, optimize, viterbi=True)[1])

    combine = D.contract
    if torch.compiler.is_compiling():  # a graph break: the call runs eagerly
        combine = torch.compiler.disable(D.contract)  # (imports Dynamo: it is running already)
    return combine(
        semiring,
        equation,
        operands,
        local,
        viterbi=viterbi,
        policy=policy,
        local_argmax=local_argmax,
    )


def _several(
    semiring: Semiring,
    equation: str,
    operands: Sequence[Tensor],
    block_size: BlockSize,
    optimize: Optimize,
    policy: float | str,
    viterbi: bool,
) -> tuple[Tensor, ...]:
    """An equation with several outputs (see :mod:`._multi`)."""
    if viterbi:
        reject(equation, "viterbi_einsum")
    budget = budget_for(block_size, operands, equation)  # validated once, up front

    def part(s: Semiring, eq: str, ops: Sequence[Tensor]) -> Tensor:
        return cast(Tensor, run(s, eq, ops, block_size, optimize, policy))

    def planner(s: Semiring, eq: str, ops: Sequence[Tensor]) -> Plan:
        # The call's own (cached) setup: the plan its contraction would run.
        traced = call_context(ops).traced
        return Prepared(s, family_of(s), eq, ops, budget, optimize, traced=traced).plan

    return several(semiring, equation, operands, part, planner)


def log_einsum_with_extras(
    equation: str, *operands: Tensor, block_size: BlockSize = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Joint log einsum that also returns each cell's largest term and scaled sum.

    Returns ``(out, max, sumexpsub)`` with ``max`` clipped to the dtype's
    finite range and ``sumexpsub = Σ exp(term - max)``; ``max`` and
    ``sumexpsub`` are not differentiable.  (Used by the compatibility layer.)
    """
    D.refuse(operands, "log_einsum_with_extras")
    budget = budget_for(block_size, operands, equation)
    p = Prepared(LOG, LOG_FAMILY, equation, operands, budget, False, extras=True)
    (step,) = p.plan.steps
    out, m, s = apply(LOG_RULE, p.spec(step), call_context(p.operands), *p.operands)
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
    D.refuse(operands, "log_einsum_vjp")
    budget = budget_for(block_size, operands, equation)
    p = Prepared(LOG, LOG_FAMILY, equation, operands, budget, False, neg_inf=grad_of_neg_inf)
    clean, pull = torch.func.vjp(lambda *xs: tuple(p.canonical(xs)), *operands)[:2]
    (step,) = p.plan.steps
    spec = replace(cast(LogSpec, p.spec(step)), residuals=False)
    if out is None:
        out = apply(LOG_RULE, spec, call_context(clean), *clean)[0]
    dtype = clean[0].dtype
    grads = run_vjp(
        LOG_RULE, spec, clean, (out.to(dtype),), (cotangent.to(dtype),), [True] * len(clean)
    )
    return tuple(pull(tuple(grads)))


def plan_call(
    equation: str,
    operands_or_shapes: Sequence[Tensor | Sequence[int]],
    semiring: Semiring,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    block_size: BlockSize,
    optimize: Optimize,
    compiled: bool,
    grad_of_neg_inf: float | str,
    viterbi: bool,
    requires_grad: bool | None,
) -> Plan:
    """:func:`~._api.plan`: the plan :func:`run` would make for the call, callable."""
    D.refuse(operands_or_shapes, "plan")
    if not isinstance(semiring, Semiring):
        raise TypeError(
            f"semiring must be a Semiring, got {type(semiring).__name__} (equation {equation!r})"
        )
    if viterbi:
        family = selecting_family(semiring, "plan(viterbi=True)", equation)
    else:
        family = family_of(semiring)
    policy = neg_inf_policy(grad_of_neg_inf, equation)
    if policy != "nan" and family is not LOG_FAMILY:
        raise ValueError(
            f"grad_of_neg_inf is an option of the log semiring, not of {semiring.name!r} "
            f"(equation {equation!r})"
        )
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
    if requires_grad is None:
        requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    target = torch.device(device) if device is not None else None
    if target is None:
        real = next((t for t in tensors if t.device.type != "meta"), None)
        target = real.device if real is not None else torch.device("cpu")
    meta = [t.detach().to("meta") for t in tensors]
    if dtype is not None:
        meta = [t.to(dtype) for t in meta]
    budget = resolve_budget(block_size, target, equation)
    ctx = Context(
        target.type,
        traced=compiled,
        compiling=compiled,
        batched=False,
        derivative=requires_grad,
        transformed=requires_grad,
    )
    p = prepare(
        semiring, family, equation, meta, budget, optimize, policy, viterbi, ctx=ctx, device=target
    )
    shapes = tuple(tuple(t.shape) for t in meta)
    runner = _Planned(
        semiring, equation, shapes, meta[0].dtype if meta else None, block_size, optimize,
        policy, viterbi,
    )  # fmt: skip
    return replace(p.plan, runner=runner)


def _shape(x: object) -> tuple[int, ...] | None:
    """``x`` as a shape, or ``None`` if it is not a sequence of ints."""
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in x):
        return None
    return tuple(x)


class _Planned:
    """What a :class:`Plan` made by :func:`plan` runs: the call it was planned for, on
    operands of the planned shapes and dtype (a plain object: plans pickle)."""

    def __init__(
        self,
        semiring: Semiring,
        equation: str,
        shapes: tuple[tuple[int, ...], ...],
        dtype: torch.dtype | None,
        block_size: BlockSize,
        optimize: Optimize,
        policy: float | str,
        viterbi: bool,
    ) -> None:
        self.semiring = semiring
        self.equation = equation
        self.shapes = shapes
        self.dtype = dtype
        self.block_size = block_size
        self.optimize = optimize
        self.policy = policy
        self.viterbi = viterbi

    def __call__(self, *operands: Tensor) -> Any:
        shapes = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in operands)
        if shapes != self.shapes:
            raise ValueError(
                f"this plan of {self.equation!r} is for operands of shapes {self.shapes}, "
                f"got {shapes}"
            )
        dtypes = {x.dtype for x in operands}
        if self.dtype is not None and dtypes != {self.dtype}:
            raise TypeError(
                f"this plan of {self.equation!r} is for {self.dtype} operands, got "
                f"{sorted(map(str, dtypes))}"
            )
        found = run(
            self.semiring,
            self.equation,
            operands,
            self.block_size,
            self.optimize,
            self.policy,
            self.viterbi,
        )
        return ViterbiResult(*found) if self.viterbi else found
