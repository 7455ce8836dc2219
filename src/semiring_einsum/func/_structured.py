"""Structured-prediction contractions: k-best lists, entropy and expectations.

Each one is a semiring with element dimensions (:data:`~._semiring.EXPECTATION`,
:func:`~._semiring.kbest_semiring`), usable through
:func:`~._api.semiring_einsum` on stacked operands; the functions here take
plain log-space operands and run faster routes that give the same results:

* the expectation semiring's second component is the directional derivative
  of the log partition function along the value operands, so
  :func:`expectation_einsum` walks the log plan once, each step pushing the
  tangent through with its own jvp rule (out of place, so differentiable);
  entropy is the expectation of the log factors themselves;
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
from dataclasses import dataclass, replace

import opt_einsum
import torch

from . import _kernels as K
from . import _logblas as LB
from . import _native as N
from ._autograd import apply
from ._budget import BlockSize, Budget, budget_of
from ._compile import in_graph
from ._context import call_context
from ._distributed import refuse as refuse_dtensors
from ._multi import reject
from ._parse import check_operands
from ._plan import Step, along_path, window_extents
from ._prepare import Optimize, Prepared, budget_for, selecting_family
from ._results import EntropyResult, ExpectationResult, KBestResult
from ._rules import LOG_BLAS, LOG_FAMILY, LOG_RULE, LOG_UNSUMMED, MAX_FAMILY, run_jvp
from ._semiring import LOG, MAX_PLUS, Semiring
from ._ties import KBEST_NAN_FIRST, KBEST_PAD_RANK, KBEST_RANKABLE, rankable, row_major_strides

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
    """``(log Z, E_p[Σ values])`` per output cell; ``values`` already shaped like the operands.

    The expectation is the derivative of ``log Z`` along the values: each step of
    the log plan runs forward (its differentiable rule) and pushes the tangent
    through with the rule's own jvp (BLAS where the step allows), all out of
    place, so the result is differentiable in every mode, under ``vmap`` and
    under the compiler.  (Not :func:`torch.func.jvp`: that would open a
    forward-mode level, so that forward mode over it would be forward over
    forward, and it costs a wrapper per step.)
    """
    extent, nbytes = budget_for(block_size, log_operands, equation).as_ints()
    n = len(log_operands)
    entropy = values is log_operands  # the factors are their own values
    tensors = log_operands if entropy else (*log_operands, *values)
    out = _expectation_node(equation, extent, nbytes, optimize, n, *tensors)
    return out[0], out[1]


@in_graph
def _expectation_node(
    equation: str, extent: int, nbytes: int, optimize: Optimize, n: int, *tensors: Tensor
) -> tuple[Tensor, Tensor]:
    """The expectation's one node under ``torch.compile`` (see :mod:`._compile`); with only
    the ``n`` log operands, they are their own values (the entropy's expectation)."""
    log_operands = tensors[:n]
    budget = budget_of(extent, nbytes)
    ctx = call_context(log_operands)
    p = Prepared(LOG, LOG_FAMILY, equation, log_operands, budget, optimize, traced=ctx.traced)
    # A -inf factor has weight 0 in every term it is part of: its value never
    # counts (and must not turn the tangent into inf * 0).
    if len(tensors) == n:
        tangents = [torch.nan_to_num(x, nan=math.nan, neginf=0.0) for x in p.operands]
    else:
        # (Finite values need no mask: a weight of exactly 0 times a finite value is 0.
        # One sum tells: inf or NaN anywhere makes it non-finite; so may an overflow.)
        tangents = [
            t
            if ctx.plain and math.isfinite(float(t.detach().sum()))
            else torch.where(x == -math.inf, torch.zeros((), dtype=t.dtype, device=t.device), t)
            for x, t in zip(p.operands, p.canonical(tensors[n:]))
        ]

    # Plain values with no derivative to record: BLAS steps share their exponentials.
    fused = ctx.plain and not ctx.derivative and not any(t.requires_grad for t in tangents)

    last = p.plan.steps[-1]

    def step(k: int, s: Step, pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        xs = [x for x, _ in pairs]
        if s.kernel is LOG_UNSUMMED:  # one term per cell: the sums themselves
            out = K.add_only(s, xs)
            # A -inf cell has no weight: no expectation at the end (NaN), none passed on.
            empty = math.nan if s is last else 0.0
            sums = K.add_only(s, [t for _, t in pairs])
            return out, torch.where(out == -math.inf, empty, sums)
        if fused and s.kernel is LOG_BLAS:
            both = _log_blas_with_tangent(s, xs[0], xs[1], pairs[0][1], pairs[1][1])
            if both is not None:
                return both
        spec = p.spec(s)
        out = apply(LOG_RULE, spec, ctx, *xs)[0]
        pushed = run_jvp(LOG_RULE, spec, xs, [out], [t for _, t in pairs])[0]
        assert pushed is not None
        return out, pushed

    out, tangent = along_path(p.plan.steps, list(zip(p.operands, tangents)), step)
    return p.finish(out), p.finish(tangent)


def _log_blas_with_tangent(
    step: Step, a: Tensor, b: Tensor, ta: Tensor, tb: Tensor
) -> tuple[Tensor, Tensor] | None:
    """A log-BLAS step's output and tangent from one set of shifted exponentials.

    ``out = log(ea · eb) + mA + mB`` and ``tangent = ((ea ∘ ta) · eb + ea · (eb ∘ tb)) /
    (ea · eb)`` with ``ea = exp(A - mA)``: the rule's forward and jvp without computing
    the exponentials twice.  ``None`` (the caller runs the rule) unless every cell passes
    the forward's certificate.
    """
    prog = LB.program(step)
    if prog is None or prog.perm_a is not None or prog.perm_b is not None:
        return None
    ma = a.amax(prog.dims_a, keepdim=True)
    mb = b.amax(prog.dims_b, keepdim=True)
    if not math.isfinite(float(ma.sum() + mb.sum())):  # (an overflow: the rule runs)
        return None
    ea, eb = torch.exp(a - ma), torch.exp(b - mb)
    product = prog.product(ea, eb)
    log_sum = torch.log(product)
    if LB.risky(log_sum) is not None:
        return None
    out = log_sum + (ma if prog.view_a is None else LB.lined_up(ma, prog.view_a))
    out = out + (mb if prog.view_b is None else LB.lined_up(mb, prog.view_b))
    tangent = (prog.product(ea * ta, eb) + prog.product(ea, eb * tb)) / product
    return out, tangent


def expectation_einsum(
    equation: str,
    log_operands: Sequence[Tensor],
    value_operands: Sequence[Tensor],
    *,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> ExpectationResult:
    """The log partition function and the expected sum of value factors, per output cell.

    Each output cell defines a distribution over the assignments of the summed
    indices, ``p(t) ∝ exp(Σ_k log_operands[k][t])`` (the terms that
    :func:`log_einsum` sums).  The expectation is ``Σ_t p(t) Σ_k
    value_operands[k][t]``: expected counts, expected risk, expected feature
    vectors (one call per feature), the first-order expectation semiring.

    It equals :func:`semiring_einsum` with :data:`EXPECTATION` on the stacked
    pairs ``(log_operands[k], value_operands[k])``, and is computed as the
    directional derivative of the log partition function along the values: each
    step of the log semiring's pairwise plan runs forward and pushes the
    tangent through (BLAS where the step allows), about two log contractions.
    Both results are differentiable in every mode (reverse, forward, ``vmap``,
    ``torch.compile``).

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
        An :class:`ExpectationResult` ``(log_z, expectation)`` (a named
        tuple), both of the output's shape.  A cell whose
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
    refuse_dtensors([*log_operands, *value_operands], "expectation_einsum")
    reject(equation, "expectation_einsum")
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
    return ExpectationResult(*_expectation(equation, logs, shaped, block_size, optimize))


def entropy_einsum(
    equation: str,
    *log_operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> EntropyResult:
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
        An :class:`EntropyResult` ``(log_z, entropy)`` (a named tuple), both
        of the output's shape; a cell whose terms are
        all -inf gets ``log_z = -inf`` and entropy NaN.

    Example:
        >>> import math, torch
        >>> from semiring_einsum import func
        >>> uniform = torch.zeros(2, 4)               # 8 equally likely terms
        >>> log_z, h = func.entropy_einsum("ij->", uniform)
        >>> round(h.item(), 4) == round(math.log(8), 4)
        True
    """
    refuse_dtensors(log_operands, "entropy_einsum")
    reject(equation, "entropy_einsum")
    for i, x in enumerate(log_operands):
        if not isinstance(x, Tensor):
            raise TypeError(
                f"operand {i} must be a torch.Tensor, got {type(x).__name__} "
                f"(equation {equation!r})"
            )
    log_z, expected = _expectation(equation, log_operands, log_operands, block_size, optimize)
    return EntropyResult(log_z, log_z - expected)


# ------------------------------------------------------------------- k-best
_INT_MIN = torch.iinfo(torch.int64).min
_INT_MAX = torch.iinfo(torch.int64).max


def _slot(n: int) -> str:
    """The symbol of the ``n``-th k-best list's slot dim (past every index symbol)."""
    return opt_einsum.get_symbol(3000 + n)


def _order(values: Tensor, key_rank: Tensor) -> Tensor:
    """The permutation of the last dim sorting by value descending, then ``key_rank`` ascending."""
    by_rank = key_rank.argsort(dim=-1, stable=True)
    by_value = values.gather(-1, by_rank).argsort(dim=-1, descending=True, stable=True)
    return by_rank.gather(-1, by_value)


def _select(values: Tensor, ranks: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` best candidates along the last dim, best first.

    Order: NaN first, then by value descending, ties by rank ascending (the
    first assignment in row-major order).  ``values.shape[-1] >= k``.
    """
    nan = torch.isnan(values)
    u = values.masked_fill(nan, math.inf)
    key_rank = torch.where(nan, ranks - KBEST_NAN_FIRST, ranks)
    kth = u.topk(k, dim=-1).values[..., -1:]
    # Everything above the k-th value is in; among the ties at it, the smallest ranks.
    key = torch.where(u > kth, _INT_MIN, torch.where(u == kth, key_rank, _INT_MAX))
    chosen = key.topk(k, dim=-1, largest=False).indices
    return chosen.gather(-1, _order(u.gather(-1, chosen), key_rank.gather(-1, chosen)))


@dataclass(frozen=True)
class _KStep:
    """A k-best step: the plan's step, its windows, and its candidates' layout.

    A window's candidates are laid out ``cells + window dims + slots`` (one slot
    dim of size ``k`` per operand that is an earlier step's k-best list), and
    flattened after the cells, so that a position there names a window
    coordinate for each summed index and a slot for each list.
    """

    step: Step
    windows: tuple[tuple[str, int], ...]  # the summed indices' windows, sized for candidates
    lists: tuple[int, ...]  # positions (in the step's operands) of the k-lists
    strides: tuple[int, ...]  # global row-major stride of each summed index of the step
    k: int

    @property
    def slots(self) -> int:
        """Candidates per assignment of the summed indices: ``k`` per list."""
        return self.k ** len(self.lists)


def _kstep(
    step: Step,
    lists: tuple[bool, ...],
    k: int,
    strides: tuple[int, ...],
    budget: Budget,
    itemsize: int,
    device_type: str,
) -> _KStep:
    # A candidate carries a value, and while it is chosen a rank and a key (int64):
    # size the windows for all of them, k slots per list.
    slots = k ** sum(lists)
    sizes = step.sizes + (("#", slots),)
    windows = window_extents(
        step.inputs, step.output + "#", sizes, budget, itemsize + 16, device_type
    )
    positions = tuple(i for i, is_list in enumerate(lists) if is_list)
    return _KStep(step, windows, positions, strides, k)


@dataclass
class _Item:
    """An operand of a step: a clean input, or an earlier step's k-best lists."""

    values: Tensor
    ranks: Tensor | None = None  # None: an input (rank 0, one candidate)


def _kbest_step(
    ks: _KStep, items: list[_Item], k: int, fast: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Values, partial ranks and candidate ids of the ``k`` best terms of each output cell.

    A candidate's id within the step is the row-major position of its summed
    coordinates (full extents) times ``k ** lists``, plus its slot number
    (row-major over the lists).  With ``fast`` (values may be read), a window
    whose k-th best value is not tied is chosen by value alone and only the
    chosen candidates' ranks are worked out.
    """
    step = ks.step
    if not step.windows and len(ks.lists) <= 1:
        shortcut = _kbest_unsummed(ks, items, k, fast)
        if shortcut is not None:
            return shortcut
    if fast and len(items) == 2:
        xs, ranks = [it.values for it in items], [it.ranks for it in items]
        native = N.kbest(step, xs, ranks, k, ks.strides, KBEST_PAD_RANK)
        if native is not None:
            return native
    size = step.size
    device = items[0].values.device
    cells_ix = step.output
    summed = step.summed
    # The candidates' layout: cells, summed indices, then one slot symbol per list.
    slot_of = {j: _slot(n) for n, j in enumerate(ks.lists)}
    order = cells_ix + summed + "".join(slot_of.values())
    values = [
        K.laid_out(it.values, t + slot_of.get(j, ""), order)
        for j, (t, it) in enumerate(zip(step.inputs, items))
    ]
    nl = len(ks.lists)
    nc = len(cells_ix)
    cells = [size[c] for c in cells_ix]
    ncells = math.prod(cells)
    nslots = ks.slots
    full_ext = [size[c] for c in summed]
    local = []  # row-major strides of the summed indices (full extents), times the slots
    acc = nslots
    for n in reversed(full_ext):
        local.append(acc)
        acc *= n
    local.reverse()
    # Coordinates of every cell, to look list ranks up: (cells..., 1) broadcastable.
    cell_coords = [
        torch.arange(n, device=device).reshape([n if i == d else 1 for i in range(nc)] + [1])
        for d, n in enumerate(cells)
    ]

    def ranks_and_ids(pos: Tensor, rng: tuple[tuple[int, int], ...]) -> tuple[Tensor, Tensor]:
        """Rank and id of the candidates at ``pos`` (cells + [m]) of window ``rng``."""
        slot = pos % nslots
        rest = pos // nslots
        coords: dict[str, Tensor] = {}
        for c, (lo, hi) in reversed(list(zip(summed, rng))):
            coords[c] = rest % (hi - lo) + lo
            rest = rest // (hi - lo)
        rank = torch.zeros_like(pos)
        ids = slot
        for c, stride, loc in zip(summed, ks.strides, local):
            rank = rank + coords[c] * stride
            ids = ids + coords[c] * loc
        for j in reversed(ks.lists):
            r = items[j].ranks
            assert r is not None
            sj = slot % k
            slot = slot // k
            where = tuple(
                cell_coords[cells_ix.index(c)] if c in cells_ix else coords[c]
                for c in step.inputs[j]
            )
            rank = rank + r[where + (sj,)]
        return rank, ids

    best: tuple[Tensor, Tensor, Tensor] | None = None
    for rng in replace(step, windows=ks.windows).ranges():
        views = []
        for x in values:
            for d, (lo, hi) in enumerate(rng):
                if x.shape[nc + d] != 1:
                    x = x.narrow(nc + d, lo, hi - lo)
            views.append(x)
        cand = functools.reduce(torch.add, views)
        shape = cells + [hi - lo for lo, hi in rng] + [k] * nl
        cand = cand.expand(shape).reshape(ncells and cells + [-1])
        if cand.shape[-1] < k and best is None:
            pad = cand.new_full(cells + [k - cand.shape[-1]], -math.inf)
            cand = torch.cat([cand, pad], dim=-1)
        v = cand if best is None else torch.cat([best[0], cand], dim=-1)
        kept = 0 if best is None else k
        m = cand.shape[-1]
        chosen: Tensor | None = None
        if fast and ncells:
            top = v.topk(k, dim=-1)
            kth = top.values[..., -1:]
            # Above the k-th value, or tied with it: exactly k unless ties straddle it.
            if not bool(torch.isnan(kth).any()) and int((v >= kth).sum(-1).max()) == k:
                chosen = top.indices
        if chosen is None:  # every candidate's rank, then the exact choice
            pos = torch.arange(m, device=device).expand(cells + [m])
            r, i = ranks_and_ids(pos, rng)
            r = torch.where(pos >= math.prod(shape[nc:]), KBEST_PAD_RANK, r)
            if best is not None:
                r, i = torch.cat([best[1], r], -1), torch.cat([best[2], i], -1)
            chosen = _select(v, r, k)
            best = (v.gather(-1, chosen), r.gather(-1, chosen), i.gather(-1, chosen))
            continue
        fresh = chosen - kept
        real = fresh.clamp(0, math.prod(shape[nc:]) - 1)
        r, i = ranks_and_ids(real, rng)
        r = torch.where(fresh >= math.prod(shape[nc:]), KBEST_PAD_RANK, r)
        if best is not None:
            old = chosen.clamp(max=k - 1)
            r = torch.where(fresh < 0, best[1].gather(-1, old), r)
            i = torch.where(fresh < 0, best[2].gather(-1, old), i)
        vals = v.gather(-1, chosen)
        order_k = _order(vals, r)
        best = (vals.gather(-1, order_k), r.gather(-1, order_k), i.gather(-1, order_k))
    if best is None:  # no window at all: a summed index of size 0
        return (
            torch.full(cells + [k], -math.inf, device=device, dtype=values[0].dtype),
            torch.full(cells + [k], KBEST_PAD_RANK, device=device, dtype=torch.int64),
            torch.full(cells + [k], -1, device=device, dtype=torch.int64),
        )
    v, r, i = best
    return v, r, torch.where(r >= KBEST_PAD_RANK, -1, i)


def _kbest_unsummed(
    ks: _KStep, items: list[_Item], k: int, fast: bool
) -> tuple[Tensor, Tensor, Tensor] | None:
    """A step that sums nothing over at most one k-best list: no choice to make.

    Each cell has one candidate per slot of the list (one in all without a list):
    the list plus the other operands' entries, in the list's order -- adding the
    same finite amount to every slot keeps it.  ``None`` where that could fail
    (a non-finite entry added, whose value is not checked without ``fast``).
    """
    step = ks.step
    size = step.size
    cells = [size[c] for c in step.output]
    plain = [(t, it.values) for t, it in zip(step.inputs, items) if it.ranks is None]
    added = None
    for t, x in plain:
        y = K.laid_out(x, t, step.output)
        added = y if added is None else added + y
    if ks.lists:
        if added is not None:
            if not fast or not bool((torch.isfinite(added) | (added == -math.inf)).all()):
                return None
        (j,) = ks.lists
        lst = items[j]
        assert lst.ranks is not None
        term, order = step.inputs[j] + _slot(0), step.output + _slot(0)
        values = K.laid_out(lst.values, term, order)
        ranks = K.laid_out(lst.ranks, term, order)
        if added is not None:
            values = values + added.unsqueeze(-1)
        ids = torch.arange(k, device=values.device)
        return (
            values.expand(cells + [k]).contiguous(),
            ranks.expand(cells + [k]).contiguous(),
            ids.expand(cells + [k]).contiguous(),
        )
    assert added is not None
    first = added.expand(cells).unsqueeze(-1)
    pad = first.new_full(cells + [k - 1], -math.inf)
    values = torch.cat([first, pad], dim=-1)
    ranks = torch.full(cells + [k], KBEST_PAD_RANK, dtype=torch.int64, device=values.device)
    ranks[..., 0] = 0
    ids = torch.full(cells + [k], -1, dtype=torch.int64, device=values.device)
    ids[..., 0] = 0
    return values, ranks, ids


def kbest_einsum(
    equation: str,
    *operands: Tensor,
    k: int,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
    semiring: Semiring = MAX_PLUS,
) -> KBestResult:
    """The ``k`` best terms of a max-plus einsum and the assignments that reach them.

    With ``semiring=MIN_PLUS``, the ``k`` smallest terms (the ``k`` shortest paths),
    ascending, by the same tie rule; empty slots then hold +inf.

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
        semiring: :data:`MAX_PLUS` (default) or :data:`MIN_PLUS`.

    Returns:
        A :class:`KBestResult` ``(values, argmax)`` (a named tuple):
        ``values`` of shape ``output + (k,)``;
        ``argmax`` int64 of shape ``output + (k, n_summed)``, each row one
        assignment of the summed indices in :func:`viterbi_einsum`'s order.

    The row-major rank of an assignment is an int64: with ``2**55`` or more
    assignments of the summed indices (a chain of 18 steps over 8 states, say),
    ties among equal values come in the plan's own order instead; the values, and
    that each row is an assignment reaching its value, are unchanged.

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
    refuse_dtensors(operands, "kbest_einsum")
    reject(equation, "kbest_einsum")
    k = _check_k(k, equation)
    family = selecting_family(semiring, "kbest_einsum", equation)
    extent, nbytes = budget_for(block_size, operands, equation).as_ints()
    if family.negate:  # the k smallest of x: the k largest of -x
        check_operands(equation, operands)  # (before touching them)
        operands = tuple(-x for x in operands)
    values, argmax = _kbest_node(equation, k, extent, nbytes, optimize, *operands)
    return KBestResult(-values if family.negate else values, argmax)


@in_graph
def _kbest_node(
    equation: str, k: int, extent: int, nbytes: int, optimize: Optimize, *operands: Tensor
) -> tuple[Tensor, Tensor]:
    """The k-best contraction as one node under ``torch.compile`` (see :mod:`._compile`)."""
    budget = budget_of(extent, nbytes)
    ctx = call_context(operands)
    p = Prepared(MAX_PLUS, MAX_FAMILY, equation, operands, budget, optimize, traced=ctx.traced)
    size = p.contraction.size
    summed = p.equation.summed
    # Ranks order ties; past int64 (with room for the marks) every rank is 0, and ties
    # fall in the plan's own order (the lists are still k best, of real assignments).
    ranked = rankable(p.contraction, summed, KBEST_RANKABLE)
    stride = row_major_strides(size, summed)
    if not ranked:
        stride = dict.fromkeys(stride, 0)
    itemsize = p.compute_dtype.itemsize
    device_type = p.operands[0].device.type if p.operands else "cpu"
    steps = p.plan.steps
    kept: list[tuple[_KStep, Tensor]] = []  # per step, its candidate ids

    def run_step(i: int, step: Step, items: list[_Item]) -> _Item:
        lists = tuple(it.ranks is not None for it in items)
        strides = tuple(stride[c] for c, _ in step.windows)
        ks = _kstep(step, lists, k, strides, budget, itemsize, device_type)
        v, r, ids = _kbest_step(ks, items, k, fast)
        kept.append((ks, ids))
        return _Item(v, r)

    fast = ctx.plain  # values may be read: choose by value first
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
        if i == len(steps) - 1 and step.output == out:  # laid out as the particles are
            cid = ids
        elif fast:  # a flat position and ``take`` (no vmap rule, and faster than indexing)
            cell: Tensor | int = 0
            for c in step.output:
                cell = cell * size[c] + known[c]
            cid = ids.reshape(-1).take(cell * k + slot[i])
        else:
            cid = ids[tuple(known[c] for c in step.output) + (slot[i],)]
        valid = valid & (cid >= 0)
        cid = cid.clamp_min(0)
        # Unravel the id (integer division is slow: only what is needed).
        own: Tensor | None = None
        slots: Tensor | None = None
        if ks.slots == 1:  # (k = 1, or no list): every slot is 0
            own = cid
            slots = torch.zeros_like(cid) if ks.lists else None
        else:
            slots = cid % ks.slots
        if step.windows and own is None:
            own = cid // ks.slots
        for n, (c, _) in enumerate(reversed(step.windows)):
            assert own is not None
            first = n == len(step.windows) - 1  # the most significant: nothing left over
            known[c] = own if first else own % size[c]
            if not first:
                own = own // size[c]
        for n, j in enumerate(reversed(ks.lists)):
            maker = makers[i][j]
            assert maker is not None and slots is not None
            first = n == len(ks.lists) - 1
            slot[maker] = slots if first else slots % k
            if not first:
                slots = slots // k
    found = {c: torch.where(valid, known[c], 0) for c in summed}
    found.update((c, known[c]) for c in out)
    if summed:
        argmax = torch.stack([found[c] for c in summed], dim=-1)
    else:
        argmax = torch.zeros(particles + [0], dtype=torch.int64, device=device)
    # The values, differentiably: each term read back from the operands (``take`` at
    # flat positions: faster than indexing with one tensor per dim; ``take`` has no
    # vmap rule, so a vmapped call indexes).
    terms = []
    for t, x in zip(p.contraction.inputs, p.operands):
        if not fast:
            terms.append(x[tuple(found[c] for c in t)])
            continue
        flat: Tensor | int = 0
        for c in t:
            flat = flat * size[c] + found[c]
        terms.append(x.reshape(-1).take(flat) if isinstance(flat, Tensor) else x.expand(particles))
    total = functools.reduce(torch.add, terms) if terms else torch.zeros(particles, device=device)
    values = torch.where(valid, total, -math.inf)
    return p.finish(values), argmax
