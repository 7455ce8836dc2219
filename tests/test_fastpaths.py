"""The fast paths stay exact: BLAS log steps on adversarial inputs, the max-plus
slice loop, values-only max-plus, and pairwise Viterbi with backpointers."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.autograd import gradcheck

from oracle import brute, brute_viterbi, log_vjp
from semiring_einsum import func
from semiring_einsum.func import _kernels, _logblas, _ops
from semiring_einsum.func._engine import log_einsum_with_extras

F32, F64 = torch.float32, torch.float64
TOL = {F32: {"rtol": 1e-5, "atol": 1e-4}, F64: {"rtol": 1e-10, "atol": 1e-9}}


def _adversarial(kind: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 6, 7, generator=g, dtype=F64)
    b = torch.randn(3, 7, 5, generator=g, dtype=F64)
    if kind == "spread":  # entries over ~1e3 nats: shifted terms underflow
        a, b = a * 400, b * 400
    elif kind == "masked":  # each row's (dominant) maximiser is -inf in the other operand
        for batch in range(3):
            best = a[batch].argmax(-1)
            a[batch, torch.arange(6), best] += 200.0
            b[batch, best, :] = -math.inf
    elif kind == "dead":  # whole rows and columns at -inf (probability zero)
        a[:, 1, :] = -math.inf
        b[:, :, 2] = -math.inf
    elif kind == "mixed":  # some cells safe, some at risk, in one call
        a[0] = a[0] * 500
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["benign", "spread", "masked", "dead", "mixed"])
def test_log_blas_step_is_exact(kind: str, dtype: torch.dtype) -> None:
    a, b = _adversarial(kind, dtype)
    step = func.plan("bij,bjk->bik", a, b, semiring=func.LOG).steps[0]
    assert _logblas.applicable(step)
    got = func.log_einsum("bij,bjk->bik", a, b)
    want = brute("log", "bij,bjk->bik", a.double(), b.double())
    assert got.dtype == dtype
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got.double()[finite], want[finite], **TOL[dtype])


@pytest.mark.parametrize("kind", ["spread", "masked"])
def test_the_naive_trick_really_fails_on_these_inputs(kind: str) -> None:
    # Guards the test above: without the fix-up, the shifted product is wrong.
    a, b = _adversarial(kind, F32)
    ma = a.amax(-1, keepdim=True)
    mb = b.amax(-2, keepdim=True)
    mb = torch.where(torch.isfinite(mb), mb, 0.0)
    trick = torch.log(torch.exp(a - ma) @ torch.exp(b - mb)) + ma + mb
    want = brute("log", "bij,bjk->bik", a.double(), b.double())
    finite = torch.isfinite(want)
    wrong = ~torch.isclose(trick.double(), want, atol=1e-3) & finite
    assert wrong.any()


@pytest.mark.parametrize("kind", ["benign", "spread", "masked", "mixed"])
def test_log_blas_gradients_are_exact(kind: str) -> None:
    a, b = _adversarial(kind, F64)
    a, b = a[:, :3, :4].clone(), b[:, :4, :3].clone()
    inputs = (a.requires_grad_(), b.requires_grad_())
    assert gradcheck(
        lambda x, y: func.log_einsum("bij,bjk->bik", x, y),
        inputs,
        check_forward_ad=True,
        check_batched_grad=True,
    )


def test_log_blas_gradients_match_the_oracle_on_spread_inputs() -> None:
    a, b = _adversarial("mixed", F64)
    a.requires_grad_()
    b.requires_grad_()
    w = torch.randn(3, 6, 5, dtype=F64)
    (func.log_einsum("bij,bjk->bik", a, b) * w).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (brute("log", "bij,bjk->bik", a2, b2) * w).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_log_under_vmap_takes_the_exact_route() -> None:
    a, b = _adversarial("masked", F32)
    got = torch.func.vmap(lambda x, y: func.log_einsum("ij,jk->ik", x, y))(a, b)
    want = brute("log", "bij,bjk->bik", a.double(), b.double())
    finite = torch.isfinite(want)
    torch.testing.assert_close(got.double()[finite], want[finite], **TOL[F32])


@pytest.mark.parametrize("case", ["ties", "nan", "neg_inf"])
def test_max_slice_loop_matches_the_oracle(case: str) -> None:
    # An output of 16*16*16 >= 4096 cells takes the per-coordinate loop.
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 3, (16, 16, 5), generator=g).double()
    b = torch.randint(0, 3, (16, 5, 16), generator=g).double()
    if case == "nan":
        a[0, 0, 2] = math.nan
        a[1, 1, 0] = math.nan
        a[1, 1, 3] = math.nan
    elif case == "neg_inf":
        a[2, 3, :] = -math.inf
    values, argmax = func.viterbi_einsum("bij,bjk->bik", a, b)
    want_values, want_argmax = brute_viterbi("bij,bjk->bik", a, b)
    torch.testing.assert_close(values, want_values, equal_nan=True)
    assert torch.equal(argmax, want_argmax)


def test_max_values_only_when_no_gradient_is_possible() -> None:
    a, b = torch.randn(8, 20, 30, dtype=F64), torch.randn(8, 30, 25, dtype=F64)
    want = brute("max", "bij,bjk->bik", a, b)
    torch.testing.assert_close(func.max_einsum("bij,bjk->bik", a, b), want)
    with torch.no_grad():
        torch.testing.assert_close(func.max_einsum("bij,bjk->bik", a.requires_grad_(), b), want)
    # ...and with gradients the argmax is there for the backward.
    out = func.max_einsum("bij,bjk->bik", a, b)
    (grad,) = torch.autograd.grad(out.sum(), a)
    assert grad.sum().item() == pytest.approx(8 * 20 * 25)


@pytest.mark.parametrize(
    "equation,shapes",
    [
        ("ab,bc,cd->ad", [(4, 5), (5, 6), (6, 3)]),
        ("bsxk,bsyk,xyz->bsz", [(2, 3, 4, 2), (2, 3, 4, 2), (4, 4, 5)]),
        ("ij,jk,kl->", [(3, 4), (4, 5), (5, 2)]),
        ("ab,bc,cd->a", [(4, 5), (5, 6), (6, 3)]),
        ("ab,bc,cd,de->ae", [(3, 4), (4, 2), (2, 5), (5, 3)]),
    ],
)
def test_pairwise_viterbi_rebuilds_every_argmax(equation: str, shapes: list) -> None:
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(s, generator=g, dtype=F64) for s in shapes]  # tie-free
    values, argmax = func.viterbi_einsum(equation, *xs, optimize="auto")
    assert len(func.plan(equation, *xs, semiring=func.MAX_PLUS).steps) > 1
    want_values, want_argmax = brute_viterbi(equation, *xs)
    torch.testing.assert_close(values, want_values)
    assert torch.equal(argmax, want_argmax)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[bool]:
    """Record, for each call of the kernel ``_kernels.<name>``, whether it took the step."""
    taken: list[bool] = []
    original = getattr(_kernels, name)

    def spy(*args: object) -> object:
        found = original(*args)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(_kernels, name, spy)
    return taken


def _rows_inputs(case: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if case == "ties":  # three values only: most cells have several maximisers
        a = torch.randint(0, 3, (3, 10, 40), generator=g).to(dtype)
        b = torch.randint(0, 3, (3, 40, 9), generator=g).to(dtype)
        return a, b
    a = torch.randn(3, 10, 40, generator=g, dtype=dtype)
    b = torch.randn(3, 40, 9, generator=g, dtype=dtype)
    if case == "neg_inf":  # a row and a column with every term -inf; a partly -inf row
        a[0, 2, :] = -math.inf
        b[1, :, 4] = -math.inf
        a[2, 5, :30] = -math.inf
    elif case == "pos_inf":  # +inf terms: the first one wins
        a[0, 1, 7] = math.inf
        a[0, 1, 30] = math.inf
        b[2, 11, :] = math.inf
    elif case == "nan":  # the first NaN wins (left to the NaN-aware kernels)
        a[1, 3, 20] = math.nan
        a[1, 3, 33] = math.nan
    return a, b


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["random", "ties", "neg_inf", "pos_inf", "nan"])
@pytest.mark.parametrize("block_size", [None, 2], ids=["default", "block2"])
@pytest.mark.usefixtures("pure_torch")
def test_max_row_kernel_matches_the_oracle(
    case: str, dtype: torch.dtype, block_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 terms per cell (>= 16): the row kernel; block_size=2 cuts the output
    # into many chunks of whole rows.  (This step is small enough for the one-window
    # kernel, max_small, which test_max_small_kernel_matches_the_oracle checks: off here.)
    monkeypatch.setattr(_kernels, "small_step", functools.cache(lambda step: False))
    taken = _spy(monkeypatch, "max_rows")
    a, b = _rows_inputs(case, dtype)
    values, argmax = func.viterbi_einsum("bij,bjk->bik", a, b, block_size=block_size)
    want_values, want_argmax = brute_viterbi("bij,bjk->bik", a.double(), b.double())
    assert taken == [case != "nan"]  # NaN falls back to the NaN-aware kernels
    assert values.dtype == dtype
    torch.testing.assert_close(values.double(), want_values, equal_nan=True)
    assert torch.equal(argmax, want_argmax)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["random", "ties", "neg_inf", "pos_inf", "nan"])
@pytest.mark.usefixtures("pure_torch")
def test_max_small_kernel_matches_the_oracle(
    case: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One window of every term (3 x 12 x 9 cells x 40 terms <= SMALL_TERMS): one torch.max
    # per cell, whose first maximiser and first NaN are the rule's.
    taken = _spy(monkeypatch, "max_small")
    a, b = _rows_inputs(case, dtype)
    values, argmax = func.viterbi_einsum("bij,bjk->bik", a, b)
    want_values, want_argmax = brute_viterbi("bij,bjk->bik", a.double(), b.double())
    assert taken == [True]
    assert values.dtype == dtype
    torch.testing.assert_close(values.double(), want_values, equal_nan=True)
    assert torch.equal(argmax, want_argmax)
    # The max-plus gradient rides on the same argmax: one-hot at the first maximiser.
    xs = [t.clone().requires_grad_() for t in (a, b)]
    func.max_einsum("bij,bjk->bik", *xs).sum().backward()
    assert xs[0].grad is not None and xs[0].grad.sum() == values.numel()


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_max_row_kernel_several_summed_indices_in_row_major_order(dtype: torch.dtype) -> None:
    # A joint step over x, y and k (24 terms per cell), many ties: the first
    # maximiser in row-major order of (x, y, k) must win.
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 2, (2, 3, 3, 2), generator=g).to(dtype)
    y = torch.randint(0, 2, (2, 3, 4, 2), generator=g).to(dtype)
    z = torch.randint(0, 2, (3, 4, 5), generator=g).to(dtype)
    eq = "bsxk,bsyk,xyz->bsz"
    values, argmax = func.viterbi_einsum(eq, x, y, z)
    want_values, want_argmax = brute_viterbi(eq, x.double(), y.double(), z.double())
    torch.testing.assert_close(values.double(), want_values)
    assert torch.equal(argmax, want_argmax)
    # min-plus and max-plus gradients ride on the same argmax
    for fn, reduce in ((func.max_einsum, "max"), (func.min_einsum, "min")):
        xs = [t.clone().requires_grad_() for t in (x, y, z)]
        out = fn(eq, *xs, optimize=False)
        want = brute(reduce, eq, x.double(), y.double(), z.double())
        torch.testing.assert_close(out.double(), want)
        grads = torch.autograd.grad(out.sum(), xs)
        # every output cell sends its cotangent to exactly one term
        assert all(float(gr.sum()) == out.numel() for gr in grads)


@pytest.mark.parametrize("semiring", ["max", "min"])
def test_max_row_kernel_values_only_propagates_nan_and_inf(semiring: str) -> None:
    # No gradient can be asked for: values only, NaN propagates, -inf/+inf rows stay.
    a, b = _rows_inputs("neg_inf", F32)
    a[1, 3, 20] = math.nan
    b[0, 5, 2] = math.inf
    if semiring == "min":
        a, b = -a, -b
    fn = func.max_einsum if semiring == "max" else func.min_einsum
    got = fn("bij,bjk->bik", a, b)
    want = brute(semiring, "bij,bjk->bik", a.double(), b.double())
    torch.testing.assert_close(got.double(), want, equal_nan=True)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["spread", "dead", "pos_inf", "nan", "floor"])
@pytest.mark.parametrize("block_size", [None, 2], ids=["default", "block2"])
def test_log_row_kernel_matches_the_oracle(
    case: str, dtype: torch.dtype, block_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inputs the BLAS path gives up on (most cells at risk), so the row
    # kernel takes the step; block_size=2 cuts the output into many chunks.
    taken = _spy(monkeypatch, "log_rows")
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 10, 40, generator=g, dtype=F64) * 800
    b = torch.randn(3, 40, 30, generator=g, dtype=F64) * 800  # (past the joint step)
    if case == "dead":  # all -inf cells (probability zero) stay -inf, not a sum of floors
        a[0, 2, :] = -math.inf
        b[1, :, 4] = -math.inf
        a[2, 5, :30] = -math.inf
    elif case == "pos_inf":
        a[0, 1, 7] = math.inf
    elif case == "nan":
        a[1, 3, 20] = math.nan
    elif case == "floor":  # every term but one per cell far below the maximum
        a = torch.full_like(a, -5000.0)
        a[..., 0] = 0.0
    got = func.log_einsum("bij,bjk->bik", a.to(dtype), b.to(dtype), block_size=block_size)
    want = brute("log", "bij,bjk->bik", a.to(dtype).double(), b.to(dtype).double())
    assert True in taken
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = torch.isfinite(want)
    # float32 keeps ~7 digits of values in the thousands
    tol = {"rtol": 1e-6, "atol": 2e-3} if dtype == F32 else TOL[F64]
    torch.testing.assert_close(got.double()[finite], want[finite], **tol)


def test_log_row_kernel_joint_step_of_three_operands() -> None:
    # optimize=False: one joint step over x, y and k, on spread entries.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 2, generator=g, dtype=F64) * 300
    y = torch.randn(2, 3, 4, 2, generator=g, dtype=F64) * 300
    z = torch.randn(4, 4, 5, generator=g, dtype=F64) * 300
    eq = "bsxk,bsyk,xyz->bsz"
    got = func.log_einsum(eq, x, y, z, optimize=False)
    torch.testing.assert_close(got, brute("log", eq, x, y, z), **TOL[F64])


@pytest.mark.parametrize(
    "equation,shapes",
    [
        ("bij,bjk->bik", [(3, 6, 7), (3, 7, 5)]),  # operands like the output: exps kept
        ("bi,ij->bj", [(4, 30), (30, 20)]),  # an HMM step: the transition exp is recomputed
        ("ij,bj->bi", [(20, 30), (4, 30)]),
    ],
)
def test_log_blas_backward_keeps_at_most_output_sized_residuals(
    equation: str, shapes: list
) -> None:
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(s, generator=g, dtype=F64, requires_grad=True) for s in shapes]
    out = func.log_einsum(equation, *xs)
    saved = out.grad_fn.saved_tensors  # the inputs, then the outputs and residuals
    # a, b, out, two residuals, S and the certificate: the certified BLAS route
    assert len(saved) == 7
    assert int(saved[-1]) == _ops.CERTIFIED
    assert max(t.numel() for t in saved[2:]) <= out.numel()
    cotangent = torch.randn(out.shape, generator=g, dtype=F64)
    got = torch.autograd.grad(out, xs, cotangent)
    want = log_vjp(equation, xs, cotangent, math.nan)
    for gk, wk in zip(got, want, strict=True):
        torch.testing.assert_close(gk, wk, **TOL[F64])


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("block_size", [None, 3], ids=["default", "block3"])
def test_log_blocked_kernel_floor_keeps_dead_cells_and_late_maxima(
    dtype: torch.dtype, block_size: int | None
) -> None:
    # 10 terms per cell (< 16): the windowed one-pass kernel, on spread
    # entries; with windows of 3, some cells are all -inf in early windows
    # and finite later, and some are -inf throughout.
    g = torch.Generator().manual_seed(8)
    a = torch.randn(2, 6, 10, generator=g, dtype=F64) * 800
    b = torch.randn(2, 10, 5, generator=g, dtype=F64) * 800
    a[0, 1, :6] = -math.inf  # dead in the first windows only
    a[1, 2, :] = -math.inf  # dead throughout
    a, b = a.to(dtype), b.to(dtype)
    got = func.log_einsum("bij,bjk->bik", a, b, block_size=block_size)
    want = brute("log", "bij,bjk->bik", a.double(), b.double())
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = torch.isfinite(want)
    tol = {"rtol": 1e-6, "atol": 2e-3} if dtype == F32 else TOL[F64]
    torch.testing.assert_close(got.double()[finite], want[finite], **tol)
    # the compatibility layer's route with the max and scaled sum always takes this kernel
    extras = log_einsum_with_extras("bij,bjk->bik", a, b, block_size=block_size)
    torch.testing.assert_close(extras[0].double()[finite], want[finite], **tol)
    assert torch.equal(torch.isneginf(extras[0]), torch.isneginf(want))


# A stack-RNN-like log step: a 7-index operand (65,536 elements) whose two summed
# indices sit in the middle.  The plan copies it into a layout with them last.
RELAYOUT = {
    # a narrow product (2 columns): the big operand becomes its right one, laid out as
    # (batch, summed, own) -- here summed c, e first
    "narrow": ("abcdefg,ceh->abdfgh", [(4, 4, 4, 4, 4, 4, 16), (4, 4, 2)], (2, 4, 0, 1, 3, 5, 6)),
    # a wide one: the summed indices c, e moved last
    "wide": ("abcdefg,ceh->abdfgh", [(4, 4, 4, 4, 4, 4, 16), (4, 4, 32)], (0, 1, 3, 5, 6, 2, 4)),
}


@pytest.mark.parametrize("layout", list(RELAYOUT))
@pytest.mark.parametrize("case", ["random", "spread", "neg_inf"])
def test_log_blas_relayout_matches_the_oracle(case: str, layout: str) -> None:
    equation, shapes, perm = RELAYOUT[layout]
    g = torch.Generator().manual_seed(11)
    a, b = (torch.randn(s, generator=g, dtype=F64) for s in shapes)
    if case == "spread":  # most cells fail the certificate: the exact kernels
        a = a * 400
    elif case == "neg_inf":  # a row with every summed term -inf
        a[0, 1, :, 2, :, 3, 5] = -math.inf
    (step,) = func.plan(equation, a, b, semiring=func.LOG).steps
    program = _logblas.program(step)
    assert step.kernel.name == "log_blas" and program is not None
    assert program.perm_a == perm
    a.requires_grad_(True)
    b.requires_grad_(True)
    out = func.log_einsum(equation, a, b)
    torch.testing.assert_close(out, brute("log", equation, a.detach(), b.detach()))
    cotangent = torch.randn(out.shape, generator=g, dtype=F64)
    got = torch.autograd.grad(out, (a, b), cotangent)
    want = log_vjp(equation, [a.detach(), b.detach()], cotangent, math.nan)
    for gk, wk in zip(got, want, strict=True):  # the dead row's entries: NaN in both
        torch.testing.assert_close(gk, wk, equal_nan=True, **TOL[F64])


# Narrow log products (the second operand's own indices hold fewer than 16 elements) run
# as one bmm with the operands swapped.  The stack RNN's POP step, small, on every kind
# of row the certificate must handle; and operands broadcast along a batch index (which
# take torch.einsum instead).
POP = "bikqxty,bktyr->biqxry"
POP_SHAPES = [(2, 5, 5, 2, 3, 2, 3), (2, 5, 2, 3, 2)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "rows",
    [
        "finite",
        "neg_inf_big",
        "neg_inf_small",
        "neg_inf_small_1k",
        "neg_inf_small_and_nan",
        "pos_inf",
        "nan",
        "broadcast",
    ],
)
def test_narrow_log_product_matches_the_oracle(rows: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(21)
    shapes = POP_SHAPES
    if rows == "neg_inf_small_1k":  # the small operand past 1,024 elements: shifted by 0
        shapes = [(4, 45, 45, 2, 3, 2, 3), (4, 45, 2, 3, 2)]
    a, b = (torch.randn(s, generator=g, dtype=F64) for s in shapes)
    if rows == "neg_inf_big":  # the stack's triangle: gamma dead where k >= i
        dead = torch.ones(5, 5, dtype=torch.bool).tril()
        a = a.masked_fill(dead[None, :, :, None, None, None, None], -math.inf)
    elif rows.startswith("neg_inf_small"):  # a whole summed row of the small operand
        b[1, :, :, 2, 0] = -math.inf
        if rows.endswith("nan"):  # and cells to recompute: the fix-up path
            a[0, 2, 1, 0, 0, 1, 1] = math.nan
    elif rows == "pos_inf":
        a[0, 3, 1, 0, 2, 1, 1] = math.inf
    elif rows == "nan":
        b[0, 2, 1, 1, 1] = math.nan
    elif rows == "broadcast":  # one batch entry shared
        a = a[:1]
    a, b = a.to(dtype), b.to(dtype)
    (step,) = func.plan(POP, a, b, semiring=func.LOG).steps
    program = _logblas.program(step)
    assert step.kernel.name == "log_blas" and program is not None
    assert type(program.product).__name__ == "_Swapped"
    want = brute("log", POP, a.double(), b.double())
    for policy in (0.0, math.nan):
        ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = func.log_einsum(POP, ag, bg, grad_of_neg_inf=policy)
        torch.testing.assert_close(out.double(), want, equal_nan=True, **TOL[dtype])
        cotangent = torch.randn(out.shape, generator=g, dtype=F64)
        got = torch.autograd.grad(out, (ag, bg), cotangent.to(dtype))
        expect = log_vjp(POP, [a.double(), b.double()], cotangent, policy)
        for gk, wk in zip(got, expect, strict=True):
            torch.testing.assert_close(gk.double(), wk, equal_nan=True, **TOL[dtype])


# Small log contractions of three or more operands whose values alone are asked for
# (plain eager, nothing recording) run as one torch.logsumexp over their joint terms
# (_kernels.log_small).
LOG_SMALL = {
    "cky": ("bsxk,bsyk,xyz->bsz", {"b": 2, "s": 3, "x": 4, "y": 4, "z": 5, "k": 3}),
    "chain": ("ab,bc,cd,de->ae", {"a": 3, "b": 4, "c": 5, "d": 4, "e": 3}),
    "hmm_transposed_out": ("bi,ij,bj->jb", {"b": 2, "i": 5, "j": 4}),
}


@pytest.mark.parametrize("dtype", [F32, F64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("data", ["random", "neg_inf", "nan_pos_inf", "broadcast"])
@pytest.mark.parametrize("case", list(LOG_SMALL))
def test_log_small_values_match_the_oracle(
    case: str, data: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    eq, size = LOG_SMALL[case]
    taken = _spy(monkeypatch, "log_small")
    g = torch.Generator().manual_seed(8)
    terms = eq.split("->")[0].split(",")
    xs = [torch.randn([size[c] for c in t], generator=g, dtype=F64) * 3 for t in terms]
    if data == "neg_inf":  # whole cells of -inf, and -inf terms among finite ones
        xs[0][0] = -math.inf
        xs[-1].view(-1)[::3] = -math.inf
    elif data == "nan_pos_inf":
        xs[0].view(-1)[1] = math.nan
        xs[-1].view(-1)[2] = math.inf
    elif data == "broadcast":  # a size-1 dim standing for a bigger index
        xs[0] = xs[0][:1]
    xs = [x.to(dtype) for x in xs]
    before = [x.clone() for x in xs]
    got = func.log_einsum(eq, *xs)
    want = brute("log", eq, *[x.double() for x in xs])
    assert taken == [True]
    assert got.dtype == dtype and got.shape == want.shape
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype in (torch.float16, torch.bfloat16) else TOL[dtype]
    torch.testing.assert_close(got.double(), want, equal_nan=True, **tol)
    for x, x0 in zip(xs, before, strict=True):
        assert torch.equal(x, x0) or (x.isnan() == x0.isnan()).all()


def test_log_small_is_values_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded calls, other strategies and big contractions keep their kernels (and a
    recorded call's gradient is the oracle's)."""
    taken = _spy(monkeypatch, "log_small")
    eq, size = LOG_SMALL["cky"]
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn([size[c] for c in t], generator=g) for t in eq.split("->")[0].split(",")]
    func.log_einsum(eq, *xs, optimize="greedy")
    big = [torch.randn(40, 50, generator=g), torch.randn(50, 40, generator=g)]
    func.log_einsum("ij,jk,kl->il", *big, big[0])
    func.log_einsum("ij,jk->ik", xs[2][0], xs[2][0].t())  # two operands: their own step
    leaves = [x.clone().requires_grad_() for x in xs]
    out = func.log_einsum(eq, *leaves)
    assert taken == []
    cotangent = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, leaves, cotangent)
    want = log_vjp(eq, [x.double() for x in xs], cotangent.double(), math.nan)
    for gk, wk in zip(got, want, strict=True):
        torch.testing.assert_close(gk.double(), wk, **TOL[F32])
    with torch.no_grad():
        func.log_einsum(eq, *leaves)
    assert taken == [True]
