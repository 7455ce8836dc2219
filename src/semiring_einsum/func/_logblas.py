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
into a layout with them last (:attr:`Program.perm_a`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from . import _kernels as K
from ._kernels import einsum_letters, einsum_product
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
_RELAYOUT_MIN_ELEMENTS = 1 << 16


def _layout(term: str, summed: str, numel: int) -> tuple[int, ...] | None:
    """The permutation putting ``term``'s summed indices last, where it pays."""
    positions = [term.index(c) for c in summed]
    block = sorted(positions)
    adjacent = block == list(range(block[0], block[0] + len(block)))
    if adjacent or numel < _RELAYOUT_MIN_ELEMENTS:
        return None
    keep = [d for d, c in enumerate(term) if c not in summed]
    return tuple(keep + positions)


@functools.lru_cache(maxsize=4096)
def program(step: Step) -> Program | None:
    """The step's :class:`Program`, or ``None`` when it cannot run on BLAS."""
    if not applicable(step):
        return None
    ta, tb = step.inputs
    summed = step.summed
    perm_a = _layout(ta, summed, _numel(step, ta))
    perm_b = _layout(tb, summed, _numel(step, tb))
    if perm_a is None and perm_b is None:
        return _program(step)
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
    return replace(_program(relaid), perm_a=perm_a, perm_b=perm_b)


def _program(step: Step) -> Program:
    ta, tb = step.inputs
    summed, out = step.summed, step.output
    return Program(
        step,
        tuple(ta.index(c) for c in summed),
        tuple(tb.index(c) for c in summed),
        einsum_product(step.inputs, out),
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
        return Shifted((a - ma).exp_(), (b - mb).exp_(), total)
    return Shifted(torch.exp(a - ma), torch.exp(b - mb), total)


def risky(log_sum: Tensor) -> Tensor | None:
    """Cells whose ``log S`` is not certifiably exact, or ``None`` if there are none.

    Only the lower side needs a test.  With finite maxima every shifted
    factor is at most 1, so ``S`` is at most the number of terms; a
    non-finite maximum (or an inf or NaN operand) leaves NaN in its cells,
    and NaN fails the test, as does ``log 0 = -inf``.
    """
    if not log_sum.numel():
        return None
    bound = -_THRESHOLD.get(log_sum.dtype, _DEFAULT_THRESHOLD)
    # One reduction; amin propagates NaN, which fails the comparison.
    if float(log_sum.detach().amin()) >= bound:
        return None
    return ~(log_sum >= bound)


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


def _lined_up(m: Tensor, plan: tuple[tuple[int, ...], tuple[int, ...]]) -> Tensor:
    """A keepdim maximum as a view broadcastable to the output (see :func:`_broadcast_plan`)."""
    perm, take = plan
    return m.permute(perm).reshape([m.shape[d] if d >= 0 else 1 for d in take])


def _laid_out(x: Tensor, perm: tuple[int, ...] | None) -> tuple[Tensor, bool]:
    """``x`` in the program's layout, and whether that is a fresh copy of ours."""
    if perm is None:
        return x, False
    return x.permute(perm).contiguous(), True


def forward(prog: Program, a_in: Tensor, b_in: Tensor) -> tuple[Tensor, ...] | None:
    """The step's output: BLAS, with an exact log-sum-exp at the cells that need it.

    Returns ``(out, exp(A - mA) or mA, exp(B - mB) or mB, S)`` when every
    cell passed the certificate (what a first-order backward needs, see
    :func:`vjp_from_residuals`; each exponential is kept only where the
    program says so), ``(out,)`` when some cells were recomputed,
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
    # A non-finite maximum (an all -inf row, an inf, a NaN) turns its row
    # into NaN here; BLAS keeps that NaN to the cells of that row, which fail
    # the certificate below and are recomputed from the operands.
    ea = (a.sub_(ma) if own_a else a - ma).exp_()
    eb = (b.sub_(mb) if own_b else b - mb).exp_()
    product = prog.product(ea, eb)
    log_sum = torch.log(product)
    mask = risky(log_sum)
    if mask is not None and int(mask.sum()) > mask.numel() // 4:
        return None
    # log_sum is fresh (torch.log of a product), so it is ours to modify.
    result = log_sum.add_(ma if prog.view_a is None else _lined_up(ma, prog.view_a))
    result = result.add_(mb if prog.view_b is None else _lined_up(mb, prog.view_b))
    if mask is None:
        # (An empty output certifies nothing: its operands may hold NaN rows.)
        if not product.numel():
            return (result,)
        return result, ea if prog.save_a else ma, eb if prog.save_b else mb, product
    # The copies were shifted in place: the fix-up reads the operands anew.
    a = _laid_out(a_in, prog.perm_a)[0] if own_a else a
    b = _laid_out(b_in, prog.perm_b)[0] if own_b else b
    return (_fix_cells(prog.step, a, b, result, mask, prog.chunk_elements),)


def vjp_from_residuals(
    prog: Program,
    a: Tensor,
    b: Tensor,
    res_a: Tensor,
    res_b: Tensor,
    product: Tensor,
    g: Tensor,
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """First-order gradients from the forward's certified residuals.

    ``res_a`` is ``exp(A - mA)``, or ``mA`` where the program did not keep
    the exponential (it is then recomputed, without the maxima or the
    certificate).

    ``∂out/∂A[.., s] · g = exp(A - mA) · Σ exp(B - mB) · g / S``.  Every cell
    passed the certificate, so ``S`` is positive and finite and both operands
    are free of inf and NaN.  The residuals are constants, so the result must
    not be differentiated again (the caller checks).
    """
    ea = res_a if prog.save_a else torch.exp(_laid_out(a, prog.perm_a)[0] - res_a)
    eb = res_b if prog.save_b else torch.exp(_laid_out(b, prog.perm_b)[0] - res_b)
    w = g / product
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
    w = g * inverse
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
    go through BLAS and the others through the blocked path on a masked
    cotangent; otherwise the blocked path does every cell.
    """
    weights = K.log_weights(step, neg_inf, out)
    blas = plain and applicable(step) and backward_applicable(xs[0], xs[1])
    if not blas:
        return K.pullback(step, xs, needs, lambda v, r: weights(v, r) * g)
    grad_a, grad_b, unsafe = vjp(step, xs[0], xs[1], out, g)
    grads: list[Tensor | None] = [grad_a, grad_b]
    if unsafe is not None:  # the cells at risk, exactly, through the blocked path
        masked = torch.where(unsafe, g, 0.0)
        exact = K.pullback(step, xs, needs, lambda v, r: weights(v, r) * masked)
        grads = [f if e is None or f is None else f + e for f, e in zip(grads, exact, strict=True)]
    return [gk if need else None for gk, need in zip(grads, needs, strict=True)]


def jvp_exact(
    step: Step,
    neg_inf: K.NegInf,
    xs: Sequence[Tensor],
    out: Tensor,
    ts: Sequence[Tensor],
    plain: bool,
) -> Tensor:
    """The log step's jvp, exact and differentiable (see :func:`vjp_exact`)."""
    if plain and applicable(step) and backward_applicable(xs[0], xs[1]):
        t, unsafe = jvp(step, xs[0], xs[1], out, ts[0], ts[1])
        if unsafe is None:
            return t
        exact = K.tangent_sum(step, xs, ts, K.log_weights(step, neg_inf, out))
        return torch.where(unsafe, exact, t)
    return K.tangent_sum(step, xs, ts, K.log_weights(step, neg_inf, out))
