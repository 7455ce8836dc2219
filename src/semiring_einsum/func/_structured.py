"""Structured-prediction contractions: k-best lists, entropy and expectations.

Each one is a semiring with element dimensions (:data:`~._semiring.EXPECTATION`,
:func:`~._semiring.kbest_semiring`), usable through
:func:`~._api.semiring_einsum` on stacked operands; the functions here take
plain log-space operands and run faster routes that give the same results:

* the expectation semiring's second component is the directional derivative
  of the log partition function along the value operands, so
  :func:`expectation_einsum` is one forward-mode pass over the log plan
  (:func:`torch.func.jvp`), pairwise, on the log kernels; entropy is the
  expectation of the log factors themselves;
* :func:`kbest_einsum` walks the plan's pairwise steps keeping each cell's
  ``k`` best partial assignments, ordered by value and then by their partial
  row-major rank (so that ties go exactly where a brute-force enumeration puts
  them), with back-pointers; the values are read back from the operands at
  the assignments found, so they are differentiable like :func:`max_einsum`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import opt_einsum
import torch

from . import _kernels as K
from ._api import Optimize, _budget, _Prepared, log_einsum, semiring_einsum
from ._budget import BlockSize, Budget
from ._plan import Step, along_path, window_extents
from ._rules import MAX_FAMILY
from ._semiring import EXPECTATION, MAX_PLUS

Tensor = torch.Tensor


# ------------------------------------------------------------ expectations
def _check_k(k: object, equation: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be a positive int, got {type(k).__name__} (equation {equation!r})")
    if k < 1:
        raise ValueError(f"k must be a positive int, got {k} (equation {equation!r})")
    return k


def _as_tensors(what: str, xs: object, equation: str) -> list[Tensor]:
    if isinstance(xs, Tensor) or not isinstance(xs, Sequence):
        raise TypeError(
            f"{what} must be a sequence of tensors, got {type(xs).__name__} (equation {equation!r})"
        )
    out = list(xs)
    for i, x in enumerate(out):
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{what}[{i}] must be a torch.Tensor, got {type(x).__name__} "
                f"(equation {equation!r})"
            )
    return out


def _expectation(
    equation: str,
    log_operands: Sequence[Tensor],
    values: Sequence[Tensor],
    block_size: BlockSize,
    optimize: Optimize,
) -> tuple[Tensor, Tensor]:
    """``(log Z, E_p[Σ values])`` per output cell; ``values`` already shaped like the operands."""
    # A -inf factor has weight 0 in every term it is part of: its value never
    # counts (and must not turn the tangent into inf * 0).
    tangents = tuple(
        torch.where(x == -math.inf, torch.zeros((), dtype=v.dtype, device=v.device), v)
        for x, v in zip(log_operands, values)
    )
    if torch.compiler.is_compiling():
        # Dynamo refuses forward-mode autograd Functions: the semiring itself.
        stacked = [torch.stack([x, t.to(x.dtype)], dim=-1) for x, t in zip(log_operands, tangents)]
        out = semiring_einsum(
            EXPECTATION, equation, *stacked, block_size=block_size, optimize=optimize
        )
        return out[..., 0], out[..., 1]

    def log_z(*xs: Tensor) -> Tensor:
        return log_einsum(equation, *xs, block_size=block_size, optimize=optimize)

    out, tangent = torch.func.jvp(log_z, tuple(log_operands), tangents)[:2]
    return out, tangent


def expectation_einsum(
    equation: str,
    log_operands: Sequence[Tensor],
    value_operands: Sequence[Tensor],
    *,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> tuple[Tensor, Tensor]:
    """The log partition function and the expected sum of value factors, per output cell.

    Each output cell defines a distribution over the assignments of the summed
    indices, ``p(t) ∝ exp(Σ_k log_operands[k][t])`` (the terms that
    :func:`log_einsum` sums).  The expectation is ``Σ_t p(t) Σ_k
    value_operands[k][t]``: expected counts, expected risk, expected feature
    vectors (one call per feature), the first-order expectation semiring.

    It equals :func:`semiring_einsum` with :data:`EXPECTATION` on the stacked
    pairs ``(log_operands[k], value_operands[k])``, and is computed as the
    directional derivative of the log partition function along the values (one
    forward-mode pass over the log semiring's pairwise plan), so it costs about
    two log contractions.  Both results are differentiable (reverse mode, and
    ``vmap``; under ``torch.compile`` the semiring route runs).

    Args:
        equation: An einsum equation in :func:`torch.einsum` syntax.
        log_operands: The log-space factors.
        value_operands: One value tensor per factor, of the factor's shape (or
            broadcastable to it); a factor without values takes zeros.  A value
            standing where its factor is -inf never counts.
        block_size: A window extent (int), an :class:`AutomaticBlockSize`, or
            ``None`` for the default budget.
        optimize: opt_einsum strategy, explicit path, or ``False``.

    Returns:
        ``(log_z, expectation)``, both of the output's shape.  A cell whose
        terms are all -inf (no distribution) gets ``log_z = -inf`` and an
        expectation of NaN.

    Raises:
        TypeError: If the operands are not sequences of tensors.
        ValueError: If the two sequences differ in length or a value tensor
            does not broadcast to its factor's shape.

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> scores = torch.log(torch.tensor([1.0, 3.0]))   # p = (1/4, 3/4)
        >>> cost = torch.tensor([10.0, 20.0])
        >>> log_z, expected = func.expectation_einsum("i->", [scores], [cost])
        >>> round(log_z.exp().item(), 4), round(expected.item(), 4)
        (4.0, 17.5)
    """
    logs = _as_tensors("log_operands", log_operands, equation)
    vals = _as_tensors("value_operands", value_operands, equation)
    if len(logs) != len(vals):
        raise ValueError(
            f"expectation_einsum needs one value tensor per log operand, got {len(logs)} "
            f"log operand(s) and {len(vals)} value tensor(s) (equation {equation!r})"
        )
    shaped = []
    for i, (x, v) in enumerate(zip(logs, vals)):
        try:
            shaped.append(v.to(x.dtype).expand(x.shape))
        except RuntimeError as e:
            raise ValueError(
                f"value_operands[{i}] of shape {tuple(v.shape)} does not broadcast to its "
                f"factor's shape {tuple(x.shape)} (equation {equation!r})"
            ) from e
    return _expectation(equation, logs, shaped, block_size, optimize)


def entropy_einsum(
    equation: str,
    *log_operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> tuple[Tensor, Tensor]:
    """The log partition function and the Shannon entropy of each output cell's distribution.

    Each output cell defines ``p(t) ∝ exp(Σ_k log_operands[k][t])`` over the
    assignments ``t`` of the summed indices; the entropy is ``-Σ_t p(t) log
    p(t) = log Z - E_p[Σ_k log_operands[k][t]]`` (nats), computed with
    :func:`expectation_einsum` taking the factors as their own values.
    Differentiable, for entropy regularisation.

    Args:
        equation: An einsum equation in :func:`torch.einsum` syntax.
        *log_operands: The log-space factors.
        block_size: A window extent (int), an :class:`AutomaticBlockSize`, or
            ``None`` for the default budget.
        optimize: opt_einsum strategy, explicit path, or ``False``.

    Returns:
        ``(log_z, entropy)``, both of the output's shape; a cell whose terms are
        all -inf gets ``log_z = -inf`` and entropy NaN.

    Example:
        >>> import math, torch
        >>> from semiring_einsum import func
        >>> uniform = torch.zeros(2, 4)               # 8 equally likely terms
        >>> log_z, h = func.entropy_einsum("ij->", uniform)
        >>> round(h.item(), 4) == round(math.log(8), 4)
        True
    """
    for i, x in enumerate(log_operands):
        if not isinstance(x, Tensor):
            raise TypeError(
                f"operand {i} must be a torch.Tensor, got {type(x).__name__} "
                f"(equation {equation!r})"
            )
    log_z, expected = _expectation(equation, log_operands, log_operands, block_size, optimize)
    return log_z, log_z - expected


# ------------------------------------------------------------------- k-best
_PAD_RANK = 1 << 56  # the rank of "no term" (sums of a few stay far below 2**63)
_NAN_FIRST = 1 << 60  # taken off a NaN term's rank while choosing: NaN terms win
_MAX_RANK = 1 << 55  # assignments beyond this many cannot be ranked exactly
_INT_MIN = torch.iinfo(torch.int64).min
_INT_MAX = torch.iinfo(torch.int64).max


def _select(values: Tensor, ranks: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` best candidates along the last dim, best first.

    Order: NaN first, then by value descending, ties by rank ascending (the
    first assignment in row-major order).  ``values.shape[-1] >= k``.
    """
    nan = torch.isnan(values)
    u = values.masked_fill(nan, math.inf)
    key_rank = torch.where(nan, ranks - _NAN_FIRST, ranks)
    kth = u.topk(k, dim=-1).values[..., -1:]
    # Everything above the k-th value is in; among the ties at it, the smallest ranks.
    key = torch.where(u > kth, _INT_MIN, torch.where(u == kth, key_rank, _INT_MAX))
    chosen = key.topk(k, dim=-1, largest=False).indices
    by_rank = key_rank.gather(-1, chosen).argsort(dim=-1, stable=True)
    chosen = chosen.gather(-1, by_rank)
    by_value = u.gather(-1, chosen).argsort(dim=-1, descending=True, stable=True)
    chosen = chosen.gather(-1, by_value)
    return values.gather(-1, chosen), ranks.gather(-1, chosen), ids.gather(-1, chosen)


@dataclass(frozen=True)
class _KStep:
    """A k-best step: the plan's step with a slot index for each list operand."""

    step: Step  # inputs/output extended with the slot symbols
    lists: tuple[int, ...]  # positions (in the step's operands) of the k-lists
    slots: int  # candidates per assignment of the step's summed indices: k ** len(lists)
    strides: tuple[int, ...]  # global row-major stride of each summed index of the step


def _slot_symbol(i: int) -> str:
    return opt_einsum.get_symbol(3000 + i)


def _kstep(
    step: Step,
    lists: tuple[bool, ...],
    k: int,
    strides: tuple[int, ...],
    budget: Budget,
    itemsize: int,
    device_type: str,
) -> _KStep:
    inputs = list(step.inputs)
    extra = ""
    positions = []
    for i, is_list in enumerate(lists):
        if is_list:
            s = _slot_symbol(len(extra))
            inputs[i] += s
            extra += s
            positions.append(i)
    output = step.output + extra
    sizes = step.sizes + tuple((s, k) for s in extra)
    # Candidates carry a value, a rank and an id: size the windows for all three.
    windows = window_extents(tuple(inputs), output, sizes, budget, itemsize + 16, device_type)
    kstep = Step(step.operands, tuple(inputs), output, sizes, windows)
    return _KStep(kstep, tuple(positions), k ** len(extra), strides)


@dataclass
class _Item:
    """An operand of a step: a clean input, or an earlier step's k-best lists."""

    values: Tensor
    ranks: Tensor | None = None  # None: an input (rank 0, one candidate)
    made_by: int | None = None  # the step that made it


def _kbest_step(ks: _KStep, items: list[_Item], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Values, partial ranks and candidate ids of the ``k`` best terms of each output cell."""
    step = ks.step
    size = step.size
    device = items[0].values.device
    values_aligned = K.align(step, [it.values for it in items])
    rank_terms = [(t, it.ranks) for t, it in zip(step.inputs, items) if it.ranks is not None]
    rank_step = Step(
        step.operands, tuple(t for t, _ in rank_terms), step.output, step.sizes, step.windows
    )
    ranks_aligned = K.align(rank_step, [r for _, r in rank_terms]) if rank_terms else []
    nw = len(step.windows)
    out_dims = [size[c] for c in step.output]
    n_out = len(out_dims) - len(ks.lists)  # the step's real output dims; slots follow
    cells = out_dims[:n_out]
    # A candidate's id within the step: the row-major position of its summed
    # coordinates times the slot count, plus its slot (row-major over the lists).
    local: list[int] = []
    acc = ks.slots
    for c, _ in reversed(step.windows):
        local.append(acc)
        acc *= size[c]
    local.reverse()
    slot_id = torch.zeros((), dtype=torch.int64, device=device)
    full = nw + len(out_dims)
    acc = 1
    for j in reversed(range(len(ks.lists))):
        shape = [1] * full
        shape[full - len(ks.lists) + j] = k
        slot_id = slot_id + torch.arange(k, device=device).reshape(shape) * acc
        acc *= k
    dtype = values_aligned[0].dtype
    best_v = torch.full(cells + [k], -math.inf, dtype=dtype, device=device)
    best_r = torch.full(cells + [k], _PAD_RANK, dtype=torch.int64, device=device)
    best_i = torch.full(cells + [k], -1, dtype=torch.int64, device=device)
    # window dims first in the candidates' layout, then the cells, then the slots:
    # move the window dims after the cells so each cell's candidates are contiguous.
    perm = list(range(nw, nw + n_out)) + list(range(nw)) + list(range(nw + n_out, full))
    for rng in step.ranges():
        views = K.narrow(step, values_aligned, rng)
        cand = functools.reduce(torch.add, views)
        rank = slot_id.new_zeros(())
        idx = slot_id
        for d, ((lo, hi), stride, loc) in enumerate(zip(rng, ks.strides, local)):
            shape = [1] * full
            shape[d] = hi - lo
            coord = torch.arange(lo, hi, device=device).reshape(shape)
            rank = rank + coord * stride
            idx = idx + coord * loc
        for r in K.narrow(rank_step, ranks_aligned, rng):
            rank = rank + r
        shape = [hi - lo for lo, hi in rng] + out_dims
        cand = cand.expand(shape).permute(perm).reshape(cells + [-1])
        rank = rank.expand(shape).permute(perm).reshape(cells + [-1])
        idx = idx.expand(shape).permute(perm).reshape(cells + [-1])
        best_v, best_r, best_i = _select(
            torch.cat([best_v, cand], dim=-1),
            torch.cat([best_r, rank], dim=-1),
            torch.cat([best_i, idx], dim=-1),
            k,
        )
    return best_v, best_r, best_i


def kbest_einsum(
    equation: str,
    *operands: Tensor,
    k: int,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> tuple[Tensor, Tensor]:
    """The ``k`` best terms of a max-plus einsum and the assignments that reach them.

    For each output cell, the terms (sums of the operands' entries over every
    assignment of the summed indices) are ordered by value, descending, ties
    going to the first assignment in row-major order of the summed indices --
    exactly :func:`viterbi_einsum`'s rule, whose result is the ``k = 1`` case --
    and the first ``k`` are returned.  A term of value -inf is no term: slots
    beyond the last term above -inf hold -inf with an assignment of zeros (as
    Viterbi's all -inf cells do).  A NaN term comes first.

    It runs on the pairwise plan (no joint tensor): each intermediate keeps the
    ``k`` best partial assignments of each of its cells with their partial
    row-major rank, so the order, ties included, is the brute-force one, and
    windows keep memory bounded.  The values are read back from the operands at
    the assignments found, so they are differentiable like
    :func:`max_einsum`'s: each of the ``k`` values passes its gradient to the
    entries of its own term.

    Args:
        equation: An einsum equation in :func:`torch.einsum` syntax.
        *operands: Score (log-space) tensors.
        k: How many terms per cell, a positive int (keyword-only).
        block_size: A window extent (int), an :class:`AutomaticBlockSize`, or
            ``None`` for the default budget.
        optimize: opt_einsum strategy, explicit path, or ``False``.

    Returns:
        ``(values, argmax)``: ``values`` of shape ``output + (k,)``;
        ``argmax`` int64 of shape ``output + (k, n_summed)``, each row one
        assignment of the summed indices in :func:`viterbi_einsum`'s order.

    Raises:
        TypeError / ValueError: For a ``k`` that is not a positive int, or bad
            operands (as :func:`max_einsum`).

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> scores = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
        >>> values, argmax = func.kbest_einsum("ij->", scores, k=3)
        >>> values
        tensor([5., 5., 3.])
        >>> argmax.tolist()                  # (i, j) of each; the tie in row-major order
        [[0, 1], [1, 1], [1, 0]]
    """
    k = _check_k(k, equation)
    budget = _budget(block_size, operands, equation)
    p = _Prepared(MAX_PLUS, MAX_FAMILY, equation, operands, budget, optimize)
    size = p.contraction.size
    summed = p.equation.summed
    if math.prod(size[c] for c in summed) >= _MAX_RANK:
        raise ValueError(
            f"kbest_einsum ranks every assignment of the summed indices exactly; "
            f"{math.prod(size[c] for c in summed)} assignments are too many (equation {equation!r})"
        )
    stride: dict[str, int] = {}
    acc = 1
    for c in reversed(summed):
        stride[c] = acc
        acc *= size[c]
    itemsize = p.compute_dtype.itemsize
    device_type = p.operands[0].device.type if p.operands else "cpu"
    steps = p.plan.steps
    kept: list[tuple[_KStep, Tensor]] = []  # per step, its candidate ids

    def run_step(i: int, step: Step, items: list[_Item]) -> _Item:
        lists = tuple(it.ranks is not None for it in items)
        strides = tuple(stride[c] for c, _ in step.windows)
        ks = _kstep(step, lists, k, strides, budget, itemsize, device_type)
        v, r, ids = _kbest_step(ks, items, k)
        kept.append((ks, ids))
        return _Item(v, r, i)

    with torch.no_grad():
        detached = [_Item(x.detach()) for x in p.operands]
        last = along_path(steps, detached, run_step)
    # Back-pointers: walk the steps backwards, every particle (cell, slot)
    # knowing the indices of the step's result and which of its k lists it is.
    out = p.contraction.output
    cells = [size[c] for c in out]
    device = last.values.device
    particles = cells + [k]
    known: dict[str, Tensor] = {}
    for d, c in enumerate(out):
        view = [1] * (len(out) + 1)
        view[d] = size[c]
        known[c] = torch.arange(size[c], device=device).reshape(view).expand(particles)
    slot: dict[int, Tensor] = {len(steps) - 1: torch.arange(k, device=device).expand(particles)}
    valid = last.values > -math.inf
    valid = valid | torch.isnan(last.values)
    # Which step made each operand of each step.
    makers: list[list[int | None]] = []

    def record(i: int, step: Step, made: list[int | None]) -> int:
        makers.append(made)
        return i

    along_path(steps, [None] * len(p.operands), record)
    for i in reversed(range(len(steps))):
        ks, ids = kept[i]
        step = steps[i]
        at = tuple(known[c] for c in step.output) + (slot[i],)
        cid = ids[at]
        valid = valid & (cid >= 0)
        cid = cid.clamp_min(0)
        own, slots = cid // ks.slots, cid % ks.slots
        for c, _ in reversed(step.windows):
            known[c] = own % size[c]
            own = own // size[c]
        for j in reversed(ks.lists):
            maker = makers[i][j]
            assert maker is not None
            slot[maker] = slots % k
            slots = slots // k
    if summed:
        argmax = torch.stack([torch.where(valid, known[c], 0) for c in summed], dim=-1)
    else:
        argmax = torch.zeros(particles + [0], dtype=torch.int64, device=device)
    # The values, differentiably: each term read back from the operands.
    terms = [
        x[tuple(torch.where(valid, known[c], 0) for c in t)]
        for t, x in zip(p.contraction.inputs, p.operands)
    ]
    total = functools.reduce(torch.add, terms) if terms else torch.zeros(particles, device=device)
    values = torch.where(valid, total, -math.inf)
    return p.finish(values), argmax
