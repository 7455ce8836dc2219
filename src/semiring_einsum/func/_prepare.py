"""The per-call setup: validate, canonicalize and plan a call (cached), and prepare its operands.

:class:`Prepared` is what every route of the engine starts from (:mod:`._engine`, Viterbi's
ranked steps in :mod:`._viterbi`, the structured functions, sampling): the clean operands,
the plan with its kernels chosen, each step's :class:`~._rules.Spec`, and how to finish.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import _kernels as K
from ._budget import (
    Budget,
    resolve_budget,
)
from ._cache import LRU, cached
from ._parse import (
    Contraction,
    Equation,
    Recipe,
    analyze,
    apply_recipe,
    check_operands,
)
from ._plan import (
    Plan,
    Step,
    along_path,
    make_plan,
    optimize_key,
    with_kernels,
)
from ._rules import (
    LOG_SMALL,
    MAX_RANKED,
    MAX_SLICES,
    MAX_WINDOWS,
    REAL_FAMILY,
    Family,
    LogSpec,
    MaxSpec,
    Spec,
    family_of,
    neg_inf_policy,
)
from ._semiring import Semiring
from ._ties import rankable, ranked_steps, ties_need_ranks

Tensor = torch.Tensor
Optimize = str | bool | Sequence[Sequence[int]]


_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Setup:
    """Everything about a call that depends only on shapes, dtypes, options and the family."""

    recipe: Recipe
    plan: Plan
    compute: torch.dtype
    specs: dict[int, Spec]  # id(step) -> the step's Spec
    single: bool  # one step over every operand, in order
    ranked: bool  # a max-plus argmax whose steps carry ranks (see _ties)
    out_dtype: torch.dtype  # the result's dtype


# ``joint=`` of a max-plus call with an argmax, or of a log call nothing differentiates:
# one joint step where the contraction is small.
JOINT_IF_SMALL = "if small"

# The grad_of_neg_inf policy of a contraction whose result is a partial sum (one rank's
# share of a sharded summed index): its cells all -inf weigh 0, like an intermediate
# step's, since the final cell is the ⊕ over ranks (which applies the user's policy).
PARTIAL = "partial"


@cached(maxsize=1024)
def call_setup(
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
    argmax: bool = False,
) -> Setup:
    """Validate, canonicalize and plan a call, kernels included (cached: one lookup per call).

    The plan is what runs: besides each step's kernel as its family chooses it, a small
    joint log step of a call nothing differentiates is ``log.small``; a max-plus call
    without an argmax runs ``windows`` where an argmax would take ``slices``; and with an
    argmax on a pairwise plan whose ties need ranks, the steps that carry them are
    ``max_plus.ranked`` (see :mod:`._ties`).
    """
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
    # needs no ranks (see outer_first).
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
    contraction, summed = recipe.contraction, recipe.equation.summed
    ranked = False
    if small and family.spec is LogSpec and len(plan.steps) == 1 and K.small_joint(plan.steps[0]):
        plan = with_kernels(plan, lambda step: LOG_SMALL)
    elif family.selects and not argmax:
        # Without an argmax, a slice loop gains nothing over the windows.
        plan = with_kernels(plan, lambda s: MAX_WINDOWS if s.kernel is MAX_SLICES else s.kernel)
    elif (
        family.selects
        and len(plan.steps) > 1
        and ties_need_ranks(plan.steps, contraction, summed)
        and rankable(contraction, summed)
    ):
        flags = iter(ranked_steps(plan.steps, len(contraction.inputs), summed))
        plan = with_kernels(plan, lambda s: MAX_RANKED if next(flags) else s.kernel)
        ranked = True
    last = plan.steps[-1]
    specs: dict[int, Spec] = {}
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
            final = step is last and policy != PARTIAL
            neg_inf = K.NegInf.of(policy) if final else K.THROUGH
            specs[id(step)] = LogSpec(*common, neg_inf=neg_inf, extras=extras)
        elif family.spec is MaxSpec:
            specs[id(step)] = MaxSpec(*common, argmax=argmax)
        else:
            specs[id(step)] = family.spec(*common)
    single = len(plan.steps) == 1 and plan.steps[0].operands == tuple(range(len(shapes)))
    return Setup(recipe, plan, compute, specs, single, ranked, out_dtype)


# Setups of recent calls by their raw arguments (see Prepared), with whether
# their operands need no diagonal, broadcast or cast.
_SEEN: LRU[tuple[object, ...], tuple[Setup, bool]] = LRU(1024)
_SEEN_DATA, _TICK = _SEEN.data, LRU.tick


class Prepared:
    """A canonicalized call: clean operands, their plan (kernels chosen), and how to finish."""

    __slots__ = (
        "recipe",
        "equation",
        "contraction",
        "operands",
        "plan",
        "specs",
        "out_dtype",
        "compute_dtype",
        "single",
        "ranked",
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
        argmax: bool = False,
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
                argmax,
                *[(x.shape, x.dtype, x.device) for x in operands],
            )
            entry = _SEEN_DATA.get(raw)  # (LRU.get, without its frame)
            hit = None
            if entry is not None:
                entry[1] = _TICK()
                hit = entry[0]
            key = raw
        except (TypeError, AttributeError):
            hit = None
        if hit is not None:
            setup, as_is = hit
        else:
            shapes, dtypes = check_operands(equation, operands)
            device_type = (device or operands[0].device).type
            setup = call_setup(
                family,
                semiring.name,
                equation,
                shapes,
                dtypes,
                device_type,
                budget,
                optimize_key(equation, optimize, len(operands)),
                joint,
                neg_inf if neg_inf == PARTIAL else neg_inf_policy(neg_inf, equation),
                extras,
                traced,
                semiring.shape,
                argmax,
            )
            recipe = setup.recipe
            as_is = (
                not any(recipe.diagonals)
                and recipe.shapes == shapes
                and all(dtype == setup.compute for dtype in dtypes)
            )
            if key is not None:
                _SEEN.put(key, (setup, as_is))
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
        self.single = setup.single
        self.ranked = setup.ranked

    def spec(self, step: Step) -> Spec:
        """The step's spec."""
        return self.specs[id(step)]

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


def selecting_family(semiring: object, function: str, equation: object) -> Family:
    """The family of ``semiring`` for ``function`` (Viterbi, k-best): one whose ⊕ selects a
    term (max-plus, min-plus); a clear error for anything else."""
    if not isinstance(semiring, Semiring):
        raise TypeError(
            f"{function}: semiring must be MAX_PLUS or MIN_PLUS, got "
            f"{type(semiring).__name__} (equation {equation!r})"
        )
    family = family_of(semiring)
    if not family.selects:
        raise ValueError(
            f"{function}: semiring must be MAX_PLUS or MIN_PLUS (a semiring whose sum "
            f"selects one term), got {semiring.name!r} (equation {equation!r})"
        )
    return family


def budget_for(block_size: object, operands: Sequence[object], equation: object) -> Budget:
    """Resolve ``block_size`` for the operands' device (validating it)."""
    first = operands[0] if operands else None
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    return resolve_budget(block_size, device, equation)
