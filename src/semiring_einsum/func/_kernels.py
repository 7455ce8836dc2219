"""Execute stage: the blocked loop over windows of the summed indices.

Every kernel works on one :class:`~._plan.Step`.  Operands are *aligned* first:
permuted to ``step.summed + step.output`` order with size-1 dimensions for the
indices they lack (views, no copies).  A window narrows each aligned operand
along the summed indices it has; the ⊗-product of the narrowed operands is the
window tensor (window dims first, output dims last) and is ⊕-reduced over its
leading dims.  Reducing leading dims combines whole contiguous slabs
elementwise, which vectorizes far better than reducing an innermost dim, and
output-shaped tensors broadcast against a window without any reshaping.  The
windowed loops (:func:`windows`) never branch on tensor values, so vmap,
autograd and the compiler see ordinary torch operations; the row and slice
kernels read values (a NaN check) and run as opaque operators (:mod:`._ops`).

Kernels never look at torch's state: what they may do (work in place, read
values) comes in as arguments, from the call's context (:mod:`._context`).
Kernels called from ``autograd.Function.forward`` (which autograd never
records) may work in place on window tensors they created; the others are
out of place so that autograd can differentiate them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import product

import torch

from ._cache import cached
from ._context import untraced
from ._plan import Step
from ._semiring import Identity, Semiring

Tensor = torch.Tensor
Range = tuple[tuple[int, int], ...]


def einsum_letters(inputs: Sequence[str], output: str, *xs: Tensor) -> Tensor:
    """:func:`torch.einsum` over index strings of any symbols, on the cheapest call.

    Our index symbols go beyond ``[a-zA-Z]`` (``...`` dimensions), which the
    string form of torch.einsum rejects, so they are renamed.  Two operands in
    a matrix-product layout go straight to :func:`torch.matmul`, skipping
    einsum's own parsing and permutes (each torch call costs microseconds, more
    when the caches are cold).
    """
    return einsum_product(tuple(inputs), output)(*xs)


LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""The index letters of torch.einsum's string form."""


@cached(maxsize=4096)
def einsum_product(inputs: tuple[str, ...], output: str) -> Callable[..., Tensor]:
    """The cheapest torch call computing the real einsum ``inputs -> output``."""
    if len(inputs) == 2:
        mm = _matmul_form(inputs[0], inputs[1], output)
        if mm is not None:
            return mm
    letters = dict.fromkeys("".join(inputs) + output)
    if len(letters) <= len(LETTERS):
        rename = dict(zip(letters, LETTERS))
        eq = ",".join("".join(rename[c] for c in t) for t in inputs)
        eq += "->" + "".join(rename[c] for c in output)
        return functools.partial(torch.einsum, eq)
    ids = {c: i for i, c in enumerate(letters)}
    subs = [[ids[c] for c in t] for t in inputs]
    out = [ids[c] for c in output]

    def sublist(*xs: Tensor) -> Tensor:
        args: list[object] = []
        for x, sub in zip(xs, subs):
            args += [x, sub]
        return torch.einsum(*args, out)

    return sublist


def _matmul_form(tx: str, ty: str, out: str) -> Callable[[Tensor, Tensor], Tensor] | None:
    """``x @ y`` (with transposes) when ``tx, ty -> out`` is a batched matrix product.

    That is: one summed index ``s`` in both operands, one free index in each
    (``fx``, ``fy``), and the same batch indices ``B`` leading all three terms:
    ``tx = B + {fx, s}``, ``ty = B + {s, fy}``, ``out = B + {fx, fy}``, each
    pair in either order.
    """
    if len(tx) < 2 or len(tx) != len(ty) or len(out) != len(tx):
        return None
    batch = tx[:-2]
    if ty[:-2] != batch or out[:-2] != batch or len(set(tx + ty)) != len(batch) + 3:
        return None
    common = set(tx[-2:]) & set(ty[-2:])
    if len(common) != 1:
        return None
    (s,) = common
    fx = tx[-2:].replace(s, "")
    fy = ty[-2:].replace(s, "")
    if set(out[-2:]) != {fx, fy}:
        return None
    tx_x = tx[-1] != s  # x needs a transpose to put s last
    tx_y = ty[-2] != s  # y needs a transpose to put s first
    swap = out[-2:] != fx + fy
    if not (tx_x or tx_y or swap) and len(batch) <= 1:
        # torch.mm / torch.bmm directly: matmul's own dispatch costs more
        # than the product on small operands.
        return torch.mm if not batch else torch.bmm

    def matmul(x: Tensor, y: Tensor) -> Tensor:
        r = torch.matmul(x.mT if tx_x else x, y.mT if tx_y else y)
        return r.mT if swap else r

    return matmul


def align(step: Step, ops: Sequence[Tensor]) -> list[Tensor]:
    """Permute each operand to ``summed + output`` order, size 1 where absent."""
    order = step.summed + step.output
    out = []
    for term, x in zip(step.inputs, ops):
        x = x.permute(sorted(range(len(term)), key=lambda i: order.index(term[i])))
        for d, c in enumerate(order):
            if c not in term:
                x = x.unsqueeze(d)
        out.append(x)
    return out


def laid_out(x: Tensor, term: str, target: str) -> Tensor:
    """``x`` (one dim per index of ``term``, all in ``target``) permuted into ``target``'s
    order, with size-1 dims for the indices it lacks (it broadcasts against ``target``)."""
    perm, slots = _layout(term, target)
    view = [1] * len(target)
    sizes = x.shape
    for slot, d in zip(slots, perm or range(len(slots))):
        view[slot] = sizes[d]
    return (x if perm is None else x.permute(perm)).reshape(view)


@cached(maxsize=4096)
def _layout(term: str, target: str) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    """For :func:`laid_out`: the permutation of ``term``'s dims into ``target``'s order
    (``None``: as they are) and the slot of each in ``target``."""
    perm = tuple(term.index(c) for c in target if c in term)
    slots = tuple(d for d, c in enumerate(target) if c in term)
    return (None if perm == tuple(range(len(term))) else perm), slots


def narrow(step: Step, aligned: Sequence[Tensor], rng: Range) -> list[Tensor]:
    """The parts of the aligned operands that fall in one window.

    ``rng`` holds a ``(start, stop)`` for each of the leading dims; operands
    of size 1 there (broadcast) are left whole.
    """
    views = []
    for x in aligned:
        for d, (lo, hi) in enumerate(rng):
            if x.shape[d] != 1:
                x = x.narrow(d, lo, hi - lo)
        views.append(x)
    return views


def windows(
    step: Step, aligned: Sequence[Tensor], empty: bool = False
) -> Iterator[tuple[Range, list[Tensor]]]:
    """The windows of a step in row-major order: each one's range and operand parts.

    ``aligned`` are the operands as :func:`align` lays them out.  With ``empty``,
    a step summing an index of size 0 (no windows) yields one window of extent 0,
    so that a caller can ask its reduction what an empty sum is.
    """
    found = False
    for rng in step.ranges():
        found = True
        yield rng, narrow(step, aligned, rng)
    if empty and not found:
        rng = tuple((0, 0) for _ in step.windows)
        yield rng, [_zero_extent(x, len(rng)) for x in aligned]


def _zero_extent(x: Tensor, ndims: int) -> Tensor:
    """``x`` narrowed to extent 0 along each of its first ``ndims`` dims not broadcast."""
    for d in range(ndims):
        if x.shape[d] != 1:
            x = x.narrow(d, 0, 0)
    return x


def reduce_dims(step: Step) -> tuple[int, ...]:
    """The window dims of a window tensor (the leading ones)."""
    return tuple(range(len(step.windows)))


def out_shape(step: Step) -> list[int]:
    """The shape of the step's result."""
    size = step.size
    return [size[c] for c in step.output]


def _fresh(t: Tensor, shape: list[int]) -> Tensor:
    """A new tensor of ``shape`` holding ``t`` (never a view of an operand)."""
    if list(t.shape) == shape:
        return t.clone()
    return t.expand(shape).clone()


def contract(semiring: Semiring, step: Step, ops: Sequence[Tensor]) -> Tensor:
    """Contract one step in any semiring, out of place (differentiable)."""
    aligned = align(step, ops)
    dims = reduce_dims(step)
    shape = out_shape(step)
    acc: Tensor | None = None
    for _, views in windows(step, aligned):
        term = functools.reduce(semiring.mul, views)
        part = semiring.sum(term, dims)
        acc = part if acc is None else semiring.add(acc, part)
    if acc is None:  # a summed index of size 0: the empty sum
        return filled(aligned[0], shape, semiring.zero)
    if len(ops) == 1 and not dims:
        return _fresh(acc, shape)
    return acc if list(acc.shape) == shape else acc.expand(shape).contiguous()


def _term(views: list[Tensor], combine: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, bool]:
    """The window tensor, and whether it is a fresh tensor we may overwrite."""
    if len(views) == 1:
        return views[0], False
    return functools.reduce(combine, views), True


def add_only(step: Step, ops: Sequence[Tensor]) -> Tensor:
    """A step that sums no index, in a semiring whose ⊗ is ``+`` (log, max-plus).

    Each output cell has exactly one term, and ⊕ of one term is the term:
    the result is the operands' sum, a fresh tensor of the output's shape.
    """
    shape = out_shape(step)
    if len(ops) > 1 and all(t == step.output for t in step.inputs):
        if all(list(x.shape) == shape for x in ops):  # already aligned: just add
            return functools.reduce(torch.add, ops)
    t, owned = _term(narrow(step, align(step, ops), ()), torch.add)
    return t if owned and list(t.shape) == shape else _fresh(t, shape)


def log_forward(
    step: Step, ops: Sequence[Tensor], inplace: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-semiring step in one pass over the operands (online log-sum-exp).

    Returns ``(out, m, s)`` with ``out = log(s) + m'`` where ``m`` is the
    largest term of each output cell and ``s`` the sum of ``exp(term - m')``,
    ``m'`` being ``m`` where finite and 0 elsewhere.

    Each window updates a running maximum ``M`` and a running scaled sum ``S``
    (as in streaming softmax): with ``M' = max(M, max(window))``,
    ``S' = S·exp(M − M') + Σ exp(window − M')``.  Every exponent is ≤ 0, so
    nothing overflows, and the largest term contributes exactly 1, so finite
    cells never underflow to -inf.  Exponents below a floor are raised to it
    (see :func:`log_rows`).  Cells whose terms are all -inf keep
    ``M = -inf``; the shift ``M'`` is then 0 and ``exp(-inf − 0) = 0`` leaves
    ``S = 0``, so the output is ``log 0 = -inf`` without a NaN.  With
    ``inplace``, window tensors are overwritten (not while tracing: a tracer
    may constant-fold a tensor and replay the mutation at every call).
    """
    aligned = align(step, ops)
    dims = reduce_dims(step)
    shape = out_shape(step)
    m_run: Tensor | None = None
    s_run: Tensor | None = None
    shift: Tensor | None = None
    floor = -_EXP_FLOOR.get(aligned[0].dtype, _DEFAULT_EXP_FLOOR)
    for _, views in windows(step, aligned):
        t, owned = _term(views, torch.add)
        owned = owned and inplace
        m = t.amax(dims) if dims else t.clone()  # t may be overwritten below
        m_new = m if m_run is None else torch.maximum(m_run, m)
        shift = torch.where(torch.isfinite(m_new), m_new, 0.0)
        # The floor under exp's argument: see log_rows.
        if owned:
            e = t.sub_(shift).clamp_(min=floor).exp_()
        else:
            e = torch.exp((t - shift).clamp(min=floor))
        s = e.sum(dims) if dims else e
        s_run = s if s_run is None or m_run is None else s_run * torch.exp(m_run - shift) + s
        m_run = m_new
    assert m_run is not None and s_run is not None and shift is not None, "an empty step"
    # Cells with no finite term summed floors, not zeros: their sum is 0.
    s_run = torch.where(torch.isneginf(m_run), 0.0, s_run)
    out = torch.log(s_run) + shift
    return _sized(out, shape), _sized(m_run, shape), _sized(s_run, shape)


def _sized(t: Tensor, shape: list[int]) -> Tensor:
    return t if list(t.shape) == shape else t.expand(shape).contiguous()


def _strides(step: Step) -> list[int]:
    """Row-major strides of the summed indices (full sizes)."""
    size = step.size
    strides = []
    acc = 1
    for c, _ in reversed(step.windows):
        strides.append(acc)
        acc *= size[c]
    return strides[::-1]


def window_linear_index(
    step: Step, rng: Range, device: torch.device, strides: Sequence[int] | None = None
) -> Tensor:
    """Row-major linear index of every term of a window (window dims, then 1s).

    ``strides`` (default: the step's own row-major strides) weighs each summed index.
    """
    n = len(rng)
    nout = len(step.output)
    grid = torch.zeros((1,) * (n + nout), dtype=torch.int64, device=device)
    for i, ((lo, hi), stride) in enumerate(zip(rng, strides or _strides(step))):
        shape = [1] * (n + nout)
        shape[i] = hi - lo
        grid = grid + (torch.arange(lo, hi, device=device) * stride).reshape(shape)
    return grid


def max_windows(step: Step, ops: Sequence[Tensor], argmax: bool = True) -> tuple[Tensor, Tensor]:
    """Max-plus step over windows: values and the row-major linear index of the argmax.

    Ties go to the first maximiser in row-major order of the summed indices,
    whatever the windows: inside a window the first maximiser is found by
    scoring matches with descending weights (``amax`` of ``(t == max) ·
    (W - position)``; ``argmax`` over a leading dim is far slower), and
    across windows a later window only wins on a strictly larger value or, on
    a tie, a smaller linear index.  NaN beats everything (the first NaN
    wins).  All terms -inf gives -inf with index 0.  No value branches: the
    kernel a tracer inlines.  With ``argmax=False`` the index is not computed
    (a zero stand-in shaped like the output, no memory, is returned).
    """
    shape = out_shape(step)
    device = ops[0].device
    aligned = align(step, ops)
    strides = _strides(step)
    best: Tensor | None = None
    where: Tensor | None = None
    for rng, views in windows(step, aligned):
        t, _ = _term(views, torch.add)
        extents = [hi - lo for lo, hi in rng]
        flat = t.expand(extents + shape).flatten(0, len(extents) - 1)
        m = flat.amax(0)
        if not argmax:
            best = m if best is None else torch.maximum(best, m)
            continue
        count = flat.shape[0]
        hits = (flat == m) | (flat != flat)  # flat != flat: NaN, which amax propagates
        weight = torch.arange(count, 0, -1, device=device, dtype=_index_dtype(count))
        local = count - (hits * weight.reshape([-1] + [1] * len(shape))).amax(0).long()
        lin = torch.zeros_like(local)
        for (lo, hi), stride, inner in zip(rng, strides, _inner(rng)):
            lin = lin + (local // inner % (hi - lo) + lo) * stride
        if best is None or where is None:
            best, where = m, lin
            continue
        m_nan, best_nan = torch.isnan(m), torch.isnan(best)
        tie = (m == best) | (m_nan & best_nan)
        better = (m > best) | (m_nan & ~best_nan) | (tie & (lin < where))
        best = torch.where(better, m, best)
        where = torch.where(better, lin, where)
    assert best is not None, "an empty step"
    if where is None:
        where = no_argmax(step, device)
    return _sized(best, shape), where


# A step whose terms all fit one window of at most this many (output cells x terms)
# runs as one torch.max over its rows: the per-call cost of the general kernels'
# layouts and chunks is what small steps pay for (a joint CKY step of 10k terms:
# about 3x faster).
SMALL_TERMS = 1 << 16

# A max-plus contraction with an argmax runs as one such joint step rather than
# pairwise (ranks, backtracking) up to this many (output cells x terms).  Viterbi on
# ab,bc,cd->ad, one thread: n=13 (28,561) 184 us joint vs 224 us pairwise; n=16
# (65,536) 265 us vs 239 us.
JOINT_TERMS = 1 << 15


@cached(maxsize=4096)
def small_step(step: Step) -> bool:
    """Whether :func:`max_small` applies: one window over every term, and few terms."""
    size = step.size
    if not step.windows or any(w < size[c] for c, w in step.windows):
        return False
    return 0 < math.prod(out_shape(step)) * step.terms <= SMALL_TERMS


def small_joint(step: Step) -> bool:
    """Whether a joint step is small enough to beat a pairwise plan (see JOINT_TERMS)."""
    return small_step(step) and math.prod(out_shape(step)) * step.terms <= JOINT_TERMS


# Per operand of a step: its permutation into output-then-summed order (see _layout), its
# shape at the step's sizes, its view at that shape (size 1 for the indices it lacks), and
# per dim of that view the operand's dim it is (-1: a size-1 dim it lacks).
_Laid = tuple[tuple[int, ...] | None, tuple[int, ...], list[int], tuple[int, ...]]


@cached(maxsize=4096)
def _small_layout(step: Step) -> tuple[tuple[_Laid, ...], list[int], list[int], int]:
    """What :func:`output_first` and :func:`max_small` need of a step, worked out once:
    per operand its :data:`_Laid`; the output shape; that shape with the summed sizes;
    the number of terms per cell."""
    order = step.output + step.summed
    size = step.size
    laid = []
    for term in step.inputs:
        perm = _layout(term, order)[0]
        laid.append(
            (
                perm,
                tuple(size[c] for c in term),
                [size[c] if c in term else 1 for c in order],
                tuple(term.index(c) if c in term else -1 for c in order),
            )
        )
    shape = out_shape(step)
    return tuple(laid), shape, shape + [size[c] for c in step.summed], step.terms


# Steps with at most this many terms per cell unravel an argmax by a table lookup.
_TABLE_TERMS = 1 << 12


@cached(maxsize=4096)
def small_terms(step: Step) -> bool:
    """Whether ``step`` unravels its argmax by a lookup in :func:`coordinates`.

    (One summed index needs no table: its linear index is its coordinate.)"""
    return len(step.windows) > 1 and 0 < step.terms <= _TABLE_TERMS


@cached(maxsize=256)  # at most 256 * 4096 * 8 bytes per summed index
def coordinates(step: Step, device: torch.device) -> Tensor:
    """Every linear index of a small step's terms as coordinates: ``(terms, summed)``."""
    size = step.size
    flat = torch.arange(step.terms, device=device)
    return torch.stack(torch.unravel_index(flat, [size[c] for c in step.summed]), dim=-1)


def output_first(step: Step, ops: Sequence[Tensor]) -> list[Tensor]:
    """The operands as views in the step's output-then-summed order, with size-1 dims
    for the indices each lacks (they broadcast against each other)."""
    layouts = _small_layout(step)[0]
    laid = []
    direct = untraced()
    for (perm, sizes, view, where), term, x in zip(layouts, step.inputs, ops):
        if x.shape != sizes:  # broadcast (size-1) dims: the general way
            laid.append(laid_out(x, term, step.output + step.summed))
        elif direct and type(x) is torch.Tensor and not x.requires_grad:
            # One call for the permute and the size-1 dims (a quarter of their cost; these
            # views serve small steps, where the calls' fixed cost is what counts).
            st = x.stride()
            laid.append(x.as_strided(view, [st[d] if d >= 0 else 0 for d in where]))
        else:  # (the view worked out once)
            laid.append((x if perm is None else x.permute(perm)).reshape(view))
    return laid


def max_small(step: Step, ops: Sequence[Tensor], argmax: bool = True) -> tuple[Tensor, Tensor]:
    """A small step (see :func:`small_step`) as one ``torch.max`` over its rows.

    The terms are laid out output cells first, then the summed indices in the
    step's order, so the first maximiser that ``torch.max`` reports is the
    first in row-major order, as the tie rule wants; it reports the first NaN
    too, and index 0 for a row of -inf.  No value branches.
    """
    _, shape, full, terms = _small_layout(step)
    rows = functools.reduce(torch.add, output_first(step, ops))
    if list(rows.shape) != full:  # size-1 (broadcast) dims left in every operand
        rows = rows.expand(full)
    if len(full) != len(shape) + 1:  # several summed indices: one dim of terms
        rows = rows.reshape(shape + [terms])
    if not argmax:
        return rows.amax(-1), no_argmax(step, ops[0].device)
    values, index = torch.max(rows, -1)  # fresh tensors, not views
    return values, index


def log_small(step: Step, ops: Sequence[Tensor]) -> Tensor:
    """A small step (see :func:`small_step`) of the log semiring, values alone: one
    :func:`torch.logsumexp` over its terms (laid out as :func:`max_small`'s).

    Exact as any max-shifted sum; a cell whose terms are all -inf is -inf, a NaN or
    an inf meeting -inf in a term makes its cell NaN.  No residuals: for calls that
    nothing differentiates.
    """
    layouts, shape, full, _ = _small_layout(step)
    views = output_first(step, ops)
    dims = tuple(range(len(shape), len(full)))
    if len(views) == 1 or any(x.shape != lay[1] for lay, x in zip(layouts, ops)):
        rows = functools.reduce(torch.add, views)  # (size-1 broadcast dims: the general way)
        return torch.logsumexp(rows if list(rows.shape) == full else rows.expand(full), dims)
    # The terms in row-major order, so that the reduction reads contiguous rows (a
    # broadcast sum picks its own layout: 1.4x slower to reduce on the CKY step).
    rows = torch.empty(full, dtype=views[0].dtype, device=views[0].device)
    torch.add(functools.reduce(torch.add, views[:-1]), views[-1], out=rows)
    return torch.logsumexp(rows, dims)


def no_argmax(step: Step, device: torch.device) -> Tensor:
    """The argmax of a step without terms or without an argmax: zeros, no memory."""
    return torch.zeros((), dtype=torch.int64, device=device).expand(out_shape(step))


def empty(step: Step, ops: Sequence[Tensor], zero: Identity) -> Tensor:
    """A step whose summed indices include one of size 0: every cell is ``zero``."""
    return filled(ops[0], out_shape(step), zero)


def filled(like: Tensor, shape: list[int], value: Identity) -> Tensor:
    """A new tensor of ``shape`` holding ``value`` in every cell.

    ``value`` is a number, or (a semiring with element dimensions) nested
    tuples of the element shape, which ``shape`` ends with.
    """
    if isinstance(value, tuple):
        return like.new_tensor(value).expand(shape).clone()
    return like.new_full(shape, value)


# Fewest terms per cell for which the row kernels (max_rows, log_rows) beat
# the windowed ones: below it their innermost reductions are too short to
# vectorize.
ROWS_MIN_TERMS = 16


def _row_layout(step: Step, ops: Sequence[Tensor]) -> tuple[str, list[Tensor]]:
    """The order of the summed indices inside a row, and the operands laid out for rows.

    Inside a row, the summed indices of the operand with the most summed
    terms go last, in its own order: the biggest sum then runs over
    contiguous memory (several times faster than broadcasting along the
    innermost dim).  The operands come back permuted to output-then-row
    order, contiguous, with size-1 dims for the indices they lack, the
    biggest one last (it is added last, straight into the chunk buffer).
    """
    size = step.size
    summed = step.summed
    big = max(
        range(len(ops)),
        key=lambda k: math.prod(size[c] for c in step.inputs[k] if c in summed),
    )
    inner = "".join(c for c in step.inputs[big] if c in summed)
    row = "".join(c for c in summed if c not in inner) + inner
    order = step.output + row
    aligned = []
    for term, x in sorted(zip(step.inputs, ops), key=lambda p: p[0] == step.inputs[big]):
        x = x.permute(sorted(range(len(term)), key=lambda i: order.index(term[i])))
        if 0 not in x.stride():  # a broadcast operand stays a view, not a big copy
            x = x.contiguous()
        for d, c in enumerate(order):
            if c not in term:
                x = x.unsqueeze(d)
        aligned.append(x)
    return row, aligned


def _row_chunks(
    step: Step, row: str, aligned: Sequence[Tensor], shape: list[int], per_chunk: int
) -> Iterator[tuple[Tensor, int, int]]:
    """The window tensor in chunks of whole rows: ``(rows, start, count)``.

    ``rows`` is a ``(count, terms)`` tensor holding the terms of ``count``
    output cells, which are the cells ``start, ..., start + count - 1`` in
    row-major order of the output.  Every chunk lives in the same buffer (no
    fresh allocation, and page faults, per chunk), so each is only valid
    until the next one is made, and may be overwritten.
    """
    size = step.size
    terms = step.terms
    # Chunks of the output dims: whole trailing dims, a window of one dim,
    # single coordinates of the dims before it -- a contiguous run of cells.
    split, tail = len(shape), 1  # the whole dims from split on hold tail cells
    while split > 0 and tail * shape[split - 1] <= per_chunk:
        split -= 1
        tail *= shape[split]
    chunks: list[list[tuple[int, int]]] = [[]]
    for d in range(split):
        extent = 1 if d < split - 1 else max(1, per_chunk // tail)
        chunks = [
            c + [(lo, min(lo + extent, shape[d]))]
            for c in chunks
            for lo in range(0, shape[d], extent)
        ]
    strides = [math.prod(shape[d + 1 :]) for d in range(split)]
    cells = min(per_chunk, math.prod(shape))
    buffer = torch.empty(cells * terms, dtype=aligned[-1].dtype, device=aligned[-1].device)
    for chunk in chunks:
        views = narrow(step, aligned, tuple(chunk))  # leading (output) dims narrowed
        out_part = [hi - lo for lo, hi in chunk] + shape[split:]
        count = math.prod(out_part)
        t = buffer[: count * terms].view(out_part + [size[c] for c in row])
        if len(views) == 1:
            t.copy_(views[0])
        else:  # the smaller operands first, then the biggest straight into the buffer
            torch.add(functools.reduce(torch.add, views[:-1]), views[-1], out=t)
        start = sum(lo * stride for (lo, _), stride in zip(chunk, strides))
        yield t.view(count, terms), start, count


def rows_apply(step: Step, dtype: torch.dtype, argmax: bool = False) -> int | None:
    """Output cells per chunk of the row kernels, or ``None`` where they do not apply.

    They need enough terms per cell for the innermost reductions to
    vectorize, whole rows inside the plan's bound (``step.window_elements``)
    and, for an argmax, weights that are exact in the dtype.
    """
    terms = step.terms
    limit = step.window_elements
    exact = 2**24 if dtype == torch.float32 else 2**53 if dtype == torch.float64 else 0
    if terms < ROWS_MIN_TERMS or terms > limit or (argmax and terms >= exact):
        return None
    return max(1, limit // terms)


def max_rows(
    step: Step, ops: Sequence[Tensor], argmax: bool = True
) -> tuple[Tensor, Tensor] | None:
    """Max and first argmax with every summed index innermost (values are read).

    Each chunk of rows (see :func:`_row_chunks`) takes four vectorized
    passes, all in place but the first: ``v = amax(row)``; ``row.eq_(v)``
    (1 at the maximisers; a float result, several times faster than a bool
    one); ``row.mul_(w)`` with weights ``w = n - rank``, ``rank`` being a
    term's row-major position in the step's order of summed indices;
    ``amax(row)`` is the weight of the first maximiser.  Returns ``None``
    where it does not apply (see :func:`rows_apply`, and a NaN among the
    values: the first NaN must win); the caller's kernels handle those.
    With ``argmax=False`` only the first pass runs (NaN is then fine:
    ``amax`` propagates it).
    """
    dtype = ops[0].dtype
    per_chunk = rows_apply(step, dtype, argmax)
    if per_chunk is None:
        return None
    shape = out_shape(step)
    size, summed, terms = step.size, step.summed, step.terms
    row, aligned = _row_layout(step, ops)
    device = ops[0].device
    ncells = math.prod(shape)
    values = torch.empty(ncells, dtype=dtype, device=device)
    if argmax:
        rank = torch.arange(terms, device=device).reshape([size[c] for c in summed])
        rank = rank.permute([summed.index(c) for c in row]).reshape(-1)
        weights = (terms - rank).to(dtype)  # terms, ..., 1 in the step's row-major order
        first = torch.empty(ncells, dtype=dtype, device=device)  # the first maximiser's weight
    for t, start, count in _row_chunks(step, row, aligned, shape, per_chunk):
        v = values[start : start + count].unsqueeze(-1)
        torch.amax(t, -1, keepdim=True, out=v)
        if argmax:
            torch.amax(t.eq_(v).mul_(weights), -1, out=first[start : start + count])
    if not argmax:
        return values.view(shape), no_argmax(step, device)
    if bool(torch.isnan(values).any()):  # the first NaN must win: leave it to the others
        return None
    return values.view(shape), (terms - first.long()).view(shape)


def log_rows(step: Step, ops: Sequence[Tensor]) -> Tensor | None:
    """Log-sum-exp with every summed index innermost (in place on its buffer), or ``None``.

    Per chunk of rows (see :func:`_row_chunks`): ``m = amax(row)``, then in
    place ``exp(row - m')`` with ``m' = m`` where finite and 0 elsewhere, a
    sum and ``log(sum) + m'``; the same arithmetic as :func:`log_forward` on
    one window, but every reduction runs over contiguous rows.  ``None``
    where the row kernels do not apply (see :func:`rows_apply`).
    """
    dtype = ops[0].dtype
    per_chunk = rows_apply(step, dtype)
    if per_chunk is None:
        return None
    shape = out_shape(step)
    row, aligned = _row_layout(step, ops)
    out = torch.empty(math.prod(shape), dtype=dtype, device=ops[0].device)
    floor = -_EXP_FLOOR.get(dtype, _DEFAULT_EXP_FLOOR)
    for t, start, count in _row_chunks(step, row, aligned, shape, per_chunk):
        # The shift: the row's maximum where finite, else 0 (inf and NaN
        # then propagate through exp and the sum).
        m = t.amax(-1, keepdim=True)
        shift = m.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        part = out[start : start + count].unsqueeze(-1)
        # Shifted terms are <= 0; those below the floor are raised to it
        # before exp, whose results would be (denormal) zeros computed on a
        # slow path, ten times slower.  Each adds at most exp(floor) to a
        # sum that is at least 1 (its largest term): a relative change far
        # below the dtype's precision.
        torch.sum(t.sub_(shift).clamp_(min=floor).exp_(), -1, keepdim=True, out=part)
        part.log_().add_(shift)
        # A row of -inf only (probability zero) is -inf, not a sum of floors.
        part.masked_fill_(m == -math.inf, -math.inf)
    return out.view(shape)


# How far below a row's maximum a term may be before it is raised to the
# floor in log_rows: exp of the floor is a normal float, and the
# terms raised to it add a relative error of at most (terms) * exp(-floor).
_EXP_FLOOR = {torch.float64: 700.0}
_DEFAULT_EXP_FLOOR = 80.0


# With at least this many output cells, one output-sized slice per summed
# coordinate is big enough that a loop of a few fused elementwise ops per
# slice beats scoring whole windows.
SLICES_MIN_OUTPUT = 4096


def max_slices(
    step: Step, ops: Sequence[Tensor], argmax: bool = True, traced: bool = False
) -> tuple[Tensor, Tensor]:
    """Max and argmax visiting the summed coordinates one at a time, in row-major order.

    A later coordinate wins only on a strictly larger value, so ties keep the
    first.  NaN must win, and the first NaN must stay: ``maximum`` propagates
    NaN, and the index of the first NaN is found in a second pass over the
    cells that ended NaN (when tracing for the compiler, where that check
    cannot branch, every step tests for NaN instead).  With ``argmax=False``
    only the values are computed.
    """
    size = step.size
    shape = out_shape(step)
    aligned = align(step, ops)
    coords = list(product(*(range(size[c]) for c, _ in step.windows)))

    def slice_at(point: tuple[int, ...]) -> Tensor:
        views = [x[tuple(min(i, x.shape[d] - 1) for d, i in enumerate(point))] for x in aligned]
        return functools.reduce(torch.add, views)

    best = slice_at(coords[0]).expand(shape).clone()
    if not argmax:
        for lin in range(1, len(coords)):
            best = torch.maximum(best, slice_at(coords[lin]))
        return best, no_argmax(step, best.device)
    # int32 halves the traffic of the index updates; widened at the end.
    index_dtype = torch.int32 if len(coords) < 2**31 else torch.int64
    where = torch.zeros_like(best, dtype=index_dtype)
    for lin in range(1, len(coords)):
        cand = slice_at(coords[lin])
        if traced:
            new = torch.maximum(best, cand)
            better = (new != best) & (best == best)
            best = new
            where = torch.where(better, lin, where)
        else:
            better = cand > best
            best = torch.maximum(best, cand)
            where = where.masked_fill_(better, lin)
    if not traced and bool(torch.isnan(best).any()):
        found = ~torch.isnan(best)
        for lin, point in enumerate(coords):
            hit = torch.isnan(slice_at(point)) & ~found
            where = where.masked_fill_(hit, lin)
            found = found | hit
    return best, where.long()


def _index_dtype(count: int) -> torch.dtype:
    return torch.uint8 if count < 256 else torch.int16 if count < 32768 else torch.int64


def _inner(rng: Range) -> list[int]:
    """Row-major strides inside one window."""
    out = []
    acc = 1
    for lo, hi in reversed(rng):
        out.append(acc)
        acc *= hi - lo
    return out[::-1]


def unravel(step: Step, linear: Tensor) -> Tensor:
    """Linear argmax indices to one coordinate per summed index (last dim)."""
    if len(step.windows) == 1 and step.terms:  # (the common case) it is the coordinate
        return linear.unsqueeze(-1)
    if small_terms(step) and untraced():
        # One lookup -- not while tracing (the cached table would be a traced tensor)
        # nor under torch.func (a vmapped index reads values).
        # index_select, not table[linear]: 2.5x faster on 7,200 cells (the stack RNN).
        table = coordinates(step, linear.device)
        found = table.index_select(0, linear.reshape(-1))
        return found.view(*linear.shape, table.shape[1])
    size = step.size
    if not step.windows or any(size[c] == 0 for c, _ in step.windows):
        # No summed index, or an empty sum: the argmax is all zeros.
        return linear.new_zeros(linear.shape + (len(step.windows),))
    coords = []
    for i, ((c, _), s) in enumerate(zip(step.windows, _strides(step))):
        coord = linear if s == 1 else linear // s
        coords.append(coord if i == 0 else coord % size[c])  # linear < the product of sizes
    return torch.stack(coords, dim=-1)  # (one summed index returned early)


class GradAccumulator:
    """Collects per-window gradient pieces of a step's operands and assembles them.

    A piece for operand ``k`` is given in aligned layout (size 1 along the
    indices ``k`` lacks).  Pieces of windows that differ only in indices ``k``
    lacks are summed; pieces along indices ``k`` has are concatenated.  Only
    out-of-place operations are used, so the result is differentiable.
    """

    def __init__(self, step: Step, ops: Sequence[Tensor], needs: Sequence[bool]) -> None:
        self.step = step
        self.ops = ops
        self.needs = needs
        self.order = step.summed + step.output  # the aligned layout
        self.lacks = [
            tuple(d for d, c in enumerate(self.order) if c not in term) for term in step.inputs
        ]
        self.pieces: list[dict[tuple[int, ...], Tensor]] = [{} for _ in ops]

    def add(self, k: int, rng: Range, piece: Tensor) -> None:
        """Add the gradient piece of operand ``k`` for window ``rng``."""
        lacks = self.lacks[k]
        if lacks:
            piece = piece.sum(lacks)
        term = self.step.inputs[k]
        key = tuple(lo for (c, _), (lo, _) in zip(self.step.windows, rng) if c in term)
        prev = self.pieces[k].get(key)
        self.pieces[k][key] = piece if prev is None else prev + piece

    def result(self) -> list[Tensor | None]:
        grads: list[Tensor | None] = []
        for k, (term, x) in enumerate(zip(self.step.inputs, self.ops)):
            if not self.needs[k]:
                grads.append(None)
                continue
            kept = [c for c in self.order if c in term]
            cat_dims = [kept.index(c) for c, _ in self.step.windows if c in term]
            g = _assemble(self.pieces[k], cat_dims)
            g = g.permute([kept.index(c) for c in term])
            grads.append(g if g.shape == x.shape else g.expand(x.shape))
        return grads


def pullback(
    step: Step,
    ops: Sequence[Tensor],
    needs: Sequence[bool],
    weights: Callable[[list[Tensor], Range], Tensor],
) -> list[Tensor | None]:
    """Gradient of every operand from per-window weights (out of place).

    ``weights(views, rng)`` returns, for one window, the tensor ``W`` of
    d(output cell)/d(term) times the cotangent; the gradient of operand ``k``
    is ``W`` summed over every dim that ``k`` lacks, assembled over windows.
    """
    aligned = align(step, ops)
    acc = GradAccumulator(step, ops, needs)
    for rng, views in windows(step, aligned):
        w = weights(views, rng)
        for k in range(len(ops)):
            if needs[k]:
                acc.add(k, rng, w)
    return acc.result()


def _assemble(pieces: dict[tuple[int, ...], Tensor], dims: list[int]) -> Tensor:
    """Concatenate window pieces keyed by their start along ``dims``."""
    if not dims:
        return pieces[()]
    groups: dict[int, dict[tuple[int, ...], Tensor]] = {}
    for key, t in pieces.items():
        groups.setdefault(key[0], {})[key[1:]] = t
    parts = [_assemble(groups[lo], dims[1:]) for lo in sorted(groups)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dims[0])


def tangent_sum(
    step: Step,
    ops: Sequence[Tensor],
    tangents: Sequence[Tensor],
    weights: Callable[[list[Tensor], Range], Tensor],
) -> Tensor:
    """Forward-mode: ``Σ_terms weight(term) · Σ_k tangent_k`` per output cell."""
    aligned = align(step, ops)
    t_aligned = align(step, tangents)
    dims = reduce_dims(step)
    shape = out_shape(step)
    acc: Tensor | None = None
    for (rng, views), (_, t_views) in zip(windows(step, aligned), windows(step, t_aligned)):
        w = weights(views, rng)
        tt = functools.reduce(torch.add, t_views)
        part = w * tt
        part = part.sum(dims) if dims else part
        acc = part if acc is None else acc + part
    if acc is None:
        return aligned[0].new_zeros(shape)
    return acc if list(acc.shape) == shape else acc.expand(shape).contiguous()


def _term_index(
    step: Step, term: str, shape: Sequence[int], coords: Tensor | None, device: torch.device
) -> Tensor:
    """The flat index into an operand (``term``, ``shape``) of each output cell's argmax term.

    ``coords`` holds the argmax coordinate of every summed index (last dim), or
    ``None`` when the step sums none.  Broadcast (size-1) dims index 0.
    """
    out, summed = step.output, step.summed
    nout = len(out)
    index = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for d in reversed(range(len(term))):
        c = term[d]
        if shape[d] != 1:
            if c in out:
                view = [1] * nout
                view[out.index(c)] = shape[d]
                coord = torch.arange(shape[d], device=device).reshape(view)
            else:
                assert coords is not None
                coord = coords[..., summed.index(c)]
            index = index + coord * stride
        stride *= shape[d]
    return index


def argmax_pullback(
    step: Step, ops: Sequence[Tensor], linear: Tensor, g: Tensor, needs: Sequence[bool]
) -> list[Tensor | None]:
    """The max-plus vjp: each cell's cotangent goes to its argmax term, one scatter per operand.

    Out of place, and linear in ``g``, so it is differentiable again (its
    derivative in the operands is zero almost everywhere, in ``g`` a gather).
    """
    shape = out_shape(step)
    coords = unravel(step, linear) if step.windows else None
    flat_g = g.expand(shape).reshape(-1)
    grads: list[Tensor | None] = []
    for term, x, need in zip(step.inputs, ops, needs):
        if not need:
            grads.append(None)
            continue
        index = _term_index(step, term, x.shape, coords, g.device).expand(shape).reshape(-1)
        zeros = torch.zeros(x.numel(), dtype=g.dtype, device=g.device)
        grads.append(zeros.index_add(0, index, flat_g).reshape(x.shape))
    return grads


def argmax_tangent(
    step: Step, ops: Sequence[Tensor], linear: Tensor, tangents: Sequence[Tensor]
) -> Tensor:
    """The max-plus jvp: the sum of the operands' tangents at each cell's argmax term."""
    shape = out_shape(step)
    coords = unravel(step, linear) if step.windows else None
    total: Tensor | None = None
    for term, x, t in zip(step.inputs, ops, tangents):
        index = _term_index(step, term, x.shape, coords, t.device).expand(shape).reshape(-1)
        part = t.reshape(-1).index_select(0, index).reshape(shape)
        total = part if total is None else total + part
    assert total is not None
    return total


@dataclass(frozen=True, slots=True)
class NegInf:
    """A log step's ``grad_of_neg_inf`` policy: the gradient weight of each term of a cell
    whose terms are all -inf.  One of :data:`NAN` (as :func:`torch.logsumexp`),
    :data:`UNIFORM` (``1/N`` for ``N`` terms), :data:`THROUGH` (below), or a user's
    weight, ``NegInf.of(c)``.

    Attributes:
        kind: ``"nan"``, ``"uniform"``, ``"through"`` or ``"weight"``.
        weight: The weight of a ``"weight"`` policy (0 otherwise).
    """

    kind: str
    weight: float = 0.0

    @staticmethod
    def of(value: float | str) -> NegInf:
        """The policy of a validated ``grad_of_neg_inf`` (a float, ``'nan'``, ``'uniform'``)."""
        if isinstance(value, str):
            return NAN if value == "nan" else UNIFORM
        return NAN if math.isnan(value) else NegInf("weight", float(value))

    @property
    def is_nan(self) -> bool:
        return self.kind == "nan"

    @property
    def ignores_cotangent(self) -> bool:
        """Whether it is a user's weight 0, whose all -inf cells do not use their cotangent,
        whatever it holds (not :data:`THROUGH`)."""
        return self.kind == "weight" and self.weight == 0.0

    def dead_weight(self, terms: int) -> float:
        """The weight of each of the ``terms`` terms of an all -inf cell (not for NaN)."""
        if self.kind == "uniform":
            return 1.0 / terms if terms else 0.0
        return self.weight

    @property
    def key(self) -> str:
        """The policy as an operator argument (operators take no Python objects)."""
        return repr(self.weight) if self.kind == "weight" else self.kind

    @staticmethod
    def from_key(key: str) -> NegInf:
        """The policy of :attr:`key`."""
        return _NAMED[key] if key in _NAMED else NegInf("weight", float(key))


NAN = NegInf("nan")
UNIFORM = NegInf("uniform")
THROUGH = NegInf("through")
"""The policy of a pairwise plan's intermediate steps and of a rank's partial sum: the terms
of an all -inf cell weigh 0, and the cotangent is still multiplied by that weight, so a NaN
that the final cell's policy sends back reaches the operands as the joint sum would send it.
A user's weight 0 is different: there the cotangent is not used at all (0, whatever it
holds)."""
_NAMED = {p.kind: p for p in (NAN, UNIFORM, THROUGH)}


def used_cotangent(neg_inf: NegInf, out: Tensor, g: Tensor) -> Tensor:
    """``g`` with the all -inf cells of a user's weight-0 policy zeroed.

    With ``grad_of_neg_inf=0`` such a cell does not use its cotangent, whatever
    it holds: a NaN or inf sent back by a later operation stays there, rather
    than turning the operands' gradients into ``0 * NaN``.
    """
    if not neg_inf.ignores_cotangent:
        return g
    return torch.where(torch.isneginf(out), 0.0, g)


def log_weights(
    step: Step, neg_inf: NegInf, out: Tensor
) -> Callable[[list[Tensor], Range], Tensor]:
    """d out / d term = exp(term - out) per window, with the ``grad_of_neg_inf`` policy.

    A cell whose terms are all -inf has out = -inf and every exp(term - out)
    = exp(-inf + inf) = NaN.  Unless the policy is NaN, those weights are
    replaced by the policy's weight; the subtraction uses a finite stand-in
    for such cells so that no NaN is created (and none leaks into second
    derivatives through ``torch.where``).
    """
    if neg_inf.is_nan:
        return lambda views, rng: torch.exp(sum(views[1:], views[0]) - out)
    dead = torch.isneginf(out)
    weight = neg_inf.dead_weight(step.terms)
    finite_out = torch.where(dead, 0.0, out)

    def weights(views: list[Tensor], rng: Range) -> Tensor:
        e = torch.exp(sum(views[1:], views[0]) - finite_out)
        return torch.where(dead, weight, e)

    return weights


# Bytes per element of a ranked window: the terms, their ranks, the hit mask, the
# masked ranks (the plan sized windows for the terms alone).
_RANKED_BYTES = 4 + 8 + 1 + 8
_NO_RANK = torch.iinfo(torch.int64).max


def ranked_windows(step: Step, itemsize: int) -> Step:
    """``step`` with windows small enough that a ranked window fits the plan's bound."""
    bound = max(1, step.window_elements * itemsize // _RANKED_BYTES)
    windows = list(step.windows)
    cells = math.prod(step.size[c] for c in step.output)
    while windows and cells * math.prod(w for _, w in windows) > bound:
        i = max(range(len(windows)), key=lambda j: windows[j][1])
        c, w = windows[i]
        if w == 1:
            break
        windows[i] = (c, max(1, w // 2))
    return replace(step, windows=tuple(windows))


def max_ranked(
    step: Step,
    ops: Sequence[Tensor],
    ranks: Sequence[Tensor | None],
    strides: Sequence[int],
    itemsize: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Max-plus step whose ties go to the smallest global row-major rank.

    ``ranks[k]`` is operand ``k``'s partial rank (the rank, among the indices
    summed by earlier steps, of the assignment each of its cells stands for;
    ``None``: 0) and ``strides[i]`` the global row-major stride of the step's
    ``i``-th summed index, so a term's rank is its operands' ranks plus its own
    coordinates times those strides.  Within every output cell the other
    summed indices are fixed, so the smallest rank among the maximising terms
    is the first maximiser in the row-major order of all summed indices
    (NaN wins, the first NaN; all -inf gives the smallest rank).  Returns the
    values, the step's linear argmax (what :func:`unravel` reads) and the
    winner's rank.  No value branches (vmap and tracers run it as it is);
    windows are cut so that the rank window also fits the plan's bound.
    """
    shape = out_shape(step)
    device = ops[0].device
    small = ranked_windows(step, itemsize)
    aligned = align(small, ops)
    present = [r for r in ranks if r is not None]
    rank_terms = tuple(t for t, r in zip(step.inputs, ranks) if r is not None)
    rank_step = replace(small, inputs=rank_terms)
    aligned_ranks = align(rank_step, present) if present else []
    size = step.size
    best: Tensor | None = None
    best_rank: Tensor | None = None
    for (rng, views), rank_views in zip(
        windows(small, aligned), _rank_windows(rank_step, aligned_ranks)
    ):
        t, _ = _term(views, torch.add)
        extents = [hi - lo for lo, hi in rng]
        lead = len(extents)
        grid = window_linear_index(small, rng, device, strides)  # the terms' own share
        r = functools.reduce(torch.add, rank_views, grid)
        full = extents + shape
        flat = t.expand(full).flatten(0, lead - 1)
        flat_rank = r.expand(full).flatten(0, lead - 1)
        m = flat.amax(0)
        hits = (flat == m) | ((flat != flat) & (m != m))
        rmin = torch.where(hits, flat_rank, _NO_RANK).amin(0)
        if best is None or best_rank is None:
            best, best_rank = m, rmin
            continue
        m_nan, best_nan = m != m, best != best
        tie = (m == best) | (m_nan & best_nan)
        better = (m > best) | (m_nan & ~best_nan) | (tie & (rmin < best_rank))
        best = torch.where(better, m, best)
        best_rank = torch.where(better, rmin, best_rank)
    assert best is not None and best_rank is not None, "an empty step"
    # The step's own coordinates are digits of the winner's rank.
    linear = torch.zeros_like(best_rank)
    for (c, _), stride, local in zip(step.windows, strides, _strides(step)):
        linear = linear + (best_rank // stride % size[c]) * local
    return _sized(best, shape), linear, best_rank


def _rank_windows(step: Step, aligned: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """The rank operands' parts in each window (none: an endless stream of empty lists)."""
    if not aligned:
        while True:
            yield []
    for _, views in windows(step, aligned):
        yield views


def encode_rank(step: Step, linear: Tensor, strides: Sequence[int]) -> Tensor:
    """The global partial rank of a step's linear argmax (its coordinates times ``strides``)."""
    if not step.windows:
        return torch.zeros_like(linear)
    if len(step.windows) == 1:  # the linear index is the coordinate
        return linear if strides[0] == 1 else linear * strides[0]
    coords = unravel(step, linear.reshape(linear.shape or (1,)))
    rank = (coords * torch.tensor(list(strides), device=linear.device)).sum(-1)
    return rank.reshape(linear.shape)
