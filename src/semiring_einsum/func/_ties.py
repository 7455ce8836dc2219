"""The tie rule of every max-plus argmax, in one place.

Ties go to the first maximiser in row-major order of the summed indices (in order of first
appearance).  On a pairwise plan each intermediate carries the partial row-major *rank* of
the assignment each cell stands for, and each step breaks ties by the smallest rank
(:func:`._viterbi.max_ranked`; k-best lists likewise, :mod:`._structured`), except where the
path makes ranks unnecessary (:func:`outer_first`).  Ranks are int64: the limits below say
how many assignments can be ranked exactly; past them ties fall in the plan's own order.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._cache import cached
from ._parse import Contraction
from ._plan import EMPTY, Step, along_path, outer_first_path

RANKABLE = 1 << 62
"""Assignments of the summed indices beyond which a global row-major rank does not fit an
int64 (with room for sums of partial ranks and the "no rank" mark)."""


def row_major_strides(size: dict[str, int], summed: str) -> dict[str, int]:
    """Each summed index's weight in the row-major rank of an assignment (the global order)."""
    stride: dict[str, int] = {}
    acc = 1
    for c in reversed(summed):
        stride[c] = acc
        acc *= size[c]
    return stride


def rankable(contraction: Contraction, summed: str, limit: int = RANKABLE) -> bool:
    """Whether every assignment of the summed indices has an int64 rank below ``limit``."""
    size = contraction.size
    total = 1
    for c in summed:
        total *= size[c]
        if total >= limit:
            return False
    return True


KBEST_RANKABLE = 1 << 55
"""The same limit for k-best lists, lower: their ranks carry marks above it (below)."""

KBEST_PAD_RANK = 1 << 56
"""A k-best list's rank of "no term" (sums of a few stay far below 2**63)."""

KBEST_NAN_FIRST = 1 << 60
"""Taken off a NaN term's rank while a k-best step chooses: NaN terms come first."""


def sole_summing_step(steps: Sequence[Step], summed: str) -> int | None:
    """The position of the one step of ``steps`` that sums, where it sums every index of
    ``summed`` in that (global) order: its own first maximiser is then the joint rule's,
    and its argmax the whole plan's (the other steps only multiply).  ``None`` otherwise."""
    summing = [k for k, s in enumerate(steps) if s.windows]
    if len(summing) == 1 and "".join(c for c, _ in steps[summing[0]].windows) == summed:
        return summing[0]
    return None


def ties_need_ranks(steps: tuple[Step, ...], contraction: Contraction, summed: str) -> bool:
    """Whether a plan's argmax needs partial ranks to follow the joint tie rule."""
    return any(s.windows for s in steps) and not outer_first(steps, contraction, summed)


@cached(maxsize=1024)
def outer_first(steps: tuple[Step, ...], contraction: Contraction, summed: str) -> bool:
    """Whether each step sums its indices in the global order, all before (in that
    order) every index its operands' earlier steps summed: a plan that sums from the last
    index out (``ab,bc,cd->ad`` summing c, then b; see :func:`._plan.outer_first_path`).

    Then no step needs ranks.  A step's terms differ in its own indices only (its
    operands' cells carry one choice each for the rest), so its first maximiser is
    the joint rule's choice of those indices, the most significant of the cell's; for
    that choice, the maximisers of the rest are the product of the operands' own sets,
    whose first in the global order is each one's first (each operand's own argmax, by
    the same argument one step down).  In a cell whose value is finite, no NaN or +inf
    took part; other cells are redone jointly (see :func:`joint_where_not_finite`).
    """
    for step in steps:
        own = [c for c, _ in step.windows]
        if own != sorted(own, key=summed.index):
            return False
    return outer_first_path(contraction, [s.operands for s in steps], summed)


@cached(maxsize=1024)
def ranks_needed(steps: tuple[Step, ...], operands: int) -> list[bool]:
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


def ranked_steps(steps: tuple[Step, ...], operands: int, summed: str) -> tuple[bool, ...]:
    """For each step of a pairwise plan whose ties need ranks, whether it runs ranked (it
    sums, and some operand carries a rank or its own indices are out of the global order);
    the others run their usual kernel, their result's rank read off their argmax where a
    later step needs it (as :func:`._viterbi.max_ranked` does)."""
    needed = ranks_needed(steps, operands)
    ranked = [False] * len(steps)

    def flow(k: int, step: Step, carried: list[bool]) -> bool:
        own = [c for c, _ in step.windows]
        in_order = own == sorted(own, key=summed.index)
        ranked[k] = bool(own) and step.kernel is not EMPTY and (any(carried) or not in_order)
        return ranked[k] or (needed[k] and (bool(own) or any(carried)))

    along_path(steps, [False] * operands, flow)
    return tuple(ranked)
