"""Exact samples from the log semiring: forward filtering, backward sampling.

``log_einsum`` sums, for every output cell, ``exp`` of one *term* per
assignment of the summed indices (the term being the sum of the operands'
entries at that assignment).  Normalised, those weights are a probability
distribution over the assignments; :func:`sample_einsum` draws from it.

The plan is the log einsum's own: its pairwise steps run forward once and every
intermediate (a table of partial log-sums) is kept.  Then the steps are walked
backwards.  When a step comes up, the values of all of its result's indices
are already fixed for every (cell, sample) row -- they are output indices, or
indices a later step summed and has already drawn -- and, given them, the
step's own summed indices follow the distribution whose log-weights are the sum
of the step's operands at those fixed values.  An operand that is an
intermediate stands for the log-sum over everything summed before it, so this
is the exact conditional.  The step's summed indices are drawn with the
Gumbel-max trick, jointly (a window of candidates per chunk of rows), or, for a
step summing several indices over many rows, one index at a time from marginal
tables that a log einsum of the step's operands computes; the earlier steps then
see the drawn values as fixed.  Nothing larger than an operand, an
intermediate, a budget-bounded marginal table, or one bounded window of
candidates is ever built.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from itertools import product

import torch

from . import _native as N
from ._autograd import apply
from ._budget import AutomaticBlockSize, BlockSize, Budget
from ._context import call_context
from ._distributed import refuse as refuse_dtensors
from ._engine import run
from ._multi import reject
from ._plan import CPU_WINDOW_TARGET_BYTES, Step, along_path, window_extents
from ._prepare import Optimize, Prepared, budget_for
from ._rules import LOG_FAMILY, LOG_RULE
from ._semiring import LOG

Tensor = torch.Tensor

_INDEX_BYTES = torch.int64.itemsize
_LETTERS = string.ascii_letters
# A step summing several indices draws them one at a time from marginal tables
# when its joint candidates (rows x summed assignments) are at least this many.
_MARGINALS_FROM = 1 << 15
# A tensor whose rows are not contiguous is copied into a contiguous table when it
# has at most this many times as many elements as the draw gathers from it.
_COPY_UP_TO = 1.0


def sample_einsum(
    equation: str,
    *log_operands: Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    block_size: BlockSize = None,
    optimize: Optimize = "auto",
) -> Tensor:
    """Draw assignments of the summed indices with probability ∝ exp(their term).

    For each output cell of ``log_einsum(equation, *log_operands)``, the
    assignments of the summed indices form a distribution in which an
    assignment's probability is proportional to ``exp`` of the sum of the
    operands' entries at it -- the terms :func:`log_einsum` adds up.  This draws
    ``num_samples`` independent, exact samples per cell (e.g. paths of an HMM
    given its observations, or trees of a CKY chart), without building the joint
    index space: the contraction runs forward along its plan keeping each
    intermediate, then the steps are walked backwards, each drawing its own
    summed indices given those already drawn (forward filtering, backward
    sampling).

    Memory: besides the operands, the kept intermediates, and index tensors of
    the result's size (one int64 per row and index), the temporaries are
    windows of candidates -- (a chunk of (cell, sample) rows) x (a window of one
    step's summed indices) -- and, for a step summing several indices, its
    marginal tables (plus, for fast row reads, a contiguous copy of an operand
    or intermediate no bigger than what the draw gathers from it).  With an
    :class:`AutomaticBlockSize` a window stays within the budget (on CPU, also
    within the few-MiB window target of the kernels) and a step's tables
    together within the budget, or the step draws jointly in windows instead;
    with an int ``block_size`` each summed index of a window is cut at that
    extent, the rows fill the CPU window target, and the tables stay within
    that target too.  Windows are combined exactly (a running Gumbel-max), so
    their sizes never change the distribution, only which random numbers are
    drawn.

    Randomness comes only from ``generator`` (torch's default generator when
    ``None``), so the same generator state, inputs and options give the same
    samples.  Sampling is not differentiable: operands that require grad are
    read detached.  It runs eagerly; under ``torch.func.vmap`` or
    ``torch.compile`` it is not supported (it draws from a generator and reads
    values).  float16 and bfloat16 operands are computed in float32.  Samples
    are exact up to the floating-point resolution of the compute dtype and of
    its uniform random numbers.

    Special cases: an output cell whose terms are all -inf (probability zero
    everywhere), or that has no terms at all (a summed index of size 0), gets
    rows of zeros.  An assignment with a -inf term is never drawn.  A NaN or
    +inf entry in any operand raises :class:`ValueError` (no distribution is
    defined).  With no summed index the result has shape
    ``output_shape + (num_samples, 0)``.

    Args:
        equation: An einsum equation in :func:`torch.einsum` syntax.
        *log_operands: Log-space (unnormalised log-probability) tensors.
        num_samples: Samples per output cell, a positive int.
        generator: The :class:`torch.Generator` to draw from, on the operands'
            device.
        block_size: A window extent (int), an :class:`AutomaticBlockSize`, or
            ``None`` for the default budget.
        optimize: opt_einsum strategy, explicit path, or ``False`` (one step
            over every operand: a joint draw over all summed indices, in
            windows).

    Returns:
        An int64 tensor of shape ``output_shape + (num_samples, k)``: row ``s``
        of a cell holds sample ``s``, the values of the ``k`` summed indices in
        the order :func:`viterbi_einsum` uses (order of first appearance;
        summed ``...`` dimensions where ``...`` stands).

    Raises:
        TypeError: ``num_samples`` is not an int, an operand is not a tensor or
            is not floating-point.
        ValueError: ``num_samples`` is not positive, an operand holds NaN or
            +inf, or the equation does not fit the operands
            (:class:`EquationError`).

    Example:
        >>> import torch
        >>> from semiring_einsum.func import sample_einsum
        >>> a, b = torch.randn(2, 3), torch.randn(3, 4)
        >>> sample_einsum("ab,bc->a", a, b, num_samples=5).shape  # 2 cells, 5 x (b, c)
        torch.Size([2, 5, 2])
        >>> ninf = float("-inf")
        >>> x = torch.tensor([[ninf, 0.0], [ninf, ninf]])  # only (i, j) = (0, 1) possible
        >>> sample_einsum("ij->", x, num_samples=3, generator=torch.Generator().manual_seed(0))
        tensor([[0, 1],
                [0, 1],
                [0, 1]])
    """
    refuse_dtensors(log_operands, "sample_einsum")
    reject(equation, "sample_einsum")
    _check_num_samples(num_samples, equation)
    if not log_operands:
        raise TypeError(f"sample_einsum needs at least one operand (equation {equation!r})")
    operands = [x.detach() if isinstance(x, Tensor) else x for x in log_operands]
    budget = budget_for(block_size, operands, equation)
    p = Prepared(LOG, LOG_FAMILY, equation, operands, budget, optimize)
    _check_values(operands, equation)
    size = p.contraction.size
    output = p.contraction.output
    summed = p.equation.summed
    out_shape = tuple(size[c] for c in output)
    cells = math.prod(out_shape)
    device = operands[0].device
    result_shape = out_shape + (num_samples, len(summed))
    if not summed or cells == 0 or any(size[c] == 0 for c in summed):
        # Nothing to draw, no cell, or only empty sums (documented as zeros).
        return torch.zeros(result_shape, dtype=torch.int64, device=device)

    with torch.no_grad():
        steps, log_z = _forward(p)
        rows = cells * num_samples
        known = _output_coordinates(output, size, num_samples, device)
        itemsize = p.compute_dtype.itemsize
        for step, args in reversed(steps):
            if step.windows:
                drawn = _draw_step(step, args, known, rows, generator, budget, itemsize)
                known.update(drawn)
        found = torch.stack([known[c] for c in summed], dim=-1)
        found = found.reshape(cells, num_samples, len(summed))
        dead = (log_z == -math.inf).reshape(cells, 1, 1)
        found = found.masked_fill(dead, 0)
    return found.reshape(result_shape)


def _check_num_samples(num_samples: object, equation: object) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(
            f"num_samples must be a positive int, got {type(num_samples).__name__} "
            f"(equation {equation!r})"
        )
    if num_samples <= 0:
        raise ValueError(
            f"num_samples must be a positive int, got {num_samples} (equation {equation!r})"
        )


def _check_values(operands: Sequence[Tensor], equation: str) -> None:
    """Refuse NaN and +inf: the weights would not form a distribution."""
    for k, x in enumerate(operands):
        if not x.numel():
            continue
        top = float(x.max())  # NaN if there is one
        if math.isnan(top) or top == math.inf:
            what = "NaN" if math.isnan(top) else "+inf"
            raise ValueError(
                f"operand {k} holds {what}: sampling needs log-weights in [-inf, +inf) "
                f"(equation {equation!r})"
            )


def _forward(p: Prepared) -> tuple[list[tuple[Step, list[Tensor]]], Tensor]:
    """Run the plan forward; every step with the operands it read, and the result."""
    ctx = call_context(p.operands)
    steps: list[tuple[Step, list[Tensor]]] = []

    def run(_: int, step: Step, args: list[Tensor]) -> Tensor:
        steps.append((step, args))
        return apply(LOG_RULE, p.spec(step), ctx, *args)[0]

    return steps, along_path(p.plan.steps, p.operands, run)


def _output_coordinates(
    output: str, size: dict[str, int], num_samples: int, device: torch.device
) -> dict[str, Tensor]:
    """Each output index's value on every row (rows: cells in row-major order, then samples)."""
    grid = [size[c] for c in output] + [num_samples]
    known: dict[str, Tensor] = {}
    for d, c in enumerate(output):
        view = [1] * len(grid)
        view[d] = size[c]
        known[c] = torch.arange(size[c], device=device).view(view).expand(grid).reshape(-1)
    return known


def _cap_bytes(budget: Budget, device_type: str) -> int:
    """Bytes one window of candidates may take (the kernels' cap, see ``window_extents``)."""
    if budget.bytes is None:
        return CPU_WINDOW_TARGET_BYTES
    if device_type == "cpu":
        return min(budget.bytes, CPU_WINDOW_TARGET_BYTES)
    return budget.bytes


def _draw_step(
    step: Step,
    args: Sequence[Tensor],
    known: dict[str, Tensor],
    rows: int,
    generator: torch.Generator | None,
    budget: Budget,
    itemsize: int,
) -> dict[str, Tensor]:
    """Draw the step's summed indices on every row: by blocks of exponentials where the
    step is a matrix product (:func:`_draw_blocks`), else through :func:`_draw_any`."""
    blocks = _draw_blocks(step, args, known, rows, generator, budget, itemsize)
    if blocks is not None:
        return blocks
    return _draw_any(step, args, known, rows, generator, budget, itemsize)


# A row whose block sums (exponentials shifted by the operands' maxima) add up to
# less than this is drawn exactly instead: its weights may have underflowed.
_SAFE_TOTAL = {torch.float32: 1e-20, torch.float64: 1e-200}


def _draw_blocks(
    step: Step,
    args: Sequence[Tensor],
    known: dict[str, Tensor],
    rows: int,
    generator: torch.Generator | None,
    budget: Budget,
    itemsize: int,
) -> dict[str, Tensor] | None:
    """Inverse-CDF draws of a matrix-product step, two uniforms per row, through BLAS.

    The step is ``c[t, i, j] = Σ_s a[t, i, s] b[t, s, j]`` in exponentials (the
    grouped form of :func:`._native.layout`, no library needed): with ``ea =
    exp(a - max_s a)`` and ``eb = exp(b - max_s b)``, the weight of ``s`` in cell
    ``(t, i, j)`` is ``ea[t, i, s] eb[t, s, j]`` up to the cell's constant.  The
    summed range is cut into blocks of about √n; one batched product gives every
    cell's block sums, a row draws its block from them and then ``s`` within the
    block from the block's own weights (a gather of ``ea`` and ``eb``).  That is
    exact: P(block) P(s | block) = weight / total.  Rows whose total is too small
    to trust (the maxima of ``a`` and ``b`` far apart: the weights underflowed)
    are drawn exactly by :func:`_draw_any`.  ``None`` where it does not apply: not
    a two-operand matrix product, or block sums over the budget.
    """
    lay = N.layout(step)
    if lay is None or len(args) != 2 or args[0].dtype not in _SAFE_TOTAL:
        return None
    a, b = args
    if lay.swap:
        a, b = b, a
    nb, m, kk, n = lay.dims
    width = max(1, math.isqrt(kk))
    nblk = -(-kk // width)
    if nb * nblk * m * n * itemsize > _table_cap(budget) or kk < 4:
        return None
    ga, gb = lay.a.grouped(a), lay.b.grouped(b)  # (nb, m, kk), (nb, kk, n)
    zero = torch.zeros((), dtype=ga.dtype, device=ga.device)
    ma, mb = ga.amax(2, keepdim=True), gb.amax(1, keepdim=True)
    ea = torch.exp(ga - torch.where(torch.isfinite(ma), ma, zero))
    eb = torch.exp(gb - torch.where(torch.isfinite(mb), mb, zero))
    pad = nblk * width - kk
    # Blocks of the summed range as rows of width entries (zero-padded: weight 0):
    # ea by (t, i, block), eb by (t, j, block), so that one row's block is one slice.
    pa = torch.nn.functional.pad(ea, (0, pad)).reshape(nb, m, nblk, width)
    pb = torch.nn.functional.pad(eb.transpose(1, 2), (0, pad)).reshape(nb, n, nblk, width)
    # Every cell's block sums, (nb, m, n, nblk), from one batched product.
    sums = torch.matmul(pa.transpose(1, 2), pb.permute(0, 2, 3, 1))
    sums = sums.permute(0, 2, 3, 1).contiguous()  # (a cell's block sums: one row)
    size = step.size
    device = ga.device

    def linear(group: str) -> Tensor:
        """Each row's position in a group of indices (row-major), one int64 per row."""
        at = torch.zeros((), dtype=torch.int64, device=device)
        for c in group:
            at = at * size[c] + known[c]
        return at.expand(rows)

    batch, rows_g, summed = lay.a.groups
    t, i, j = linear(batch), linear(rows_g), linear(lay.b.groups[2])
    u = torch.rand(rows, 2, generator=generator, device=device, dtype=ga.dtype)
    s_lin = N.draw_blocks(sums, pa, pb, (t, i, j), u, (m, n, nblk, width), _SAFE_TOTAL[ga.dtype])
    if s_lin is not None:  # the same draws, one loop per row in C
        risky = s_lin < 0
        s_lin = s_lin.clamp(min=0)
    else:
        s_lin, risky = _draw_rows(sums, pa, pb, (t, i, j), u, (m, n, nblk, width))
    drawn: dict[str, Tensor] = {}
    rest = s_lin
    for d, c in enumerate(reversed(summed)):  # (the first index: no remainder to take)
        drawn[c] = rest if d == len(summed) - 1 else rest % size[c]
        if d < len(summed) - 1:
            rest = rest // size[c]
    if bool(risky.any()):
        where = risky.nonzero().squeeze(-1)
        sub = {c: v[where] if v.numel() == rows else v for c, v in known.items()}
        exact = _draw_any(step, args, sub, len(where), generator, budget, itemsize)
        for c in summed:
            drawn[c] = drawn[c].index_put((where,), exact[c])
    return drawn


def _draw_rows(
    sums: Tensor,
    pa: Tensor,
    pb: Tensor,
    cells: tuple[Tensor, Tensor, Tensor],
    u: Tensor,
    shape: tuple[int, int, int, int],
) -> tuple[Tensor, Tensor]:
    """:func:`_draw_blocks`' per-row draws in torch: the drawn summed position of every row,
    and the rows to draw exactly instead (their weights may have underflowed)."""
    t, i, j = cells
    m, n, nblk, width = shape
    zero = torch.zeros((), dtype=sums.dtype, device=sums.device)
    # index_select of whole rows: much faster than advanced indexing.
    cdf = sums.reshape(-1, nblk).index_select(0, (t * m + i) * n + j).cumsum_(-1)
    total = cdf[:, -1]
    # Below the total (u < 1 may still round up to it): never past the last weight.
    target = torch.minimum(u[:, 0] * total, total.nextafter(zero))
    blk = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    blk = blk.clamp_(max=nblk - 1)
    weights = pa.reshape(-1, width).index_select(0, (t * m + i) * nblk + blk)
    weights = weights * pb.reshape(-1, width).index_select(0, (t * n + j) * nblk + blk)
    cdf2 = weights.cumsum_(-1)
    total2 = cdf2[:, -1]
    target2 = torch.minimum(u[:, 1] * total2, total2.nextafter(zero))
    pick = torch.searchsorted(cdf2, target2.unsqueeze(-1), right=True).squeeze(-1)
    s_lin = blk * width + pick.clamp_(max=width - 1)
    return s_lin, ~((total > _SAFE_TOTAL[sums.dtype]) & (total2 > 0))


def _draw_any(
    step: Step,
    args: Sequence[Tensor],
    known: dict[str, Tensor],
    rows: int,
    generator: torch.Generator | None,
    budget: Budget,
    itemsize: int,
) -> dict[str, Tensor]:
    """Draw the step's summed indices on every row, given the values in ``known``.

    One summed index, or few rows: one joint draw over the step's summed indices
    (:func:`_draw`).  Several summed indices and at least as many rows as the
    step has result cells: one index at a time, each from its marginal given the
    indices drawn before it -- a table over the result's indices and those
    indices, a log einsum of the step's operands (BLAS where it applies) --
    when the tables fit the budget.  Both are exact.
    """
    own = step.summed
    size = step.size
    out_cells = math.prod(size[c] for c in step.output)
    joint_terms = rows * math.prod(size[c] for c in own)
    order = sorted(own, key=lambda c: size[c])  # small tables first, the largest index last
    tables = sum(
        out_cells * math.prod(size[c] for c in order[: j + 1]) for j in range(len(own) - 1)
    )
    use_marginals = (
        len(own) >= 2
        and joint_terms >= _MARGINALS_FROM
        and out_cells <= rows
        and tables * itemsize <= _table_cap(budget)
        and len(step.size) <= len(_LETTERS)
    )
    if not use_marginals:
        return _draw(step.inputs, args, own, size, known, rows, generator, budget, itemsize)
    letter = dict(zip(step.size, _LETTERS))
    lhs = ",".join("".join(letter[c] for c in term) for term in step.inputs)
    block = _block_size(budget)
    drawn: dict[str, Tensor] = {}
    for j, c in enumerate(order[:-1]):
        # log Σ over the indices after c: the marginal of c given everything before it.
        term = step.output + "".join(order[: j + 1])
        rhs = "".join(letter[d] for d in term)
        table = run(LOG, f"{lhs}->{rhs}", args, block, "auto")
        drawn.update(
            _draw((term,), (table,), c, size, {**known, **drawn}, rows, generator, budget, itemsize)
        )
    last = order[-1]
    drawn.update(
        _draw(step.inputs, args, last, size, {**known, **drawn}, rows, generator, budget, itemsize)
    )
    return drawn


def _table_cap(budget: Budget) -> int:
    """Bytes the marginal tables of one step may take together."""
    return budget.bytes if budget.bytes is not None else CPU_WINDOW_TARGET_BYTES


def _block_size(budget: Budget) -> BlockSize:
    """The ``block_size`` that resolves to ``budget`` (for the marginal tables)."""
    if budget.extent is not None:
        return budget.extent
    assert budget.bytes is not None
    return AutomaticBlockSize(max_cpu_bytes=budget.bytes, max_cuda_bytes=budget.bytes)


def _draw(
    terms: Sequence[str],
    tensors: Sequence[Tensor],
    own: str,
    size: dict[str, int],
    known: dict[str, Tensor],
    rows: int,
    generator: torch.Generator | None,
    budget: Budget,
    itemsize: int,
) -> dict[str, Tensor]:
    """Draw the indices ``own`` on every row, ∝ exp(Σ of ``tensors`` at them and ``known``).

    Every other index of ``terms`` must be in ``known``.  Rows go in chunks and
    ``own`` in windows, so that one window of candidates (rows x window) stays
    within the cap; across windows a running Gumbel-max keeps the best.
    """
    device = tensors[0].device
    dtype = tensors[0].dtype
    cap = _cap_bytes(budget, device.type)
    # One row's window: the kernels' own sizing, for a window with no output dims.
    sizes = tuple((c, size[c]) for c in own)
    sized = window_extents(("".join(own),), "", sizes, budget, itemsize, device.type)
    extents = [w for _, w in sized]
    width = math.prod(extents)
    chunk = max(1, cap // max(itemsize * width, _INDEX_BYTES))
    # Each tensor as a view (row, *own): its known indices folded into one row
    # number per (cell, sample) row, so that the row's candidates are one
    # ``index_select``; an index of ``own`` that it lacks has size 1 (broadcast).
    # A tensor whose known indices lead contiguously is a contiguous table of
    # rows (fast to gather from); so is one no bigger than what the rows gather
    # from it, after a copy; any other is read through a strided view whose rows
    # start at every element (the row number is then the storage offset).
    layouts: list[tuple[Tensor, Tensor | None]] = []
    for term, x in zip(terms, tensors):
        fixed = [c for c in term if c not in own]
        present = [c for c in own if c in term]
        shape = [size[c] if c in term else 1 for c in own]
        stride = {c: x.stride(d) for d, c in enumerate(term)}
        xp = x.permute([term.index(c) for c in fixed + present])
        row = math.prod(size[c] for c in present)
        if not xp.is_contiguous() and xp.numel() <= rows * row * _COPY_UP_TO:
            xp = xp.contiguous()
            stride = {c: xp.stride(d) for d, c in enumerate(fixed + present)}
        if xp.is_contiguous():
            base = xp.reshape([-1] + shape)
            unit = {c: stride[c] // row for c in fixed}
        else:
            span = 1 + sum((size[c] - 1) * stride[c] for c in fixed)
            strides = [stride[c] if c in term else 0 for c in own]
            base = x.as_strided([span] + shape, [1] + strides, x.storage_offset())
            unit = {c: stride[c] for c in fixed}
        offsets: Tensor | None = None
        for c in fixed:
            part = known[c] if unit[c] == 1 else known[c] * unit[c]
            offsets = part if offsets is None else offsets + part
        layouts.append((base, offsets))
    axes = [
        [(lo, min(lo + w, size[c])) for lo in range(0, size[c], w)] for c, w in zip(own, extents)
    ]
    windows = list(product(*axes))
    tiny = torch.finfo(dtype).tiny
    drawn: list[list[Tensor]] = [[] for _ in own]
    for r0 in range(0, rows, chunk):
        m = min(chunk, rows - r0)
        best: Tensor | None = None
        coords: list[Tensor] = []
        for rng in windows:
            shape = [m] + [hi - lo for lo, hi in rng]
            # z = candidate - log(-log u): Gumbel-max.  u >= tiny keeps the noise
            # finite, so a -inf candidate never beats a finite one.
            z = torch.rand(shape, generator=generator, device=device, dtype=dtype)
            z.clamp_(min=tiny).log_().neg_().log_()
            for k, (base, offsets) in enumerate(layouts):
                piece = base
                for i, (lo, hi) in enumerate(rng):
                    if piece.shape[1 + i] != 1 and hi - lo != piece.shape[1 + i]:
                        piece = piece.narrow(1 + i, lo, hi - lo)
                if offsets is not None:
                    piece = piece.index_select(0, offsets[r0 : r0 + m])
                if k == 0:
                    torch.sub(piece, z, out=z)
                else:
                    z.add_(piece)
            value, flat = z.reshape(m, -1).max(-1)
            here = _unravel(flat, shape[1:], [lo for lo, _ in rng])
            if best is None:
                best, coords = value, here
            else:
                better = value > best
                best = torch.where(better, value, best)
                coords = [torch.where(better, new, old) for new, old in zip(here, coords)]
        for j, coord in enumerate(coords):
            drawn[j].append(coord)
    return {c: parts[0] if len(parts) == 1 else torch.cat(parts) for c, parts in zip(own, drawn)}


def _unravel(flat: Tensor, extents: Sequence[int], starts: Sequence[int]) -> list[Tensor]:
    """Row-major positions inside a window to one coordinate per index (offset by ``starts``)."""
    coords: list[Tensor] = []
    rest = flat
    for i in reversed(range(len(extents))):
        n, lo = extents[i], starts[i]
        if i == 0:  # the outermost: what is left is the coordinate (flat < the window's size)
            coord = rest
        else:
            coord = rest % n
            rest = rest // n
        coords.append(coord + lo if lo else coord)
    coords.reverse()
    return coords


__all__ = ["sample_einsum"]
