"""The public pure functions: parse, plan and execute, thinly wrapped."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from . import _distributed as D
from . import _kernels as K
from . import _logblas as LB
from . import _native as N
from . import _ops as OPS
from ._autograd import apply, clear_functions
from ._budget import (
    AUTOMATIC_BLOCK_SIZE,
    AutomaticBlockSize,
    BlockSize,
    Budget,
    budget_of,
    resolve_budget,
)
from ._budget import cache_clear as budget_of_cache_clear
from ._compile import in_graph
from ._context import Context, call_context, untraced
from ._context import cache_clear as context_cache_clear
from ._multi import reject, several
from ._parse import (
    Contraction,
    Equation,
    Recipe,
    analyze,
    apply_recipe,
    check_operands,
    parse_subscripts,
    rankable,
    resolve,
    row_major_strides,
    summed_of,
)
from ._plan import (
    EMPTY,
    Plan,
    Step,
    _optimize_key,
    along_path,
    clear_plan_caches,
    make_plan,
    outer_first_path,
    with_kernels,
)
from ._results import ViterbiResult
from ._rules import (
    GENERIC_FAMILY,
    LOG_FAMILY,
    LOG_RULE,
    MAX_SLICES,
    MAX_UNSUMMED,
    MAX_WINDOWS,
    MIN_FAMILY,
    RANKED_RULE,
    REAL_BLAS,
    REAL_FAMILY,
    CustomSpec,
    Family,
    LogSpec,
    MaxSpec,
    RankedSpec,
    Spec,
    family_of,
    max_values,
    neg_inf_policy,
    run_vjp,
)
from ._semiring import LOG, MAX_PLUS, MIN_PLUS, REAL, Semiring

Tensor = torch.Tensor
Optimize = str | bool | Sequence[Sequence[int]]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Setup:
    """Everything about a call that depends only on shapes, dtypes, options and the family."""

    recipe: Recipe
    plan: Plan
    compute: torch.dtype
    specs: dict[int, Spec]  # id(step) -> the step's Spec
    values_only: dict[int, Spec]  # max-plus: id(step) -> its Spec without an argmax
    single: bool  # one step over every operand, in order
    out_dtype: torch.dtype  # the result's dtype


# ``joint=`` of a max-plus call with an argmax: one joint step where the contraction is small.
JOINT_IF_SMALL = "if small"

# The grad_of_neg_inf policy of a contraction whose result is a partial sum (one rank's
# share of a sharded summed index): its cells all -inf weigh 0, like an intermediate
# step's, since the final cell is the ⊕ over ranks (which applies the user's policy).
PARTIAL = "partial"


@functools.lru_cache(maxsize=1024)
def _setup(
    family: Family,
    semiring: str,
    equation: str,
    shapes: tuple[tuple[int, ...], ...],
    dtypes: tuple[torch.dtype, ...],
    device_type: str,
    budget: Budget,
    optimize: object,
    joint: bool | str,
    policy: float | str,
    extras: bool,
    traced: bool,
    element: tuple[int, ...] = (),
) -> _Setup:
    """Validate, canonicalize and plan a call, kernels included (cached: one lookup per call)."""
    recipe = analyze(equation, shapes, dtypes, element)
    small = joint == JOINT_IF_SMALL
    joint = small or bool(joint)
    dtype = recipe.dtype
    if family is not REAL_FAMILY and not dtype.is_floating_point:
        raise TypeError(
            f"the {semiring} semiring needs floating-point operands, got "
            f"{dtype} (equation {equation!r})"
        )
    compute = torch.float32 if dtype in _LOW_PRECISION else dtype  # accumulate in float32
    out_dtype = dtype
    if dtype == torch.bool and recipe.contraction.summed:
        # As torch.sum of booleans: a sum counts the true terms, in int64.
        compute = out_dtype = torch.int64
    itemsize = compute.itemsize

    # A max-plus argmax under the joint tie rule prefers, at equal cost, a path that
    # needs no ranks (see _outer_first).
    ties = recipe.equation.summed if small and family.spec is MaxSpec else None

    def planned(joint: bool) -> Plan:
        return make_plan(
            equation,
            recipe.contraction,
            semiring=semiring,
            joint=joint,
            itemsize=itemsize,
            budget=budget,
            optimize=optimize,
            device_type=device_type,
            ties=ties,
        )

    plan = planned(joint)
    if small and not (len(plan.steps) == 1 and K.small_joint(plan.steps[0])):
        # A max-plus call with an argmax runs one joint step where that step is small
        # enough to be one window of one torch.max: a pairwise plan's ranks,
        # backtracking and joint fix-up cost far more than such terms (the CKY step of
        # 10k terms: 0.50 -> 0.17 ms).  Otherwise, as asked.
        plan = planned(False)
    plan = with_kernels(
        plan, lambda step: family.kernel(step, compute, device_type, traced, extras)
    )
    last = plan.steps[-1]
    specs: dict[int, Spec] = {}
    values_only: dict[int, Spec] = {}
    for step in plan.steps:
        common = (step, budget, itemsize, device_type)
        if family.spec is LogSpec:
            # grad_of_neg_inf is about the cells of the *whole* contraction.  An
            # intermediate cell that is all -inf only matters through a final cell:
            # if that final cell is finite, the intermediate's terms have weight 0
            # there (exactly as in the joint sum); if it is all -inf too, the final
            # step's policy already reaches the intermediate through the chain rule.
            # So intermediate steps use weight 0, multiplying the cotangent so that a NaN
            # the final step's policy sends back passes on (K.THROUGH).
            neg_inf = policy if step is last and policy != PARTIAL else K.THROUGH
            specs[id(step)] = LogSpec(*common, neg_inf=neg_inf, extras=extras)
        elif family.spec is MaxSpec:
            specs[id(step)] = MaxSpec(*common, argmax=True)
            # Without an argmax, a slice loop gains nothing over the windows.
            plain = replace(step, kernel=MAX_WINDOWS) if step.kernel is MAX_SLICES else step
            values_only[id(step)] = MaxSpec(plain, *common[1:], argmax=False)
        else:
            specs[id(step)] = family.spec(*common)
    single = len(plan.steps) == 1 and plan.steps[0].operands == tuple(range(len(shapes)))
    return _Setup(recipe, plan, compute, specs, values_only, single, out_dtype)


# Setups of recent calls by their raw arguments (see _Prepared), with whether
# their operands need no diagonal, broadcast or cast.  Bounded: emptied when full.
_SEEN: dict[tuple[object, ...], tuple[_Setup, bool]] = {}
_SEEN_MAX = 1024


class _Prepared:
    """A canonicalized call: clean operands, their plan (kernels chosen), and how to finish."""

    __slots__ = (
        "recipe",
        "equation",
        "contraction",
        "operands",
        "plan",
        "specs",
        "values_only",
        "out_dtype",
        "compute_dtype",
        "single",
    )

    def __init__(
        self,
        semiring: Semiring,
        family: Family,
        equation: str,
        operands: Sequence[Tensor],
        budget: Budget,
        optimize: Optimize,
        *,
        traced: bool = False,
        joint: bool | str = False,
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
                semiring.shape,
                family.name,
                equation,
                budget,
                optimize,
                traced,
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
            shapes, dtypes = check_operands(equation, operands)
            device_type = (device or operands[0].device).type
            setup = _setup(
                family,
                semiring.name,
                equation,
                shapes,
                dtypes,
                device_type,
                budget,
                _optimize_key(equation, optimize, len(operands)),
                joint,
                neg_inf if neg_inf == PARTIAL else neg_inf_policy(neg_inf, equation),
                extras,
                traced,
                semiring.shape,
            )
            recipe = setup.recipe
            as_is = (
                not any(recipe.diagonals)
                and recipe.shapes == shapes
                and all(dtype == setup.compute for dtype in dtypes)
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
        self.out_dtype = setup.out_dtype
        self.compute_dtype = setup.compute
        ops = list(operands) if as_is else apply_recipe(setup.recipe, operands, setup.compute)
        self.operands = ops
        self.specs = setup.specs
        self.values_only = setup.values_only
        self.single = setup.single

    def spec(self, step: Step, argmax: bool = True) -> Spec:
        """The step's spec (max-plus: the one with or without an argmax)."""
        return self.specs[id(step)] if argmax else self.values_only[id(step)]

    def canonical(self, operands: Sequence[Tensor]) -> list[Tensor]:
        """The clean operands of ``operands`` (differentiably), as in ``__init__``."""
        return apply_recipe(self.recipe, operands, self.compute_dtype)

    def run(
        self,
        run_step: Callable[[Step, list[Tensor]], Tensor],
        operands: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Execute the plan's steps in order (opt_einsum's path convention)."""
        ops = self.operands if operands is None else operands
        steps = self.plan.steps
        if self.single:  # the common case: no list juggling
            return self.finish(run_step(steps[0], list(ops)))
        return self.finish(along_path(steps, ops, lambda _, step, args: run_step(step, args)))

    def finish(self, out: Tensor) -> Tensor:
        return out if out.dtype == self.out_dtype else out.to(self.out_dtype)


def _budget(block_size: object, operands: Sequence[object], equation: object) -> Budget:
    """Resolve ``block_size`` for the operands' device (validating it)."""
    first = operands[0] if operands else None
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    return resolve_budget(block_size, device, equation)


@in_graph
def _contract(
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
        p = _Prepared(semiring, family, equation, operands, budget, optimize, traced=traced)

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
        p = _Prepared(
            semiring, family, equation, operands, budget, optimize,
            traced=traced, joint=joint, neg_inf=policy,
        )  # fmt: skip
        if values_only and p.single and K.small_joint(p.plan.steps[0]):
            return p.finish(K.log_small(p.plan.steps[0], p.operands))
        return p.run(lambda s, args: apply(LOG_RULE, p.spec(s), ctx, *args)[0])
    if family is GENERIC_FAMILY:
        p = _Prepared(semiring, family, equation, operands, budget, optimize, traced=traced)

        def custom_step(s: Step, args: list[Tensor]) -> Tensor:
            spec = replace(cast(CustomSpec, p.spec(s)), semiring=semiring)
            return apply(family.rule, spec, ctx, *args)[0]

        return p.run(custom_step)
    # Max-plus and min-plus.  The argmax is the backward's residual: skip it
    # when no derivative can come.  With an argmax and the default strategy, a
    # small contraction runs as one joint step (see _setup).
    argmax = viterbi or ctx.derivative
    small = argmax and isinstance(optimize, str) and optimize == "auto"
    p = _Prepared(
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

    def run(operands: list[Tensor]) -> Tensor:
        if (
            argmax
            and len(p.plan.steps) > 1
            and _ties_need_ranks(p)
            and rankable(p.contraction, p.equation.summed)
        ):
            # Where ties decide: the global rule.
            return p.finish(_max_ranked(p, family, ctx, operands, backpointers))
        return p.run(max_step, operands)

    if family is MIN_FAMILY:  # min(x) = -max(-x)
        return -run([-x for x in p.operands])
    values = run(p.operands)
    if not viterbi:
        return values
    found = _backtrack(p, backpointers)
    if len(p.plan.steps) > 1:
        found = _joint_where_not_finite(p, ctx, budget, values, found)
    return values, found


def _sole_summing_step(steps: Sequence[Step], summed: str) -> int | None:
    """The position of the one step of ``steps`` that sums, where it sums every index of
    ``summed`` in that (global) order: its own first maximiser is then the joint rule's,
    and its argmax the whole plan's (the other steps only multiply).  ``None`` otherwise."""
    summing = [k for k, s in enumerate(steps) if s.windows]
    if len(summing) == 1 and "".join(c for c, _ in steps[summing[0]].windows) == summed:
        return summing[0]
    return None


def _ties_need_ranks(p: _Prepared) -> bool:
    """Whether a plan's argmax needs partial ranks to follow the joint tie rule."""
    steps = p.plan.steps
    return any(s.windows for s in steps) and not _outer_first(
        steps, p.contraction, p.equation.summed
    )


@functools.lru_cache(maxsize=1024)
def _outer_first(steps: tuple[Step, ...], contraction: Contraction, summed: str) -> bool:
    """Whether each step sums its indices in the global order, all before (in that
    order) every index its operands' earlier steps summed: a plan that sums from the last
    index out (``ab,bc,cd->ad`` summing c, then b; see :func:`._plan.outer_first_path`).

    Then no step needs ranks.  A step's terms differ in its own indices only (its
    operands' cells carry one choice each for the rest), so its first maximiser is
    the joint rule's choice of those indices, the most significant of the cell's; for
    that choice, the maximisers of the rest are the product of the operands' own sets,
    whose first in the global order is each one's first (each operand's own argmax, by
    the same argument one step down).  In a cell whose value is finite, no NaN or +inf
    took part; other cells are redone jointly (see :func:`_joint_where_not_finite`).
    """
    for step in steps:
        own = [c for c, _ in step.windows]
        if own != sorted(own, key=summed.index):
            return False
    return outer_first_path(contraction, [s.operands for s in steps], summed)


@functools.lru_cache(maxsize=1024)
def _ranks_needed(steps: tuple[Step, ...], operands: int) -> list[bool]:
    """For each step, whether a later step that sums an index reads its result's rank
    (directly, or through steps that sum nothing).  (Cached: a plan's steps are values;
    the caller only reads the list.)"""
    readers: dict[int, list[int]] = {}

    def record(k: int, step: Step, made: list[int | None]) -> int:
        for m in made:  # which step made each operand (None: an input)
            if m is not None:
                readers.setdefault(m, []).append(k)
        return k

    along_path(steps, [None] * operands, record)
    needed = [False] * len(steps)
    for k in reversed(range(len(steps))):
        needed[k] = any(steps[j].windows or needed[j] for j in readers.get(k, []))
    return needed


def _joint_where_not_finite(
    p: _Prepared, ctx: Context, budget: Budget, values: Tensor, argmax: Tensor
) -> Tensor:
    """The argmax of the cells whose value is not finite, by the joint rule.

    Partial ranks order a pairwise plan's ties exactly where a cell's value is
    finite; a later factor of -inf, +inf or NaN can make terms that an earlier
    step told apart tie (or turn NaN) in the whole sum.  A -inf cell has only
    -inf terms: its argmax is the first term, zeros.  The (rare) +inf and NaN
    cells are recomputed one by one, jointly, from the operands restricted to
    the cell -- in eager mode only: under a tracer or ``vmap`` the values cannot
    be looked at, and those cells keep the pairwise plan's choice.
    """
    if not argmax.shape[-1]:
        return argmax
    if ctx.traced or ctx.batched or ctx.foreign:  # no value branches
        return torch.where((values == -math.inf).unsqueeze(-1), 0, argmax)
    # The common case, all finite, in one reduction: a sum is finite only if its terms
    # are (a finite sum that overflows only sends it down the careful path below).
    if N.all_finite(values):
        return argmax
    neg = values == -math.inf
    argmax = torch.where(neg.unsqueeze(-1), 0, argmax)
    odd = ~torch.isfinite(values) & ~neg
    if not bool(odd.any()):
        return argmax
    c = p.contraction
    if len(c.size) > len(K.LETTERS):
        return argmax
    summed = p.equation.summed
    letters = dict(zip(c.size, K.LETTERS))
    argmax = argmax.clone()
    block: BlockSize = budget.extent
    if budget.bytes is not None:
        block = AutomaticBlockSize(max_cpu_bytes=budget.bytes, max_cuda_bytes=budget.bytes)
    for cell in odd.nonzero().tolist():
        at = dict(zip(c.output, cell))
        ops, terms = [], []
        for term, x in zip(c.inputs, p.operands):
            for d in reversed(range(len(term))):
                if term[d] in at:
                    x = x.select(d, at[term[d]])
            ops.append(x.detach())
            terms.append("".join(letters[i] for i in term if i not in at))
        sub = ",".join(terms) + "->"
        _, joint = viterbi_einsum(sub, *ops, block_size=block, optimize=False)
        order = [i for i in dict.fromkeys("".join(terms))]  # the sub-equation's summed order
        by_letter = dict(zip(order, joint.tolist()))
        found = [by_letter[letters[i]] for i in summed]
        argmax[tuple(cell)] = torch.tensor(found, device=argmax.device)
    return argmax


def _max_ranked(
    p: _Prepared,
    family: Family,
    ctx: Context,
    operands: Sequence[Tensor],
    backpointers: list[tuple[Step, Tensor]],
) -> Tensor:
    """A pairwise max-plus plan whose argmax follows the joint tie rule exactly.

    The first maximiser in row-major order of *all* the summed indices is the
    term of smallest global rank among the maximisers (``rank = Σ index ·
    stride`` over the equation's summed indices).  Each intermediate carries the
    partial rank of the assignment its cells stand for (over the indices summed
    so far); a step compares its terms' values, then their ranks -- the sum of
    their operands' ranks and their own coordinates' share -- which orders them
    exactly as the full rank would, since every index not yet summed is fixed
    within an output cell.  A step without ranked operands whose summed indices
    are in the global order needs no ranks (its first maximiser is the one), and
    runs on its usual kernel; its result's rank is read off its argmax.
    """
    size = p.contraction.size
    summed = p.equation.summed
    stride = row_major_strides(size, summed)
    needed = _ranks_needed(p.plan.steps, len(operands))

    def ranked_step(
        k: int, step: Step, pairs: list[tuple[Tensor, Tensor | None]]
    ) -> tuple[Tensor, Tensor | None]:
        args = [x for x, _ in pairs]
        rargs = [r for _, r in pairs]
        present = [r for r in rargs if r is not None]
        own = [c for c, _ in step.windows]
        strides = tuple(stride[c] for c in own)
        spec = cast(MaxSpec, p.spec(step, True))
        in_order = own == sorted(own, key=summed.index)
        rank: Tensor | None = None
        if own and step.kernel is not EMPTY and (present or not in_order):
            ranked = RankedSpec(
                step,
                spec.budget,
                spec.itemsize,
                spec.device_type,
                argmax=True,
                ranked=tuple(r is not None for r in rargs),
                strides=strides,
            )
            values, linear, rank = apply(RANKED_RULE, ranked, ctx, *args, *present)
        else:
            values, linear = apply(family.rule, spec, ctx, *args)
            if needed[k] and own:
                rank = K.encode_rank(step, linear, strides)
            elif needed[k] and present:  # unsummed: add them up
                terms = tuple(t for t, r in zip(step.inputs, rargs) if r is not None)
                rank = K.add_only(replace(step, inputs=terms), present)
        backpointers.append((step, linear))
        return values, rank

    start: list[tuple[Tensor, Tensor | None]] = [(x, None) for x in operands]
    return along_path(p.plan.steps, start, ranked_step)[0]


def _backtrack(p: _Prepared, backpointers: list[tuple[Step, Tensor]]) -> Tensor:
    """The argmax of every summed index, from each step's own argmax.

    Walking the steps backwards, every index a step's result is indexed by is
    known (an output index, or one summed by a later step), so its argmax can
    be looked up for every output cell and unravelled into the indices it sums.
    """
    size = p.contraction.size
    out = p.contraction.output
    shape = [size[c] for c in out]
    summed = p.equation.summed
    sole = _sole_summing_step([step for step, _ in backpointers], summed)
    if sole is not None and backpointers[sole][0].output == out:  # no lookups
        step, linear = backpointers[sole]
        # (At least 1-d for unravel; no reshape where the shape is already right:
        # each costs microseconds, and these calls are often that small.)
        found = N.unravel(step, linear if linear.dim() else linear.reshape(1))
        target = [*shape, len(summed)]
        # (A permuted argmax unravelled as it is: a view, which the caller gets dense.)
        return found.reshape(target) if list(found.shape) != target else N.dense(found)
    device = p.operands[0].device if p.operands else torch.device("cpu")
    known: dict[str, Tensor] = {}  # each summed index's coordinate, per output cell
    # Plain eager: one take per lookup, of cached coordinates.  Under a tracer or a
    # transform (vmap has no rule for take): advanced indexing by fresh ones.
    plain = untraced()

    def coordinate(c: str) -> Tensor:
        return (
            known[c]
            if c in known
            else _axis.__wrapped__(size[c], 1, out.index(c), len(out), device)
        )

    for step, linear in reversed(backpointers):
        if not step.windows:
            continue
        if not step.output or step.output == out:  # indexed as the result is: as it is
            at = linear
        elif not plain:
            at = linear[tuple(coordinate(c) for c in step.output)]
        else:
            # One take at the row-major position: the coordinates of the output's own
            # indices and the summed ones found so far (2 calls, against 3 for an
            # arange and advanced indexing).
            flat: Tensor | None = None
            stride = 1
            for c in reversed(step.output):
                if c in known:
                    part = known[c] if stride == 1 else known[c] * stride
                else:
                    part = _axis(size[c], stride, out.index(c), len(out), device)
                flat = part if flat is None else flat + part
                stride *= size[c]
            assert flat is not None
            full = tuple(size[c] for c in step.output)
            at = (linear if linear.shape == full else linear.expand(full)).take(flat)
        # At least 1-d: indexing with 0-d index tensors would call .item().
        at = at if at.dim() else at.reshape(1)
        if len(step.windows) == 1:  # its linear index is the coordinate
            known[step.windows[0][0]] = at
            continue
        coords = N.unravel(step, at)
        for i, (c, _) in enumerate(step.windows):
            known[c] = coords[..., i]
    if not summed:
        return torch.zeros(shape + [0], dtype=torch.int64, device=device)
    cells = shape or [1]  # a scalar output was walked as one cell
    stacked = torch.stack([known[c].expand(cells) for c in summed], dim=-1)
    return stacked.reshape(shape + [len(summed)])


@functools.lru_cache(maxsize=1024)
def _axis(n: int, stride: int, at: int, rank: int, device: torch.device) -> Tensor:
    """``arange(n) * stride`` along dim ``at`` of ``rank`` dims (the others size 1): an
    output index's share of a flat position.  (Cached: only read.)"""
    view = [1] * rank
    view[at] = n
    return (torch.arange(n, device=device) * stride).view(view)


def _run(
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
        extent, nbytes = _budget(block_size, operands, equation).as_ints()
    return _contract(semiring, equation, extent, nbytes, optimize, policy, viterbi, *operands)


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
        return _run(semiring, eq, shards, block_size, optimize, local_policy, viterbi)

    def local_argmax(eq: str, *shards: Tensor) -> Tensor:
        if semiring == MIN_PLUS:
            shards = tuple(-x for x in shards)
        return cast(Tensor, _run(MAX_PLUS, eq, shards, block_size, optimize, viterbi=True)[1])

    run = D.contract
    if torch.compiler.is_compiling():  # a graph break: the call runs eagerly
        run = torch.compiler.disable(D.contract)  # (imports Dynamo: it is running already)
    return run(
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
    budget = _budget(block_size, operands, equation)  # validated once, up front

    def contract(s: Semiring, eq: str, ops: Sequence[Tensor]) -> Tensor:
        return cast(Tensor, _run(s, eq, ops, block_size, optimize, policy))

    def planner(s: Semiring, eq: str, ops: Sequence[Tensor]) -> Plan:
        # The call's own (cached) setup: the plan its contraction would run.
        traced = call_context(ops).traced
        return _Prepared(s, family_of(s), eq, ops, budget, optimize, traced=traced).plan

    return several(semiring, equation, operands, contract, planner)


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
    return _run(REAL, equation, operands, block_size, optimize)


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
    return _run(LOG, equation, operands, block_size, optimize, policy)


def log_einsum_with_extras(
    equation: str, *operands: Tensor, block_size: BlockSize = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Joint log einsum that also returns each cell's largest term and scaled sum.

    Returns ``(out, max, sumexpsub)`` with ``max`` clipped to the dtype's
    finite range and ``sumexpsub = Σ exp(term - max)``; ``max`` and
    ``sumexpsub`` are not differentiable.  (Used by the compatibility layer.)
    """
    D.refuse(operands, "log_einsum_with_extras")
    budget = _budget(block_size, operands, equation)
    p = _Prepared(LOG, LOG_FAMILY, equation, operands, budget, False, extras=True)
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
    budget = _budget(block_size, operands, equation)
    p = _Prepared(LOG, LOG_FAMILY, equation, operands, budget, False, neg_inf=grad_of_neg_inf)
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
    return _run(MAX_PLUS, equation, operands, block_size, optimize)


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
    return _run(MIN_PLUS, equation, operands, block_size, optimize)


def viterbi_einsum(
    equation: str,
    *operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> ViterbiResult:
    """Max-plus einsum that also returns which summed indices achieved each max.

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

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> a = torch.tensor([[0., 2.], [1., -1.]])
        >>> values, argmax = func.viterbi_einsum("ij,jk->ik", a, a)
        >>> argmax[..., 0]  # the best j for each (i, k)
        tensor([[1, 0],
                [0, 0]])
    """
    values, argmax = _run(MAX_PLUS, equation, operands, block_size, optimize, viterbi=True)
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
    return _run(semiring, equation, operands, block_size, optimize)


def plan(
    equation: str,
    *operands_or_shapes: Tensor | Sequence[int],
    semiring: Semiring = REAL,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
    compiled: bool = False,
) -> Plan:
    """Inspect how a contraction would run, without running it.

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

    Returns:
        The immutable plan, with ``path``, ``steps`` (each naming its
        ``kernel``), ``block_sizes`` and ``peak_bytes``; ``print(plan)`` shows
        a table.

    Example:
        >>> from semiring_einsum import func
        >>> p = func.plan("ab,bc,cd->ad", (8, 9), (9, 10), (10, 11), semiring=func.LOG)
        >>> p.path
        ((0, 1), (0, 1))
    """
    D.refuse(operands_or_shapes, "plan")
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
    family = family_of(semiring)
    joint = False
    p = _Prepared(
        semiring, family, equation, meta, budget, optimize,
        traced=compiled, joint=joint, device=target,
    )  # fmt: skip
    return p.plan


def _shape(x: object) -> tuple[int, ...] | None:
    """``x`` as a shape, or ``None`` if it is not a sequence of ints."""
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in x):
        return None
    return tuple(x)


# Caches of the layers above the core (the drop-in layer's), emptied by clear_caches too.
_OTHER_CACHES: list[Callable[[], object]] = []


def register_cache(clear: Callable[[], object]) -> None:
    """Have :func:`clear_caches` call ``clear`` (a cache of a layer above the core)."""
    _OTHER_CACHES.append(clear)


def clear_caches() -> None:
    """Empty every cache of the package.

    Parsed equations, plans and their kernels, call setups, window sizes, the
    products chosen for BLAS steps, small steps' layouts and argmax tables, the
    drop-in layer's compiled equations and callback plans,
    the log steps' BLAS programs, budgets,
    call contexts, the ranks a Viterbi plan needs, the native kernel's step layouts
    and loaded library, and the
    autograd Functions made for steps of more operands than the ones built at
    import.  Every cache is bounded; clearing them is only useful to free their
    memory or to measure cold-start costs.

    Example:
        >>> from semiring_einsum import func
        >>> func.clear_caches()
    """
    _setup.cache_clear()
    _SEEN.clear()
    _ranks_needed.cache_clear()
    _outer_first.cache_clear()
    _axis.cache_clear()
    analyze.cache_clear()
    resolve.cache_clear()
    parse_subscripts.cache_clear()
    summed_of.cache_clear()
    clear_plan_caches()
    budget_of_cache_clear()
    context_cache_clear()
    K.cache_clear()
    for clear in _OTHER_CACHES:
        clear()
    LB.program.cache_clear()
    N.cache_clear()
    clear_functions()


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
    "clear_caches",
    "native_status",
]
