"""The boolean semiring (⊕ = or, ⊗ = and) on ``torch.bool`` tensors, on packed bits.

Nothing is converted to floating point: booleans are packed 8 to a byte and
64 to an ``int64`` word, and a step of the plan runs one of two kernels.

*Words* (any step).  The step's summed indices are flattened into one axis,
packed into words (zero-padded), and each operand is laid out word-leading,
``(words, output dims...)`` with size 1 for the output indices it lacks, so
that one word of every operand is a contiguous slab broadcasting over the
output.  The ``&`` of the operands' slabs decides 64 terms of every output
cell at once; the slabs of all words are or-ed together in place (torch has
no bitwise-or reduction) and a cell is true where the result is nonzero.

*Tables* (two-operand steps, the "method of the four Russians").  The step
is a batch of boolean matrix products ``(rows, J) x (J, cols)``.  The second
matrix is packed along ``cols``; for every group of 8 of its rows a table
holds the or of each of the 256 subsets of those rows.  A row of the first
matrix, packed into bytes, names one subset per group, so one gather and
one or settle 8 summed terms for 64 output columns.  That is about 8 times
less work than the word kernel for large products; each two-operand step
compares the estimated costs (and which operand gives the rows) and picks.

Before either, a summed index that only one operand of the step has is
or-reduced out of it (``any``); so in a two-operand step every summed index
is in both operands and nothing is replicated.  In a step of three or more
operands (``optimize=False``) an operand lacking a summed index is
broadcast along it inside each window, which the window bound covers.

Memory.  With a byte budget ``B`` (an :class:`AutomaticBlockSize`), and
``B' = min(B, CPU_CHUNK_BYTES)`` on CPU (1 MiB, so that accumulators stay
in cache), ``B' = B`` elsewhere:

* words: the summed indices are cut into windows (innermost whole first)
  so that each operand's window, as booleans padded to whole bytes (its
  packed words are no bigger), holds at most ``B`` bytes; the ``&`` runs over
  chunks of output cells and groups of words of at most ``B'`` bytes;
* tables: the tables are built for windows of words, groups and batch
  entries of at most ``min(B, CPU_TABLE_BYTES)`` bytes on CPU (4 MiB), ``B``
  elsewhere; gathers, accumulators and unpacking run in chunks of at most
  ``B'`` bytes.  The kernel needs room for one table of one group and one
  word (2 KiB); with less, the word kernel runs.

A window never drops below one index value, a chunk below one word of one
cell.  An int ``block_size`` ``e`` caps extents, not bytes: with words,
every summed index is cut at extent ``e``, so a window packs ``e**r`` terms
(``r`` summed indices) into at most ``ceil(e**r / 64)`` words; the tables run
only where ``e`` cuts no summed index of the step.  Chunks and tables are
then capped as for ``B`` = infinity (CPU) or 256 MiB (elsewhere).  Tensors
no bigger than an input or the output -- packed copies of the operands, the
table picks, per-window results -- are not counted, as everywhere in the
package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product
from typing import cast

import torch
import torch.nn.functional as F

from ._budget import BlockSize, Budget, budget_of
from ._compile import in_graph
from ._distributed import refuse as refuse_dtensors
from ._multi import several, split_outputs
from ._parse import Recipe, analyze, apply_recipe, check_operands
from ._plan import Kernel, Plan, Step, along_path, make_plan
from ._prepare import Optimize, budget_for
from ._semiring import Semiring

Tensor = torch.Tensor

WORD_BITS = 64
"""Booleans packed into one ``int64`` word."""

CPU_CHUNK_BYTES = 1 << 20
"""Cap on the bytes of a loop's temporaries on CPU (its accumulator stays in cache)."""

CPU_TABLE_BYTES = 1 << 22
"""Cap on the bytes of the table kernel's tables on CPU."""

DEVICE_CHUNK_BYTES = 1 << 28
"""Cap on the bytes of any temporary off CPU when ``block_size`` is an int."""

_BYTE_BITS = (1, 2, 4, 8, 16, 32, 64, 128)


def bool_einsum(
    equation: str,
    *operands: Tensor,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> Tensor:
    """Einsum in the boolean semiring: ``or`` over the summed indices, ``and`` of the operands.

    Each output cell is true when some assignment of the summed indices makes
    every operand entry true (reachability in a graph, say: ``ij,jk->ik``).
    The contraction runs on bits: the summed indices are packed 64 to an
    ``int64`` word and combined with bitwise ``&``, never through floating
    point.  Every equation form of the package is accepted (``...``,
    implicit output, repeated indices, size-1 broadcasting).  A summed index
    of size 0 gives False everywhere; an equation without summed indices
    gives the ``and`` of the broadcast operands.  Not differentiable (the
    result is boolean); works under :func:`torch.func.vmap` and
    :func:`torch.compile`.

    Args:
        equation: An einsum equation in :func:`torch.einsum` syntax.
        *operands: ``torch.bool`` tensors.
        block_size: A window extent (int): every summed index is cut at that
            extent; an :class:`AutomaticBlockSize`: a byte budget for the
            largest temporary; or ``None`` for the default budget.
        optimize: An opt_einsum strategy (``'auto'``, ``'greedy'``,
            ``'optimal'``, ...), an explicit path, or ``False`` to sum every
            index in one step over all operands.

    Returns:
        A new ``torch.bool`` tensor; for an equation with several
        comma-separated outputs, a tuple of them, computed together in one
        inside-outside pass (see :doc:`/structured`).

    Raises:
        TypeError: An operand is not a tensor, or not of dtype ``torch.bool``.
        EquationError: The equation is invalid or does not fit the operands
            (wrong operand count, rank or size mismatch, ...).
        ValueError: ``block_size`` is not positive.

    Example:
        >>> import torch
        >>> from semiring_einsum.func import bool_einsum
        >>> edges = torch.tensor([[False, True, False],
        ...                       [False, False, True],
        ...                       [False, False, False]])
        >>> bool_einsum("ij,jk->ik", edges, edges)  # paths of length two
        tensor([[False, False,  True],
                [False, False, False],
                [False, False, False]])
    """
    refuse_dtensors(operands, "bool_einsum")
    if split_outputs(equation) is not None:  # a tuple, typed as the common case
        return cast(Tensor, _several(equation, operands, block_size, optimize))
    check_operands(equation, operands)
    _check_bool(equation, operands)
    extent, nbytes = budget_for(block_size, operands, equation).as_ints()
    return _contract(equation, extent, nbytes, optimize, *operands)


def _any(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return x.any(dim=dims) if dims else x


_BOOLEAN = Semiring("bool", torch.logical_or, torch.logical_and, _any, 0, 1)
"""The semiring of :func:`bool_einsum`, for the inside-outside pass of several outputs."""


def _several(
    equation: str, operands: Sequence[Tensor], block_size: BlockSize, optimize: Optimize
) -> tuple[Tensor, ...]:
    """An equation with several outputs (see :mod:`._multi`), every step on the bit kernels."""

    def contract(_: Semiring, eq: str, ops: Sequence[Tensor]) -> Tensor:
        return cast(Tensor, bool_einsum(eq, *ops, block_size=block_size, optimize=optimize))

    def planner(_: Semiring, eq: str, ops: Sequence[Tensor]) -> Plan:
        recipe = analyze(eq, *check_operands(eq, ops))
        return _plan(eq, recipe, budget_for(block_size, ops, eq), optimize, ops)

    check_operands(equation, operands)
    _check_bool(equation, operands)
    return several(_BOOLEAN, equation, operands, contract, planner)


def _check_bool(equation: str, operands: Sequence[Tensor]) -> None:
    for k, x in enumerate(operands):
        if x.dtype != torch.bool:
            raise TypeError(
                f"bool_einsum needs torch.bool operands, but operand {k} has dtype "
                f"{x.dtype} (equation {equation!r})"
            )


def _plan(
    equation: str, recipe: Recipe, budget: Budget, optimize: Optimize, operands: Sequence[Tensor]
) -> Plan:
    """The boolean contraction's plan (one byte per element: packed words are smaller)."""
    return make_plan(
        equation,
        recipe.contraction,
        semiring="bool",
        joint=optimize is False,
        itemsize=1,
        budget=budget,
        optimize=optimize,
        device_type=operands[0].device.type if operands else "cpu",
    )


@in_graph
def _contract(
    equation: str, extent: int, nbytes: int, optimize: Optimize, *operands: Tensor
) -> Tensor:
    """Parse, plan and run a boolean contraction (one node for ``torch.compile``)."""
    budget = budget_of(extent, nbytes)
    recipe = analyze(equation, *check_operands(equation, operands))
    clean = apply_recipe(recipe, operands)
    device_type = operands[0].device.type if operands else "cpu"
    plan = _plan(equation, recipe, budget, optimize, operands)
    return along_path(
        plan.steps, clean, lambda _, step, ops: _run_step(step, ops, budget, device_type)
    )


def _run_step(step: Step, ops: Sequence[Tensor], budget: Budget, device_type: str) -> Tensor:
    """One step of the plan: its result, dims in ``step.output`` order."""
    size = step.size
    out_shape = [size[c] for c in step.output]
    summed = step.summed
    if any(size[c] == 0 for c in summed) or 0 in out_shape:
        return ops[0].new_zeros(out_shape)  # an empty sum, or no cells at all
    terms = list(step.inputs)
    xs = list(ops)
    fresh = len(xs) > 1
    # A summed index that only one operand has is or-reduced there first.
    for t, term in enumerate(step.inputs):
        others = "".join(u for k, u in enumerate(step.inputs) if k != t)
        private = tuple(d for d, c in enumerate(term) if c in summed and c not in others)
        if private:
            xs[t] = xs[t].any(dim=private)
            terms[t] = "".join(c for d, c in enumerate(term) if d not in private)
            fresh = True
    shared = "".join(c for c in summed if any(c in term for term in terms))
    if not shared:  # the and of the broadcast operands
        aligned = [_align(term, x, step.output) for term, x in zip(terms, xs)]
        out = aligned[0]
        for y in aligned[1:]:
            out = out & y
        if not fresh:  # a permuted view (or a diagonal) of an operand: copy it
            out = out.clone(memory_format=torch.contiguous_format)
        return out
    caps = _Caps.of(budget, device_type)
    if len(xs) == 2:
        kernel = _choose_kernel(terms, step.output, size, shared, budget, caps)
        if kernel is not WORDS:
            return _pair_step(terms, xs, step.output, size, shared, kernel is TABLES_SWAPPED, caps)
    order = step.output + shared
    aligned = [_align(term, x, order) for term, x in zip(terms, xs)]
    return _words_step(aligned, out_shape, [size[c] for c in shared], budget, caps)


def _align(term: str, x: Tensor, order: str) -> Tensor:
    """``x`` with its dims in ``order``, size 1 for the indices of ``order`` it lacks."""
    x = x.permute(sorted(range(len(term)), key=lambda d: order.index(term[d])))
    for d, c in enumerate(order):
        if c not in term:
            x = x.unsqueeze(d)
    return x


class _Caps:
    """Byte caps of a step's temporaries: ``chunk`` for the loops, ``table`` for tables."""

    __slots__ = ("chunk", "table")

    def __init__(self, chunk: int, table: int) -> None:
        self.chunk = chunk
        self.table = table

    @staticmethod
    def of(budget: Budget, device_type: str) -> _Caps:
        cpu = device_type == "cpu"
        if budget.bytes is None:  # an int block_size caps window extents, not bytes
            if cpu:
                return _Caps(CPU_CHUNK_BYTES, CPU_TABLE_BYTES)
            return _Caps(DEVICE_CHUNK_BYTES, DEVICE_CHUNK_BYTES)
        if cpu:
            return _Caps(min(budget.bytes, CPU_CHUNK_BYTES), min(budget.bytes, CPU_TABLE_BYTES))
        return _Caps(budget.bytes, budget.bytes)


# ---------------------------------------------------------------------------
# Packing


def _pack_bytes(x: Tensor) -> Tensor:
    """Booleans ``(..., S)`` as bytes ``(..., ceil(S / 8))``: boolean ``t`` of a byte is bit ``t``.

    The booleans (zero-padded to whole bytes) are read eight at a time as one
    int64 (one boolean per byte), and three shift-or steps gather the eight
    low bits of its bytes into its lowest byte.
    """
    s = x.shape[-1]
    nbytes = -(-s // 8)
    if nbytes * 8 != s:
        x = F.pad(x, (0, nbytes * 8 - s)).contiguous()
    else:  # a fresh copy: an operand's view may start off a word boundary
        x = x.clone(memory_format=torch.contiguous_format)
    w = x.view(torch.int64)
    w = w | (w >> 7)
    w = w | (w >> 14)
    w = w | (w >> 28)
    return (w & 0xFF).to(torch.uint8)


def _pack_words(x: Tensor) -> Tensor:
    """Booleans ``(..., S)`` as words ``(..., ceil(S / 64))``, int64, zero-padded.

    Which bit of a word stands for which boolean does not matter to the
    kernels, as long as every operand is packed alike; :func:`_unpack` reads
    words packed here back.
    """
    as_bytes = _pack_bytes(x)
    nbytes = as_bytes.shape[-1]
    words = -(-nbytes // 8)
    if words * 8 != nbytes:
        as_bytes = F.pad(as_bytes, (0, words * 8 - nbytes)).contiguous()
    return as_bytes.view(torch.int64)


def _unpack(packed: Tensor, cols: int, chunk_bytes: int) -> Tensor:
    """Words ``(rows, W)`` from :func:`_pack_words` back to booleans ``(rows, cols)``.

    In chunks of rows whose ``(rows, 64 W)`` byte temporaries hold at most
    ``chunk_bytes`` (one row at least).
    """
    rows, words = packed.shape
    step = min(rows, max(chunk_bytes // (64 * words), 1))
    bits = torch.tensor(_BYTE_BITS, dtype=torch.uint8, device=packed.device)
    parts = []
    for r in range(0, rows, step):
        as_bytes = packed[r : r + step].view(torch.uint8)
        spread = (as_bytes.unsqueeze(-1) & bits) != 0
        parts.append(spread.reshape(as_bytes.shape[0], 64 * words)[:, :cols])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _fold(x: Tensor) -> Tensor:
    """Or ``x`` (fresh, modified in place) over its first dim, halving."""
    n = x.shape[0]
    while n > 1:
        h = n // 2
        x[:h] |= x[n - h : n]
        n -= h
    return x[0]


# ---------------------------------------------------------------------------
# The word kernel: and the packed operands, test the words


def _words_step(
    aligned: Sequence[Tensor],
    out_shape: Sequence[int],
    sizes: Sequence[int],
    budget: Budget,
    caps: _Caps,
) -> Tensor:
    """Or over windows of the summed dims (trailing, of ``sizes``) of the packed ``&``."""
    q = len(out_shape)
    cells = [math.prod(x.shape[:q]) for x in aligned]
    extents = _summed_extents(sizes, max(cells), budget)
    result: Tensor | None = None
    starts = [range(0, n, e) for n, e in zip(sizes, extents)]
    for lows in product(*starts):
        window = [min(e, n - lo) for lo, e, n in zip(lows, extents, sizes)]
        packed = []
        for x in aligned:
            for d, (lo, w) in enumerate(zip(lows, window)):
                if x.shape[q + d] != 1:
                    x = x.narrow(q + d, lo, w)
            x = x.expand(*x.shape[:q], *window)  # an operand lacking a summed index
            words = _pack_words(x.reshape(*x.shape[:q], math.prod(window)))
            packed.append(words.movedim(-1, 0).contiguous())
        part = _and_any(packed, out_shape, caps.chunk)
        result = part if result is None else result | part
    assert result is not None
    return result


def _summed_extents(sizes: Sequence[int], cells: int, budget: Budget) -> list[int]:
    """Window extent of each summed dim.

    An int budget cuts every dim at that extent.  A byte budget keeps every
    operand's window (``cells`` output cells at most, times the window's
    terms as booleans padded to a whole byte, which is no less than packed)
    within the budget: inner dims whole first, an extent never below 1.
    """
    if budget.extent is not None:
        return [min(n, budget.extent) for n in sizes]
    assert budget.bytes is not None
    cap = budget.bytes

    def cost(terms: int) -> int:
        return cells * 8 * -(-terms // 8)

    extents = [1] * len(sizes)
    inner = 1
    for d in reversed(range(len(sizes))):
        n = sizes[d]
        if cost(inner * n) <= cap:
            extents[d] = n
            inner *= n
            continue
        e = min(n - 1, cap // max(cells * inner, 1))
        while e > 1 and cost(inner * e) > cap:
            e -= 1  # where the padding to a byte decides
        extents[d] = max(e, 1)
        break
    return extents


def _and_any(packed: Sequence[Tensor], out_shape: Sequence[int], chunk_bytes: int) -> Tensor:
    """Whether some word of the ``&`` of the packed operands is nonzero, per output cell.

    ``packed`` are ``(words, output dims...)`` tensors, size 1 along the
    output dims they lack.  The output is cut into chunks (trailing dims whole
    first) and the words into groups so that a chunk's ``&`` holds at most
    ``chunk_bytes`` (one word of one cell at least); each chunk or-accumulates
    its groups in place, folds the words of the accumulator and compares
    with zero.
    """
    q = len(out_shape)
    words = packed[0].shape[0]
    room = max(chunk_bytes // 8, 1)
    extents = [1] * q
    for d in reversed(range(q)):
        n = out_shape[d]
        if room >= n:
            extents[d] = n
            room //= n
        else:
            extents[d] = max(room, 1)
            break
    group = min(words, max(chunk_bytes // (8 * math.prod(extents)), 1))

    def chunk(ranges: list[tuple[int, int]]) -> Tensor:
        views = []
        for x in packed:
            for d, (lo, hi) in enumerate(ranges):
                if x.shape[1 + d] != 1 and hi - lo != x.shape[1 + d]:
                    x = x.narrow(1 + d, lo, hi - lo)
            views.append(x)
        acc: Tensor | None = None
        for w in range(0, words, group):
            part = views[0][w : w + group]
            for v in views[1:]:
                part = part & v[w : w + group]
            if acc is None:
                acc = part
            else:
                acc[: part.shape[0]] |= part
        assert acc is not None  # a packed step has two operands or more, one word or more
        return _fold(acc) != 0

    def assemble(d: int, ranges: list[tuple[int, int]]) -> Tensor:
        if d == q:
            return chunk(ranges)
        n, e = out_shape[d], extents[d]
        if e >= n:
            return assemble(d + 1, ranges + [(0, n)])
        parts = [assemble(d + 1, ranges + [(lo, min(lo + e, n))]) for lo in range(0, n, e)]
        return torch.cat(parts, dim=d)

    return assemble(0, [])


# ---------------------------------------------------------------------------
# The table kernel (the "method of the four Russians") for two operands


WORDS = Kernel(
    "boolean",
    "words",
    "packed 64-bit words: and the operands' words, test them (any number of operands)",
)
TABLES = Kernel(
    "boolean",
    "tables",
    "two operands: the four Russians' tables of the second operand's rows",
)
TABLES_SWAPPED = Kernel(
    "boolean",
    "tables_swapped",
    "two operands: the four Russians' tables of the first operand's rows",
)


def _choose_kernel(
    terms: Sequence[str],
    output: str,
    size: dict[str, int],
    shared: str,
    budget: Budget,
    caps: _Caps,
) -> Kernel:
    """:data:`WORDS`, :data:`TABLES` or :data:`TABLES_SWAPPED` for a two-operand step.

    By estimated cost in word operations (constants measured on CPU).  The
    tables need every summed index whole in one window (so not with an int
    ``block_size`` that cuts one) and room for at least one table.
    """
    ta, tb = terms
    if budget.extent is not None and any(size[c] > budget.extent for c in shared):
        return WORDS
    if caps.table < _TABLE_ENTRY_BYTES:
        return WORDS
    batch = math.prod(size[c] for c in output if c in ta and c in tb)
    left = math.prod(size[c] for c in output if c in ta and c not in tb)
    right = math.prod(size[c] for c in output if c in tb and c not in ta)
    terms_ = math.prod(size[c] for c in shared)
    words_cost = 2 * batch * left * right * -(-terms_ // WORD_BITS)
    groups = -(-terms_ // 8)

    def tables_cost(rows: int, cols: int) -> int:
        w = -(-cols // WORD_BITS)
        per = 8 * rows * groups * w + 2 * groups * 256 * w + 3 * rows * cols + rows * terms_ // 4
        return batch * per + _TABLE_OVERHEAD

    costs = (
        (words_cost, WORDS),
        (tables_cost(left, right), TABLES),
        (tables_cost(right, left), TABLES_SWAPPED),
    )
    return min(costs, key=lambda cost: cost[0])[1]


def _pair_step(
    terms: Sequence[str],
    xs: Sequence[Tensor],
    output: str,
    size: dict[str, int],
    shared: str,
    swap: bool,
    caps: _Caps,
) -> Tensor:
    """A two-operand step as a batch of boolean matrix products, on tables.

    The operands become matrices ``(batch, rows, terms)`` and ``(batch,
    terms, cols)`` (copies, input-sized); with ``swap`` the second operand
    gives the rows.
    """
    (ta, tb), (a, b) = terms, xs
    if swap:
        (ta, tb), (a, b) = (tb, ta), (b, a)
    batch = "".join(c for c in output if c in ta and c in tb)
    left = "".join(c for c in output if c in ta and c not in tb)
    right = "".join(c for c in output if c in tb and c not in ta)

    def matrix(term: str, x: Tensor, dims: Sequence[str]) -> Tensor:
        order = "".join(dims)
        x = x.permute(sorted(range(len(term)), key=lambda d: order.index(term[d])))
        return x.reshape([math.prod(size[c] for c in part) for part in dims])

    am = matrix(ta, a, (batch, left, shared))
    bm = matrix(tb, b, (batch, shared, right))
    out = _four_russians(am, bm, caps)
    layout = batch + left + right
    out = out.reshape([size[c] for c in layout])
    return out.permute([layout.index(c) for c in output])


_TABLE_ENTRY_BYTES = 256 * 8
"""Bytes of the smallest table: the 256 ors of 8 rows, one word wide."""

_TABLE_OVERHEAD = 200_000
"""Fixed cost of the table kernel, in word operations (its extra torch calls)."""


def _four_russians(a: Tensor, b: Tensor, caps: _Caps) -> Tensor:
    """Boolean matrix products ``(batch, rows, J) x (batch, J, cols) -> (batch, rows, cols)``.

    The rows of ``b`` are packed along ``cols`` into words and taken 8 at a
    time: a *table* holds, for each of the 256 subsets of the 8 rows, the or
    of those rows.  The 8 matching booleans of a row of ``a`` are one byte,
    which picks the table entry to or into the row's result, so one gather
    and one or settle 8 summed terms for 64 columns at once.  Tables are
    built for windows of words, groups of 8 rows and batch entries so that
    they hold at most ``caps.table`` bytes (one group of one word at least);
    the gathers run in chunks of ``caps.chunk`` bytes.
    """
    nbatch, rows, terms = a.shape
    cols = b.shape[2]
    groups = -(-terms // 8)
    words = -(-cols // WORD_BITS)
    per_word = caps.table // _TABLE_ENTRY_BYTES
    ww = min(words, max(per_word, 1))
    gw = min(groups, max(per_word // ww, 1))
    bw = min(nbatch, max(per_word // (ww * gw), 1))
    per_batch = []
    for b0 in range(0, nbatch, bw):
        b1 = min(nbatch, b0 + bw)
        per_word_window = []
        for w0 in range(0, words, ww):
            c0, c1 = w0 * WORD_BITS, min(cols, (w0 + ww) * WORD_BITS)
            acc: Tensor | None = None
            for g0 in range(0, groups, gw):
                j0, j1 = g0 * 8, min(terms, (g0 + gw) * 8)
                table = _tables(b[b0:b1, j0:j1, c0:c1])
                picks = _table_rows(a[b0:b1, :, j0:j1])
                part = _gather_or(table, picks, caps.chunk)
                acc = part if acc is None else acc | part
            assert acc is not None
            per_word_window.append(_unpack(acc, c1 - c0, caps.chunk))
        both = per_word_window[0] if len(per_word_window) == 1 else torch.cat(per_word_window, 1)
        per_batch.append(both.reshape(b1 - b0, rows, cols))
    return per_batch[0] if len(per_batch) == 1 else torch.cat(per_batch)


def _tables(b: Tensor) -> Tensor:
    """The tables of ``b`` ``(batch, J, cols)``: ``(batch * ceil(J/8) * 256, words)`` int64.

    Row ``(k * groups + g) * 256 + v`` is the or of the rows ``8 g + t`` of
    batch entry ``k`` over the bits ``t`` set in ``v`` (packed along cols);
    built by doubling, one row at a time.
    """
    nbatch, terms, _ = b.shape
    groups = -(-terms // 8)
    if groups * 8 != terms:
        b = F.pad(b, (0, 0, 0, groups * 8 - terms))
    packed = _pack_words(b)
    words = packed.shape[-1]
    rows = packed.reshape(nbatch, groups, 8, words)
    # new_empty, not torch.empty: under vmap the table is batched like the rows.
    table = rows.new_empty(nbatch, groups, 256, words)
    table[:, :, 0] = 0
    for t in range(8):
        half = 1 << t
        table[:, :, half : 2 * half] = table[:, :, :half] | rows[:, :, t : t + 1]
    return table.reshape(nbatch * groups * 256, words)


def _table_rows(a: Tensor) -> Tensor:
    """The table row that each row of ``a`` ``(batch, rows, J)`` picks, per group of 8.

    ``(groups, batch * rows)`` int64: as many bytes as ``a`` has booleans, give
    or take the padding to whole bytes.
    """
    nbatch, rows, _ = a.shape
    picks = _pack_bytes(a).to(torch.int64)  # (batch, rows, groups)
    groups = picks.shape[-1]
    first = torch.arange(nbatch * groups, dtype=torch.int64, device=a.device) * 256
    picks = picks + first.reshape(nbatch, 1, groups)
    return picks.permute(2, 0, 1).reshape(groups, nbatch * rows)


def _gather_or(table: Tensor, picks: Tensor, chunk_bytes: int) -> Tensor:
    """``out[r] = or over g of table[picks[g, r]]``: ``(rows, words)`` int64.

    In chunks of rows, each gathering as many groups at once as fit in
    ``chunk_bytes`` (one group of one row at least), folded and or-ed into
    the chunk's accumulator.
    """
    groups, rows = picks.shape
    words = table.shape[1]
    row_bytes = 8 * words
    step = min(rows, max(chunk_bytes // row_bytes, 1))
    at_once = min(groups, max(chunk_bytes // (step * row_bytes), 1))
    parts = []
    for r in range(0, rows, step):
        acc: Tensor | None = None
        for g in range(0, groups, at_once):
            sel = picks[g : g + at_once, r : r + step]
            got = table.index_select(0, sel.reshape(-1)).reshape(*sel.shape, words)
            got = _fold(got)
            if acc is None:
                acc = got
            else:
                acc |= got
        assert acc is not None
        parts.append(acc)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


__all__ = ["bool_einsum"]
