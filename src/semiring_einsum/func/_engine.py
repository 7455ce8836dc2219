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
    budget_of,
)
from ._compile import in_graph
from ._context import call_context
from ._multi import reject, several
from ._parse import (
    rankable,
)
from ._plan import (
    Plan,
    Step,
)
from ._prepare import JOINT_IF_SMALL, PARTIAL, Prepared, budget_for
from ._rules import (
    GENERIC_FAMILY,
    LOG_FAMILY,
    LOG_RULE,
    MAX_UNSUMMED,
    REAL_BLAS,
    REAL_FAMILY,
    CustomSpec,
    LogSpec,
    MaxSpec,
    family_of,
    max_values,
    run_vjp,
)
from ._semiring import LOG, MAX_PLUS, MIN_PLUS, Semiring
from ._viterbi import backtrack, joint_where_not_finite, max_ranked, ties_need_ranks

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
    traced = ctx.traced
    if family is REAL_FAMILY:
        p = Prepared(semiring, family, equation, operands, budget, optimize, traced=traced)

        def real_step(s: Step, args: list[Tensor]) -> Tensor:
            # On BLAS, autograd and torch.func differentiate torch's own products.
            if s.kernel is REAL_BLAS:
                return OPS.REAL_BLAS(ctx, p.spec(s), args)
            return apply(family.rule, p.spec(s), ctx, *args)[0]

        return p.run(real_step)
    if family is LOG_FAMILY:
        joint: bool | str = policy not in ("nan", PARTIAL)
        # Values alone (plain eager, nothing recording: grad_of_neg_inf cannot matter),
        # with the default strategy: a small contraction of three or more operands is
        # one joint step, one torch.logsumexp over its terms -- a pairwise plan of
        # log-BLAS steps costs more than such terms (the CKY step of 5k terms: 220 ->
        # 145 us).  (Two operands keep their one step: torch.logsumexp, eight calls
        # inside, is no faster than the log-BLAS step there.)
        values_only = len(operands) > 2 and not (ctx.traced or ctx.transformed or ctx.derivative)
        if values_only and isinstance(optimize, str) and optimize == "auto":
            joint = JOINT_IF_SMALL
        p = Prepared(
            semiring, family, equation, operands, budget, optimize,
            traced=traced, joint=joint, neg_inf=policy,
        )  # fmt: skip
        if values_only and p.single and K.small_joint(p.plan.steps[0]):
            return p.finish(K.log_small(p.plan.steps[0], p.operands))
        return p.run(lambda s, args: apply(LOG_RULE, p.spec(s), ctx, *args)[0])
    if family is GENERIC_FAMILY:
        p = Prepared(semiring, family, equation, operands, budget, optimize, traced=traced)

        def custom_step(s: Step, args: list[Tensor]) -> Tensor:
            spec = replace(cast(CustomSpec, p.spec(s)), semiring=semiring)
            return apply(family.rule, spec, ctx, *args)[0]

        return p.run(custom_step)
    # Max-plus and min-plus.  The argmax is the backward's residual: skip it
    # when no derivative can come.  With an argmax and the default strategy, a
    # small contraction runs as one joint step (see call_setup).
    argmax = viterbi or ctx.derivative
    small = argmax and isinstance(optimize, str) and optimize == "auto"
    p = Prepared(
        semiring, family, equation, operands, budget, optimize,
        traced=traced, joint=JOINT_IF_SMALL if small else False,
    )  # fmt: skip
    backpointers: list[tuple[Step, Tensor]] = []

    plain = not (ctx.traced or ctx.transformed)  # nothing records, traces or batches

    def max_step(s: Step, args: list[Tensor]) -> Tensor:
        if plain and s.kernel is MAX_UNSUMMED:  # (no argmax, nothing to record: the sum)
            return K.add_only(s, args)
        values, linear = apply(family.rule, p.spec(s, argmax), ctx, *args)
        if viterbi:
            backpointers.append((s, linear))
        return values

    if not (argmax or ctx.traced or ctx.transformed):
        # Values of plain eager operands, nothing recording: straight to the kernels.
        def max_step(s: Step, args: list[Tensor]) -> Tensor:
            return max_values(cast(MaxSpec, p.spec(s, False)), ctx, args)

    def run_max(operands: list[Tensor]) -> Tensor:
        if (
            argmax
            and len(p.plan.steps) > 1
            and ties_need_ranks(p)
            and rankable(p.contraction, p.equation.summed)
        ):
            # Where ties decide: the global rule.
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
    local_policy = PARTIAL if policy == "nan" and semiring == LOG else policy

    def local(eq: str, *shards: Tensor) -> Any:
        return run(semiring, eq, shards, block_size, optimize, local_policy, viterbi)

    def local_argmax(eq: str, *shards: Tensor) -> Tensor:
        if semiring == MIN_PLUS:
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
