"""Max-plus with an argmax on pairwise plans: ranked steps, backtracking, non-finite cells.

Viterbi's argmax follows one tie rule (the first maximiser in row-major order of the summed
indices) on every plan.  A pairwise plan reaches it by threading partial ranks through its
steps (:func:`max_ranked`), where the path does not make them unnecessary
(:func:`outer_first`); :func:`backtrack` reads each step's argmax back to the summed indices,
and :func:`joint_where_not_finite` settles cells whose value is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import cast

import torch

from . import _kernels as K
from . import _native as N
from ._autograd import apply
from ._budget import (
    AutomaticBlockSize,
    BlockSize,
    Budget,
)
from ._cache import cached
from ._context import Context, untraced
from ._plan import (
    Step,
    along_path,
)
from ._prepare import Prepared
from ._rules import (
    MAX_RANKED,
    RANKED_RULE,
    Family,
    MaxSpec,
    RankedSpec,
)
from ._ties import ranks_needed, row_major_strides, sole_summing_step

Tensor = torch.Tensor
Optimize = str | bool | Sequence[Sequence[int]]


def joint_where_not_finite(
    p: Prepared,
    ctx: Context,
    budget: Budget,
    operands: Sequence[Tensor],
    values: Tensor,
    argmax: Tensor,
    joint: Callable[[str, Sequence[Tensor], BlockSize], Tensor],
) -> Tensor:
    """The argmax of the cells whose value is not finite, by the joint rule.

    Partial ranks order a pairwise plan's ties exactly where a cell's value is
    finite; a later factor of -inf, +inf or NaN can make terms that an earlier
    step told apart tie (or turn NaN) in the whole sum.  A -inf cell has only
    -inf terms: its argmax is the first term, zeros.  The (rare) +inf and NaN
    cells are recomputed one by one, jointly, from ``operands`` (those the max-plus
    plan ran on) restricted to the cell (``joint(equation, operands, block_size)``:
    the argmax of a joint
    Viterbi contraction) -- in eager mode only: under a tracer or ``vmap`` the
    values cannot be looked at, and those cells keep the pairwise plan's choice.
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
        for term, x in zip(c.inputs, operands):
            for d in reversed(range(len(term))):
                if term[d] in at:
                    x = x.select(d, at[term[d]])
            ops.append(x.detach())
            terms.append("".join(letters[i] for i in term if i not in at))
        sub = ",".join(terms) + "->"
        best = joint(sub, ops, block)
        order = [i for i in dict.fromkeys("".join(terms))]  # the sub-equation's summed order
        by_letter = dict(zip(order, best.tolist()))
        found = [by_letter[letters[i]] for i in summed]
        argmax[tuple(cell)] = torch.tensor(found, device=argmax.device)
    return argmax


def max_ranked(
    p: Prepared,
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
    runs on its usual kernel; its result's rank is read off its argmax.  The plan
    says which is which: the ranked steps' kernel is ``max_plus.ranked``
    (:func:`._ties.ranked_steps`).
    """
    size = p.contraction.size
    summed = p.equation.summed
    stride = row_major_strides(size, summed)
    needed = ranks_needed(p.plan.steps, len(operands))

    def ranked_step(
        k: int, step: Step, pairs: list[tuple[Tensor, Tensor | None]]
    ) -> tuple[Tensor, Tensor | None]:
        args = [x for x, _ in pairs]
        rargs = [r for _, r in pairs]
        present = [r for r in rargs if r is not None]
        own = [c for c, _ in step.windows]
        strides = tuple(stride[c] for c in own)
        spec = cast(MaxSpec, p.spec(step))
        rank: Tensor | None = None
        if step.kernel is MAX_RANKED:
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


def backtrack(p: Prepared, backpointers: list[tuple[Step, Tensor]]) -> Tensor:
    """The argmax of every summed index, from each step's own argmax.

    Walking the steps backwards, every index a step's result is indexed by is
    known (an output index, or one summed by a later step), so its argmax can
    be looked up for every output cell and unravelled into the indices it sums.
    """
    size = p.contraction.size
    out = p.contraction.output
    shape = [size[c] for c in out]
    summed = p.equation.summed
    sole = sole_summing_step([step for step, _ in backpointers], summed)
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


@cached(maxsize=1024)
def _axis(n: int, stride: int, at: int, rank: int, device: torch.device) -> Tensor:
    """``arange(n) * stride`` along dim ``at`` of ``rank`` dims (the others size 1): an
    output index's share of a flat position.  (Cached: only read.)"""
    view = [1] * rank
    view[at] = n
    return (torch.arange(n, device=device) * stride).view(view)
