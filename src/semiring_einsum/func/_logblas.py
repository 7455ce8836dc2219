"""The log semiring on BLAS: max-shifted exponentials around a real matmul, made exact.

For a step ``out = log Σ_s exp(A + B)`` whose summed indices ``s`` all appear
in both operands, shifting each operand by its own maximum over ``s`` gives

    out = mA + mB + log Σ_s exp(A - mA) · exp(B - mB)

and the sum is a real einsum (BLAS).  This is exact as long as the largest
term of each cell, ``exp(M - mA - mB)`` with ``M = max_s (A + B)``, stays far
from underflow.  The *gap* ``mA + mB - M`` is what can go wrong: entries
spread over 1e3 nats, or a row's maximiser masked by -inf in the other
operand, make every shifted term of a cell underflow.  The gap is bounded
cheaply from the operands' own maximisers: with ``sA`` the argmax of ``A``,
``M ≥ A[sA] + B[sA] = mA + B[sA]``, so ``gap ≤ mB - B[sA]``, and likewise
``gap ≤ mA - A[sB]``.  Cells whose bound exceeds a dtype-dependent threshold
(or whose shifts are not finite: -inf rows, inf, NaN) are *at risk*; they are
recomputed exactly (forward: a log-sum-exp over just those cells' rows;
backward and forward mode: the blocked path on a masked cotangent).  Where the
code cannot branch on data (under ``vmap``, or while the compiler traces), the
blocked one-pass path is used for the whole step instead, which is exact too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._kernels import tracing
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
    size = step.size
    return all(c in a and c in b and size[c] > 0 for c in step.summed)


def can_branch(*tensors: Tensor) -> bool:
    """Whether Python may look at these tensors' values (no vmap, no tracing)."""
    if tracing():
        return False
    functorch = torch._C._functorch
    for t in tensors:
        if functorch.is_legacy_batchedtensor(t):  # torch.autograd's own vmap
            return False
        while functorch.is_functorch_wrapped_tensor(t):
            if functorch.is_batchedtensor(t) or functorch.is_legacy_batchedtensor(t):
                return False
            t = functorch.get_unwrapped(t)
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return False  # a fake or other subclass tensor: values are not there
    return True


def _einsum(inputs: Sequence[str], output: str, *xs: Tensor) -> Tensor:
    ids = {c: i for i, c in enumerate(dict.fromkeys("".join(inputs) + output))}
    args: list[object] = []
    for term, x in zip(inputs, xs):
        args += [x, [ids[c] for c in term]]
    return torch.einsum(*args, [ids[c] for c in output])


def _to(t: Tensor, letters: str, target: str) -> Tensor:
    """``t`` (dims named by ``letters``) laid out in ``target`` order, 1 where absent."""
    t = t.permute([letters.index(c) for c in target if c in letters])
    shape = []
    it = iter(t.shape)
    for c in target:
        shape.append(next(it) if c in letters else 1)
    return t.reshape(shape)


@dataclass
class Shifted:
    """The shifted operands and which output cells are at risk."""

    ea: Tensor  # exp(A - mA), A's layout
    eb: Tensor
    shift: Tensor  # mA + mB in output layout (broadcastable), finite where safe
    unsafe: Tensor  # bool, output shape


def shift(step: Step, a: Tensor, b: Tensor) -> Shifted:
    """Shift both operands by their maxima over the summed indices; bound the gaps."""
    ta, tb = step.inputs
    out = step.output
    summed = step.summed
    shape = [step.size[c] for c in out]
    keep_a = "".join(c for c in ta if c not in summed)
    keep_b = "".join(c for c in tb if c not in summed)
    # Operands as (kept dims..., flattened summed dims), summed in one order.
    fa = _to(a, ta, keep_a + summed).flatten(len(keep_a))
    fb = _to(b, tb, keep_b + summed).flatten(len(keep_b))
    ma, sa = fa.max(-1)
    mb, sb = fb.max(-1)
    ma_o, mb_o = _to(ma, keep_a, out), _to(mb, keep_b, out)
    # The other operand at each operand's own maximiser, per output cell.
    b_at_sa = _at(fb, keep_b, _to(sa, keep_a, out), step)
    a_at_sb = _at(fa, keep_a, _to(sb, keep_b, out), step)
    bound = torch.minimum(mb_o - b_at_sa, ma_o - a_at_sb)
    threshold = _THRESHOLD.get(a.dtype, _DEFAULT_THRESHOLD)
    finite = torch.isfinite(ma_o) & torch.isfinite(mb_o)
    unsafe = ~((bound <= threshold) & finite)
    ma_safe = torch.where(torch.isfinite(ma), ma, 0.0)
    mb_safe = torch.where(torch.isfinite(mb), mb, 0.0)
    ea = torch.exp(a - _to(ma_safe, keep_a, ta))
    eb = torch.exp(b - _to(mb_safe, keep_b, tb))
    total = _to(ma_safe, keep_a, out) + _to(mb_safe, keep_b, out)
    return Shifted(ea, eb, torch.where(unsafe, 0.0, total), unsafe.expand(shape))


def _at(flat: Tensor, keep: str, where: Tensor, step: Step) -> Tensor:
    """``flat[..kept.., where]`` for every output cell (broadcast indexing, no expand).

    ``flat`` is an operand as (kept dims..., flattened summed dims); ``where``
    holds flat summed positions in output layout.
    """
    out = step.output
    size = step.size
    index: list[Tensor] = []
    for c in keep:
        shape = [size[c] if d == c else 1 for d in out]
        index.append(torch.arange(size[c], device=flat.device).reshape(shape))
    index.append(where)
    return flat[tuple(index)]


def forward(step: Step, a: Tensor, b: Tensor, chunk_elements: int) -> Tensor | None:
    """The step's output: BLAS where safe, an exact log-sum-exp at risky cells.

    Returns ``None`` when most cells are at risk (adversarial inputs): the
    caller's blocked path is then cheaper than gathering every cell's rows.
    """
    sh = shift(step, a, b)
    ta, tb = step.inputs
    risky = int(sh.unsafe.sum())
    if risky > sh.unsafe.numel() // 4:
        return None
    out = torch.log(_einsum((ta, tb), step.output, sh.ea, sh.eb)) + sh.shift
    if risky:
        out = _fix_cells(step, a, b, out, sh.unsafe, chunk_elements)
    return out


def _fix_cells(
    step: Step, a: Tensor, b: Tensor, out: Tensor, unsafe: Tensor, chunk_elements: int
) -> Tensor:
    """Recompute the unsafe cells exactly: log-sum-exp over their own rows only."""
    ta, tb = step.inputs
    summed = step.summed
    outs = step.output
    keep_a = "".join(c for c in ta if c not in summed)
    keep_b = "".join(c for c in tb if c not in summed)
    fa = _to(a, ta, keep_a + summed).flatten(len(keep_a))
    fb = _to(b, tb, keep_b + summed).flatten(len(keep_b))
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


def weights(step: Step, sh: Shifted, out: Tensor, cotangent: Tensor) -> Tensor:
    """``g · exp(mA + mB - out)`` per cell, 0 at unsafe cells (no inf, no NaN)."""
    exponent = torch.where(sh.unsafe, 0.0, sh.shift - out)
    return torch.where(sh.unsafe, 0.0, cotangent * torch.exp(exponent))


def vjp(step: Step, a: Tensor, b: Tensor, out: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients on the safe cells via BLAS, and the mask of cells left to the caller.

    ``∂out/∂A[.., s] · g = exp(A - mA) · Σ exp(B - mB) · g·exp(mA + mB - out)``.
    """
    sh = shift(step, a, b)
    ta, tb = step.inputs
    w = weights(step, sh, out, g)
    grad_a = sh.ea * _einsum((step.output, tb), ta, w, sh.eb)
    grad_b = sh.eb * _einsum((step.output, ta), tb, w, sh.ea)
    return grad_a, grad_b, sh.unsafe


def jvp(
    step: Step, a: Tensor, b: Tensor, out: Tensor, t_a: Tensor, t_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Tangent on the safe cells via BLAS, and the mask of cells left to the caller."""
    sh = shift(step, a, b)
    ta, tb = step.inputs
    exponent = torch.where(sh.unsafe, 0.0, sh.shift - out)
    scale = torch.where(sh.unsafe, 0.0, torch.exp(exponent))
    inputs = (ta, tb)
    t = _einsum(inputs, step.output, sh.ea * t_a, sh.eb) + _einsum(
        inputs, step.output, sh.ea, sh.eb * t_b
    )
    return t * scale, sh.unsafe


def chunk_elements(budget_bytes: int | None, itemsize: int) -> int:
    """How many elements one chunk of the exact fix-up may hold."""
    if budget_bytes is None:
        return 1 << 20
    return max(1, min(budget_bytes, 4 << 20) // itemsize)
