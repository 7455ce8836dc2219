"""The log semiring on BLAS: max-shifted exponentials around a real matmul, made exact.

For a step ``out = log Σ_s exp(A + B)`` whose summed indices ``s`` all appear
in both operands, shifting each operand by its own maximum over ``s`` gives

    out = mA + mB + log S,    S = Σ_s exp(A - mA) · exp(B - mB)

and ``S`` is a real einsum (BLAS).  Every factor is at most 1, so nothing
overflows; what can go wrong is underflow.  When the true largest term of a
cell sits far below ``mA + mB`` -- entries spread over 1e3 nats, or a row's
maximiser masked by -inf in the other operand -- every term of that cell can
underflow and ``S`` comes out 0 or denormal, with no precision left.

The check is a posteriori and costs nothing extra: if the computed
``S ≥ exp(-T)`` (``T`` = 40 in float32, 600 in float64) the cell is exact,
because any term damaged by underflow has a factor below the smallest normal
float (about ``exp(-87)`` in float32), so it is itself below that, and all
of them together are a relative ``count · exp(-(87 - T))`` of ``S``.  Cells
that fail the check (also those an all -inf row, an inf or a NaN touches:
their ``S`` is 0 or NaN) are recomputed exactly: in forward by a log-sum-exp over just
those cells' rows, in backward and forward mode through the blocked path on
a masked cotangent.  ``out - mA - mB = log S`` identifies the same cells
later.  The forward and the first-order backward run inside opaque operators
(:mod:`._ops`), so they may read values even under ``torch.compile``; the
differentiable derivatives (:func:`vjp_exact`, :func:`jvp_exact`) read values
only for plain operands, and otherwise take the blocked path, exact too.
An operand whose summed indices are scattered among its dims is first copied
into a layout with them last (:attr:`Program.perm_a`).  A product whose second
operand is narrow (few free elements: the stack RNN's POP step has 2) runs as
one matmul with its operands swapped, its first operand laid out as that
matmul's right one (see :func:`_narrow`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import _kernels as K
from ._cache import cached
from ._kernels import einsum_letters, einsum_product
from ._native import certified_dead, dense
from ._plan import Step

Tensor = torch.Tensor

# A cell is safe when its gap bound is at most this: the largest shifted term
# is then at least exp(-threshold), far above the dtype's smallest normal, so
# underflow of smaller terms costs at most a relative exp(-(87 - 40)) (float32).
_THRESHOLD = {torch.float64: 600.0}
_DEFAULT_THRESHOLD = 40.0


def applicable(step: Step) -> bool:
    """Whether the step has two operands that share every summed index."""
    if len(step.inputs) != 2 or not step.windows:
        return False
    a, b = step.inputs
    return all(c in a and c in b for c in step.summed)


@dataclass(frozen=True, slots=True)
class Program:
    """What :func:`forward` needs that depends only on the step, worked out once.

    Attributes:
        step: The step.
        dims_a: Dims of the first operand holding the summed indices.
        dims_b: The same for the second operand.
        product: The real product of the two shifted operands (a matmul when
            the layout allows).
        view_a: How the first operand's keepdim maximum lines up with the
            output (see :func:`_broadcast_plan`).
        view_b: The same for the second operand.
        chunk_elements: Elements per chunk of the exact fix-up.
        back_a: The product ``(output, B) -> A`` of the backward.
        back_b: The product ``(A, output) -> B`` of the backward.
        save_a: Whether the forward keeps ``exp(A - mA)`` for the backward
            (when it is no bigger than the output) rather than ``mA``.
        save_b: The same for the second operand.
        perm_a: The layout the first operand is copied into before anything
            else, or ``None`` to use it as it is (see :func:`_layout`); ``step``
            and everything above are then about the copied layout.
        perm_b: The same for the second operand.
    """

    step: Step
    dims_a: tuple[int, ...]
    dims_b: tuple[int, ...]
    product: Callable[[Tensor, Tensor], Tensor]
    view_a: tuple[tuple[int, ...], tuple[int, ...]] | None
    view_b: tuple[tuple[int, ...], tuple[int, ...]] | None
    chunk_elements: int
    back_a: Callable[[Tensor, Tensor], Tensor]
    back_b: Callable[[Tensor, Tensor], Tensor]
    save_a: bool
    save_b: bool
    perm_a: tuple[int, ...] | None = None
    perm_b: tuple[int, ...] | None = None


# An operand this big whose summed indices are scattered through its dims (not
# one run of adjacent dims) is copied into a layout with them last: the maximum
# over them then reduces contiguous rows, the shift and exp run in place on the
# copy, and the product needs no copy of its own (torch.einsum would make one).
# Measured on a 7-index operand of 2.2M elements with two summed indices in the
# middle: 6.2 ms -> about 2 ms, most of it strided amax before.  One run of
# adjacent summed dims (a matmul's operands) reduces fast where it is.
# The right operand of a narrow product (see _narrow) is laid out as torch.einsum
# reads a right operand instead: batch, summed, its own indices.  The maximum then
# reduces over outer dims with a long contiguous row inside, faster still (the
# stack RNN's POP operand at t=30: 0.28 -> 0.09 ms).
_RELAYOUT_MIN_ELEMENTS = 1 << 16

# A product whose right operand has fewer free elements than this (and whose left has
# more) runs with its operands swapped: BLAS is slow on a thin right matrix (the POP
# step at t=30, (30, 174, 58) @ (30, 58, 2): 0.55 ms; swapped, 0.10 ms).
_NARROW = 16


def _layout(
    term: str, summed: str, numel: int, right: tuple[str, str] | None = None
) -> tuple[int, ...] | None:
    """The permutation putting ``term``'s summed indices last, where it pays; or, given
    ``right = (batch, own)`` (``term``'s output indices in both operands, and in it
    alone), the one into ``batch + summed + own``: a product's right operand."""
    if numel < _RELAYOUT_MIN_ELEMENTS:
        return None
    positions = [term.index(c) for c in summed]
    if right is not None:
        perm = tuple(term.index(c) for c in right[0] + summed + right[1])
        return None if perm == tuple(range(len(term))) else perm
    block = sorted(positions)
    if block == list(range(block[0], block[0] + len(block))):  # adjacent
        return None
    keep = [d for d, c in enumerate(term) if c not in summed]
    return tuple(keep + positions)


def _groups(ta: str, tb: str, out: str) -> tuple[str, str, str]:
    """The output's indices in both operands, in the first alone, in the second alone."""
    return (
        "".join(c for c in out if c in ta and c in tb),
        "".join(c for c in out if c in ta and c not in tb),
        "".join(c for c in out if c in tb and c not in ta),
    )


def _narrow(step: Step) -> bool:
    """Whether the product runs swapped: the second operand's own output indices hold
    fewer than :data:`_NARROW` elements, and the first operand's more."""
    ta, tb = step.inputs
    _, own_a, own_b = _groups(ta, tb, step.output)
    size = step.size
    n_a, n_b = (math.prod(size[c] for c in own) for own in (own_a, own_b))
    return n_b < _NARROW and n_a > n_b


@cached(maxsize=4096)
def program(step: Step) -> Program | None:
    """The step's :class:`Program`, or ``None`` when it cannot run on BLAS."""
    if not applicable(step):
        return None
    ta, tb = step.inputs
    summed, out = step.summed, step.output
    swap = _narrow(step)
    if swap:  # the first operand is the product's right one
        batch, own, _ = _groups(ta, tb, out)
        perm_a = _layout(ta, summed, _numel(step, ta), right=(batch, own))
        perm_b = None
    else:
        perm_a = _layout(ta, summed, _numel(step, ta))
        perm_b = _layout(tb, summed, _numel(step, tb))
    if perm_a is None and perm_b is None:
        return _program(step, swap)
    relaid = Step(
        step.operands,
        (
            "".join(ta[d] for d in perm_a) if perm_a else ta,
            "".join(tb[d] for d in perm_b) if perm_b else tb,
        ),
        step.output,
        step.sizes,
        step.windows,
        step.kernel,
    )
    return replace(_program(relaid, swap), perm_a=perm_a, perm_b=perm_b)


class _Swapped:
    """A narrow product (see :func:`_narrow`) as one batched matmul with the operands
    swapped: ``y`` (the step's second operand) viewed as ``(batch, own, summed)``
    rows, ``x`` as ``(batch, summed, own)`` columns (views where their layouts allow:
    see :func:`_layout`), the result a permuted view.  (torch.einsum would pick the
    slow orientation itself.)  Operands of other shapes (broadcast) go to einsum."""

    __slots__ = ("perm_x", "perm_y", "full_x", "full_y", "mat_x", "mat_y", "grid", "order", "other")

    def __init__(self, tx: str, ty: str, out: str, summed: str, size: dict[str, int]) -> None:
        batch, own_x, own_y = _groups(tx, ty, out)
        self.perm_x = tuple(tx.index(c) for c in batch + summed + own_x)
        self.perm_y = tuple(ty.index(c) for c in batch + own_y + summed)
        self.full_x = tuple(size[c] for c in tx)
        self.full_y = tuple(size[c] for c in ty)
        nb, k = (math.prod(size[c] for c in g) for g in (batch, summed))
        m, n = (math.prod(size[c] for c in g) for g in (own_y, own_x))
        self.mat_x, self.mat_y = (nb, k, n), (nb, m, k)
        grid = batch + own_y + own_x
        self.grid = tuple(size[c] for c in grid)
        self.order = tuple(grid.index(c) for c in out)
        self.other = einsum_product((tx, ty), out)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != self.full_x or y.shape != self.full_y:
            return self.other(x, y)
        xm = x.permute(self.perm_x).reshape(self.mat_x)
        ym = y.permute(self.perm_y).reshape(self.mat_y)
        return torch.bmm(ym, xm).view(self.grid).permute(self.order)


def _program(step: Step, swap: bool = False) -> Program:
    ta, tb = step.inputs
    summed, out = step.summed, step.output
    return Program(
        step,
        tuple(ta.index(c) for c in summed),
        tuple(tb.index(c) for c in summed),
        _Swapped(ta, tb, out, summed, step.size) if swap else einsum_product(step.inputs, out),
        _broadcast_plan(ta, summed, out),
        _broadcast_plan(tb, summed, out),
        max(1, step.window_elements),  # the exact fix-up keeps within the plan's bound
        einsum_product((out, tb), ta),
        einsum_product((ta, out), tb),
        # Residuals bigger than the output (an HMM's transition matrix next
        # to a batch of state vectors) are recomputed instead: what a step
        # keeps for its backward stays within a few output-sized tensors.
        _numel(step, ta) <= _numel(step, out),
        _numel(step, tb) <= _numel(step, out),
    )


def _numel(step: Step, letters: str) -> int:
    size = step.size
    return math.prod(size[c] for c in letters)


@dataclass
class Shifted:
    """The shifted operands and their shifts."""

    ea: Tensor  # exp(A - mA), A's layout
    eb: Tensor
    shift: Tensor  # mA + mB in output layout (broadcastable); 0 where not finite


def shift(step: Step, a: Tensor, b: Tensor, inplace: bool = False) -> Shifted:
    """Shift both operands by their maxima over the summed indices.

    A non-finite maximum (a row of -inf, an inf, a NaN) shifts by 0 instead;
    the cells it touches then fail the certificate and are recomputed.
    """
    ta, tb = step.inputs
    summed = step.summed
    keep_a = "".join(c for c in ta if c not in summed)
    keep_b = "".join(c for c in tb if c not in summed)
    dims_a = tuple(ta.index(c) for c in summed)
    dims_b = tuple(tb.index(c) for c in summed)
    ma = torch.nan_to_num(a.amax(dims_a, keepdim=True), nan=0.0, posinf=0.0, neginf=0.0)
    mb = torch.nan_to_num(b.amax(dims_b, keepdim=True), nan=0.0, posinf=0.0, neginf=0.0)
    out = step.output
    total = K.laid_out(ma.squeeze(dims_a), keep_a, out) + K.laid_out(
        mb.squeeze(dims_b), keep_b, out
    )
    if inplace:  # fewer fresh allocations (forward only: not differentiated)
        return Shifted(_exp(a - ma), _exp(b - mb), total)
    return Shifted(_exp(a - ma, inplace=False), _exp(b - mb, inplace=False), total)


def risky(log_sum: Tensor) -> Tensor | None:
    """Cells whose ``log S`` is not certifiably exact, or ``None`` if there are none.

    Only the lower side needs a test.  With finite maxima every shifted
    factor is at most 1, so ``S`` is at most the number of terms; a
    non-finite maximum (or an inf or NaN operand) leaves NaN in its cells,
    and NaN fails the test, as does ``log 0 = -inf``.
    """
    if not log_sum.numel() or _certified(log_sum.detach()):
        return None
    return ~(log_sum >= _bound(log_sum.dtype))


def _bound(dtype: torch.dtype) -> float:
    """The certificate's bound on ``log S``: ``-T`` (see the module's docstring)."""
    return -_THRESHOLD.get(dtype, _DEFAULT_THRESHOLD)


def _certified(log_sum: Tensor) -> bool:
    """Whether every cell of a non-empty ``log_sum`` passes the certificate: one
    reduction (amin propagates NaN, which fails the comparison)."""
    return float(log_sum.amin()) >= _bound(log_sum.dtype)


def _broadcast_plan(
    term: str, summed: str, out: str
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """How a keepdim reduction of an operand over ``summed`` lines up with ``out``.

    ``None`` when it broadcasts against the output as it is (same rank, and
    every dim holds the output's index or a reduced size-1 one).  Otherwise
    ``(perm, take)``: permute the kept dims into output order (reduced dims
    last), then reshape to ``out``'s rank, taking dim ``take[d]`` of the
    operand's sizes, or 1 where ``take[d]`` is -1.
    """
    if len(term) == len(out) and all(c == o or c in summed for c, o in zip(term, out)):
        return None
    kept = [c for c in out if c in term]
    perm = tuple(term.index(c) for c in kept) + tuple(d for d, c in enumerate(term) if c in summed)
    take = tuple(term.index(c) if c in term else -1 for c in out)
    return perm, take


def lined_up(m: Tensor, plan: tuple[tuple[int, ...], tuple[int, ...]]) -> Tensor:
    """A keepdim maximum as a view broadcastable to the output (see :func:`_broadcast_plan`)."""
    perm, take = plan
    return m.permute(perm).reshape([m.shape[d] if d >= 0 else 1 for d in take])


def _laid_out(x: Tensor, perm: tuple[int, ...] | None) -> tuple[Tensor, bool]:
    """``x`` in the program's layout, and whether that is a fresh copy of ours."""
    if perm is None:
        return x, False
    return dense(x.permute(perm)), True


def forward(prog: Program, a_in: Tensor, b_in: Tensor) -> tuple[Any, ...] | None:
    """The step's output: BLAS, with an exact log-sum-exp at the cells that need it.

    Returns ``(out, exp(A - mA) or mA, exp(B - mB) or mB, S, dead)`` when every
    cell passed the certificate or is all -inf (what a first-order backward needs, see
    :func:`vjp_certified`; each exponential is kept only where the program says so;
    ``dead``: whether cells may be all -inf), ``(out,)`` when some cells were recomputed,
    and ``None`` when most cells are at risk (adversarial inputs): the
    caller's blocked path is then cheaper than gathering every cell's rows.
    Written with as few torch calls (and Python calls) as possible: on small
    and medium steps their fixed cost, not the arithmetic, dominates.  The
    residuals are in the program's layout (see :attr:`Program.perm_a`).
    """
    a, own_a = (a_in, False) if prog.perm_a is None else _laid_out(a_in, prog.perm_a)
    b, own_b = (b_in, False) if prog.perm_b is None else _laid_out(b_in, prog.perm_b)
    ma = a.amax(prog.dims_a, keepdim=True)
    mb = b.amax(prog.dims_b, keepdim=True)
    # A row of -inf shifts by 0 (zeros, whose cells' sum is 0 and log -inf: exact, as
    # residuals too); a tiny operand's by -inf (one call less), a row of NaN cleared
    # below if need be.  A row holding +inf or NaN shifts by that, and turns
    # its cells NaN, which fail the certificate below and are recomputed exactly.
    ea, sa, clean_a = _shifted_exp(a, ma, own_a)
    eb, sb, clean_b = _shifted_exp(b, mb, own_b)
    product = prog.product(ea, eb)
    log_sum = torch.log(product)
    mask, dead = None, False
    # One reduction in the common case.
    if product.numel() and not _certified(log_sum):
        # Cells at risk, except those whose terms are all -inf (exact as they are): a
        # row of -inf meeting one without +inf or NaN, where the sum of the two row
        # maxima is -inf (masked states; the stack RNN's triangle of gamma).  The usual
        # case, only such cells below the bound, is one native walk (certified_dead).
        # Otherwise (or without the library) such cells are set to +inf and the
        # certificate taken again, in log_sum's layout, which may be a permuted
        # product's (2x faster than letting the broadcast sum pick its own).
        lined_a, lined_b = _lined(ma, prog.view_a), _lined(mb, prog.view_b)
        dead = True
        if not certified_dead(log_sum, lined_a, lined_b, _bound(log_sum.dtype)):
            maxima = torch.add(lined_a, lined_b, out=torch.empty_like(log_sum))
            mask = risky(torch.where(torch.isneginf(maxima), math.inf, log_sum))
            if mask is not None and int(mask.count_nonzero()) > mask.numel() // 4:
                return None
    # log_sum is fresh (torch.log of a product), so it is ours to modify.
    result = log_sum.add_(_lined(sa, prog.view_a)).add_(_lined(sb, prog.view_b))
    if (dead or mask is not None) and not (clean_a and clean_b):
        # A tiny operand's rows of -inf are NaN, and so are their cells, all -inf:
        # every other cell is finite (it passed the certificate) or in the mask.
        inf = math.inf
        result.nan_to_num_(nan=-inf, posinf=inf, neginf=-inf)
        if mask is None:  # the residuals: such rows as zeros shifted by 0 (their cells'
            # sums stay NaN: vjp_certified gives all -inf cells a weight of 0 by mask)
            if not clean_a:
                ea, sa = _cleared(ea, sa)
            if not clean_b:
                eb, sb = _cleared(eb, sb)
    if mask is None:
        # (An empty output certifies nothing: its operands may hold NaN rows.)
        if not product.numel():
            return (result,)
        ra, rb = ea if prog.save_a else sa, eb if prog.save_b else sb
        return result, ra, rb, product, dead
    # The copies were shifted in place: the fix-up reads the operands anew.
    a = _laid_out(a_in, prog.perm_a)[0] if own_a else a
    b = _laid_out(b_in, prog.perm_b)[0] if own_b else b
    return (_fix_cells(prog.step, a, b, result, mask, prog.chunk_elements),)


# exp() of -inf, NaN, or of arguments whose result is subnormal or 0, runs several times
# slower than of ordinary ones on CPUs (a scalar fallback: exp of half -inf entries 5x,
# of -100 20x); exp2() has no such path and is faster anyway (282k float32 entries, one
# thread: exp 0.29 ms finite, 1.43 ms half -inf; exp2 0.15 ms either way).  So
# exp(z) = exp2(z * log2(e)).  The product rounds z's exponent by about |z| * eps, a
# relative error of exp(z) of that size: a sum of exp(z_i) <= 1 (shifted by the maximum)
# is off by at most max |z| e^z * eps * ln 2 < 0.3 eps relative, as exact as exp's.
_LOG2E = 1.4426950408889634


# Tensors under this many elements take exp() itself: one call instead of two costs
# more than exp2 saves there.
_EXP2_MIN_ELEMENTS = 1 << 15


def _exp(shifted: Tensor, inplace: bool = True) -> Tensor:
    """``exp(shifted)`` (through exp2 where big); in place on ``shifted`` (fresh, ours)
    unless ``inplace`` is false (then differentiable)."""
    if shifted.numel() < _EXP2_MIN_ELEMENTS:
        return shifted.exp_() if inplace else torch.exp(shifted)
    if inplace:
        return shifted.mul_(_LOG2E).exp2_()
    return torch.exp2(shifted * _LOG2E)


def _shifted_exp(x: Tensor, m: Tensor, own: bool) -> tuple[Tensor, Tensor, bool]:
    """``exp(x - shift)`` (see :func:`_exp`), the shift, and whether rows of -inf
    shifted by 0.

    The shift is the row maximum ``m``, except that an operand's rows of -inf shift
    by 0 (zeros, not NaN, where the cells of such rows are all -inf); a tiny
    one's (see :data:`_CLEAN_SHIFT_MIN_ELEMENTS`) shift by -inf and are NaN,
    cleared by :func:`_cleared` if need be.
    """
    if x.numel() < _CLEAN_SHIFT_MIN_ELEMENTS:
        return (x.sub_(m) if own else x - m).exp_(), m, False
    shift = torch.nan_to_num(m, nan=math.nan, posinf=math.inf, neginf=0.0)
    return _exp(x.sub_(shift) if own else x - shift), shift, True


# Operands under this many elements shift rows of -inf by -inf (one call less: on tiny
# calls that call is a tenth of the step); from here, by 0, which spares a step with
# such rows (the stack RNN's POP, 3,480 elements) three repairs of its NaN.
_CLEAN_SHIFT_MIN_ELEMENTS = 1 << 10


def _cleared(e: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """A certified tiny operand's residuals with its rows of -inf (NaN, shifted by
    -inf: nothing else is NaN or -inf there) as zeros shifted by 0 (in place: ours)."""
    inf = math.inf
    return e.nan_to_num_(nan=0.0, posinf=inf, neginf=-inf), shift.nan_to_num_(
        nan=math.nan, posinf=inf, neginf=0.0
    )


def _lined(m: Tensor, view: tuple[tuple[int, ...], tuple[int, ...]] | None) -> Tensor:
    """A keepdim maximum as it broadcasts against the output."""
    return m if view is None else lined_up(m, view)


def vjp_certified(
    step: Step,
    neg_inf: K.NegInf,
    a: Tensor,
    b: Tensor,
    out: Tensor,
    res_a: Tensor,
    res_b: Tensor,
    product: Tensor,
    g: Tensor,
    needs: Sequence[bool],
    dead: bool,
) -> list[Tensor | None]:
    """First-order gradients of a certified forward (see :func:`forward`).

    With ``dead``, some cells are all -inf (their sum of exponentials is 0):
    they take no part in the BLAS products and send their policy's gradient
    in closed form (:func:`_dead_cells`).
    """
    prog = program(step)
    assert prog is not None
    if not dead:
        return vjp_from_residuals(prog, a, b, res_a, res_b, product, g, needs)
    cells = torch.isneginf(out)
    # Their sum is 0: each cell's weight g / S is 0 there, whatever g holds.
    w = torch.where(cells, 0.0, g / product)
    grads = vjp_from_residuals(prog, a, b, res_a, res_b, None, w, needs)
    g = K.used_cotangent(neg_inf, out, g)
    return _plus(grads, _dead_cells(step, neg_inf, (a, b), cells, g, needs))


def vjp_from_residuals(
    prog: Program,
    a: Tensor,
    b: Tensor,
    res_a: Tensor,
    res_b: Tensor,
    product: Tensor | None,
    g: Tensor,
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """First-order gradients from the forward's certified residuals.

    With ``product`` ``None``, ``g`` is already the per-cell weight ``g / S``.

    ``res_a`` is ``exp(A - mA)``, or ``mA`` where the program did not keep
    the exponential (it is then recomputed, without the maxima or the
    certificate).

    ``∂out/∂A[.., s] · g = exp(A - mA) · Σ exp(B - mB) · g / S``.  Every cell
    passed the certificate, so ``S`` is positive and finite and both operands
    are free of inf and NaN.  The residuals are constants, so the result must
    not be differentiated again (the caller checks).
    """
    ea = res_a if prog.save_a else _exp(_laid_out(a, prog.perm_a)[0] - res_a)
    eb = res_b if prog.save_b else _exp(_laid_out(b, prog.perm_b)[0] - res_b)
    w = g if product is None else g / product
    grad_a = _restored(ea * prog.back_a(w, eb), prog.perm_a) if needs[0] else None
    grad_b = _restored(eb * prog.back_b(ea, w), prog.perm_b) if needs[1] else None
    return [grad_a, grad_b]


def _restored(x: Tensor, perm: tuple[int, ...] | None) -> Tensor:
    """A gradient in the program's layout, back in its operand's layout (a view)."""
    if perm is None:
        return x
    inverse = [0] * len(perm)
    for d, p in enumerate(perm):
        inverse[p] = d
    return x.permute(inverse)


def _fix_cells(
    step: Step, a: Tensor, b: Tensor, out: Tensor, unsafe: Tensor, chunk_elements: int
) -> Tensor:
    """Recompute the unsafe cells exactly: log-sum-exp over their own rows only."""
    ta, tb = step.inputs
    summed = step.summed
    outs = step.output
    keep_a = "".join(c for c in ta if c not in summed)
    keep_b = "".join(c for c in tb if c not in summed)
    fa = K.laid_out(a, ta, keep_a + summed).flatten(len(keep_a))
    fb = K.laid_out(b, tb, keep_b + summed).flatten(len(keep_b))
    if out.dim() == 0:  # one cell: both operands are single rows
        return torch.logsumexp(fa + fb, dim=-1)
    cells = unsafe.nonzero(as_tuple=True)
    ia = tuple(cells[outs.index(c)] for c in keep_a)
    ib = tuple(cells[outs.index(c)] for c in keep_b)
    count = cells[0].numel()
    per = max(1, chunk_elements // max(fa.shape[-1], 1))
    values = []
    for lo in range(0, count, per):
        n = min(per, count - lo)
        rows_a = fa[tuple(i[lo : lo + n] for i in ia)] if ia else fa.expand(n, -1)
        rows_b = fb[tuple(i[lo : lo + n] for i in ib)] if ib else fb.expand(n, -1)
        values.append(torch.logsumexp(rows_a + rows_b, dim=-1))
    return out.index_put(cells, torch.cat(values))


def _weights(step: Step, sh: Shifted, out: Tensor) -> tuple[Tensor, Tensor | None]:
    """``exp(mA + mB - out) = 1/S`` per cell (0 at risky cells), and the risky mask."""
    log_sum = out - sh.shift
    mask = risky(log_sum)
    if mask is None:
        return torch.exp(-log_sum), None
    return torch.where(mask, 0.0, torch.exp(-torch.where(mask, 0.0, log_sum))), mask


def backward_applicable(a: Tensor, b: Tensor) -> bool:
    """The BLAS backward needs operands without +inf or NaN (-inf is fine).

    With one of those in an operand, ``exp(B - mB)`` holds inf or NaN, and
    multiplying it by a risky cell's zero weight would spread NaN to cells
    that do not involve it; the blocked path keeps such cells apart.
    """
    return bool((a < math.inf).all()) and bool((b < math.inf).all())


def vjp(
    step: Step, a: Tensor, b: Tensor, out: Tensor, g: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients on the certified cells via BLAS, and the mask of cells left to the caller.

    ``∂out/∂A[.., s] · g = exp(A - mA) · Σ exp(B - mB) · g / S``.
    """
    sh = shift(step, a, b)
    ta, tb = step.inputs
    inverse, mask = _weights(step, sh, out)
    # A risky cell's share is the caller's: 0 here, even where its cotangent is NaN.
    w = g * inverse if mask is None else torch.where(mask, 0.0, g * inverse)
    grad_a = sh.ea * einsum_letters((step.output, tb), ta, w, sh.eb)
    grad_b = sh.eb * einsum_letters((step.output, ta), tb, w, sh.ea)
    return grad_a, grad_b, mask


def jvp(
    step: Step, a: Tensor, b: Tensor, out: Tensor, t_a: Tensor, t_b: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Tangent on the certified cells via BLAS, and the mask of cells left to the caller."""
    sh = shift(step, a, b)
    inverse, mask = _weights(step, sh, out)
    inputs = step.inputs
    t = einsum_letters(inputs, step.output, sh.ea * t_a, sh.eb) + einsum_letters(
        inputs, step.output, sh.ea, sh.eb * t_b
    )
    return t * inverse, mask


def vjp_exact(
    step: Step,
    neg_inf: K.NegInf,
    xs: Sequence[Tensor],
    out: Tensor,
    g: Tensor,
    needs: Sequence[bool],
    plain: bool,
) -> list[Tensor | None]:
    """The log step's vjp, exact and differentiable (out of place).

    With ``plain`` operands (values readable) of a BLAS step, certified cells
    go through BLAS, the cells whose terms are all -inf by their policy in
    closed form, and the few others (underflow) exactly from their own rows;
    otherwise the blocked path does every cell.
    """
    g = K.used_cotangent(neg_inf, out, g)
    blas = plain and applicable(step) and backward_applicable(xs[0], xs[1])
    if not blas:
        weights = K.log_weights(step, neg_inf, out)
        return K.pullback(step, xs, needs, lambda v, r: weights(v, r) * g)
    grad_a, grad_b, unsafe = vjp(step, xs[0], xs[1], out, g)
    grads: list[Tensor | None] = [grad_a, grad_b]
    if unsafe is not None:
        # Operands free of +inf and NaN: a cell is -inf exactly when all its terms are.
        dead = torch.isneginf(out)
        rest = unsafe & ~dead
        grads = _plus(grads, _dead_cells(step, neg_inf, xs, dead, g, needs))
        if bool(rest.any()):
            grads = _plus(grads, _cells_exactly(step, xs, out, g, rest, needs))
    return [gk if need else None for gk, need in zip(grads, needs, strict=True)]


def _plus(grads: Sequence[Tensor | None], more: Sequence[Tensor | None]) -> list[Tensor | None]:
    return [f if e is None or f is None else f + e for f, e in zip(grads, more, strict=True)]


def _dead_cells(
    step: Step,
    neg_inf: K.NegInf,
    xs: Sequence[Tensor],
    dead: Tensor,
    g: Tensor,
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """The gradients that the cells whose terms are all -inf send, in closed form.

    Every term of such a cell has the policy's weight ``c``, so an operand
    entry receives ``c`` times the sum of the cotangents of the dead cells it
    takes part in: the cotangent summed over the output indices the operand
    lacks, spread over the summed indices (each entry of a row is in one term
    per cell, as both operands hold every summed index).  Under the NaN policy
    those entries are NaN.  A user's weight 0 sends nothing (the cotangent was
    zeroed there by :func:`._kernels.used_cotangent`).
    """
    if neg_inf.ignores_cotangent:
        return [None, None]
    if not bool(dead.any()):
        return [None, None]
    out, size = step.output, step.size
    grads: list[Tensor | None] = []
    for term, x, need in zip(step.inputs, xs, needs):
        if not need:
            grads.append(None)
            continue
        lacks = tuple(d for d, c in enumerate(out) if c not in term)
        if neg_inf.is_nan:
            hit = dead.sum(lacks) if lacks else dead
            part = torch.where(hit > 0, math.nan, 0.0).to(g.dtype)
        else:
            part = torch.where(dead, g, 0.0)
            part = part.sum(lacks) if lacks else part
            part = part * neg_inf.dead_weight(step.terms)
        kept = "".join(c for c in out if c in term)
        part = K.laid_out(part, kept, term).expand([size[c] for c in term])
        grads.append(part.sum_to_size(x.shape))  # (a broadcast operand sums its terms)
    return grads


def _cells_exactly(
    step: Step, xs: Sequence[Tensor], out: Tensor, g: Tensor, cells: Tensor, needs: Sequence[bool]
) -> list[Tensor | None]:
    """The gradients that a few cells send, each from its own rows of the operands.

    For a cell ``o`` the weight of the term at summed position ``s`` is
    ``exp(A[o, s] + B[o, s] - out[o])``: computed on the gathered rows, in
    chunks within the plan's window bound, and added into each operand's rows.
    """
    ta, tb = step.inputs
    summed, outs = step.summed, step.output
    size = step.size
    ssum = math.prod(size[c] for c in summed)
    where = cells.nonzero(as_tuple=True)
    count = where[0].numel()
    flats, lines = [], []
    for term, x in zip((ta, tb), xs):
        keep = "".join(c for c in term if c not in summed)
        full = x.expand([size[c] for c in term])  # broadcast dims at their step size
        flats.append(K.laid_out(full, term, keep + summed).reshape(-1, ssum))
        line = torch.zeros((), dtype=torch.int64, device=x.device)
        for c in keep:  # the row of each cell
            line = line * size[c] + where[outs.index(c)]
        lines.append(line.expand(count))
    gw = g.expand(out.shape)[where]
    ow = out[where]
    per = max(1, step.window_elements // max(ssum, 1))
    acc: list[Tensor | None] = [None, None]
    for lo in range(0, count, per):
        hi = min(lo + per, count)
        ra = flats[0][lines[0][lo:hi]]
        rb = flats[1][lines[1][lo:hi]]
        w = torch.exp(ra + rb - ow[lo:hi, None]) * gw[lo:hi, None]
        for k in (0, 1):
            if needs[k]:
                piece = torch.zeros_like(flats[k]).index_add(0, lines[k][lo:hi], w)
                prev = acc[k]
                acc[k] = piece if prev is None else prev + piece
    grads: list[Tensor | None] = []
    for k, (term, x) in enumerate(zip((ta, tb), xs)):
        total = acc[k]
        if total is None:
            grads.append(None)
            continue
        order = "".join(c for c in term if c not in summed) + summed
        back = total.reshape([size[c] for c in order]).permute([order.index(c) for c in term])
        grads.append(back.sum_to_size(x.shape))  # (a broadcast operand sums its terms)
    return grads


def jvp_exact(
    step: Step,
    neg_inf: K.NegInf,
    xs: Sequence[Tensor],
    out: Tensor,
    ts: Sequence[Tensor],
    plain: bool,
) -> Tensor:
    """The log step's jvp, exact and differentiable (see :func:`vjp_exact`).

    Under a weight-0 policy an all -inf cell's tangent is 0, whatever the
    operands' tangents hold there (the transpose of :func:`vjp_exact` not
    using such a cell's cotangent).
    """
    if plain and applicable(step) and backward_applicable(xs[0], xs[1]):
        t, unsafe = jvp(step, xs[0], xs[1], out, ts[0], ts[1])
        if unsafe is not None:
            exact = K.tangent_sum(step, xs, ts, K.log_weights(step, neg_inf, out))
            t = torch.where(unsafe, exact, t)
    else:
        t = K.tangent_sum(step, xs, ts, K.log_weights(step, neg_inf, out))
    return K.used_cotangent(neg_inf, out, t)
