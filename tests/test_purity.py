"""Purity (DESIGN §2.2): no mutation of inputs, fresh outputs, any layout.

Every public function of ``semiring_einsum.func`` leaves its inputs
bit-identical (and their version counters untouched) through forward,
backward and ``torch.func`` transforms; returns tensors that share no storage
with the inputs, even for equations that only copy or permute; and gives the
same answers for transposed, strided and stride-0 (expanded) inputs as for
contiguous ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch.func import grad, vjp, vmap

from semiring_einsum import func

Tensor = torch.Tensor
Fn = Callable[..., tuple[Tensor, ...]]

PLAIN = func.Semiring(
    "plain", torch.add, torch.mul, lambda x, dims: x.sum(dims) if dims else x, 0.0, 1.0
)


def _one(f: Callable[..., Tensor], **kw: object) -> Fn:
    def call(eq: str, *xs: Tensor) -> tuple[Tensor, ...]:
        return (f(eq, *xs, **kw),)

    return call


def _viterbi(**kw: object) -> Fn:
    def call(eq: str, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(func.viterbi_einsum(eq, *xs, **kw))  # type: ignore[arg-type]

    return call


def _semiring(s: func.Semiring, **kw: object) -> Fn:
    def call(eq: str, *xs: Tensor) -> tuple[Tensor, ...]:
        return (func.semiring_einsum(s, eq, *xs, **kw),)  # type: ignore[arg-type]

    return call


# Each entry returns a tuple whose first element is the differentiable output.
FUNCS: dict[str, Fn] = {
    "einsum": _one(func.einsum),
    "einsum_blocked": _one(func.einsum, optimize=False, block_size=2),
    "log_einsum": _one(func.log_einsum, block_size=2),
    "log_einsum_joint": _one(func.log_einsum, optimize=False),
    "log_einsum_uniform": _one(func.log_einsum, grad_of_neg_inf="uniform"),
    "max_einsum": _one(func.max_einsum, block_size=2),
    "min_einsum": _one(func.min_einsum),
    "viterbi_einsum": _viterbi(block_size=2),
    "semiring_real": _semiring(func.REAL),
    "semiring_log": _semiring(func.LOG),
    "semiring_max": _semiring(func.MAX_PLUS),
    "semiring_min": _semiring(func.MIN_PLUS, block_size=1),
    "semiring_custom": _semiring(PLAIN, block_size=2),
}
# the same names, sorted by semiring, for the degenerate-equation tests
SEMIRING_FUNCS = [
    "einsum",
    "einsum_blocked",
    "log_einsum",
    "max_einsum",
    "min_einsum",
    "viterbi_einsum",
    "semiring_custom",
    "semiring_log",
]

EQUATIONS: dict[str, list[tuple[int, ...]]] = {
    "ij,jk->ik": [(3, 4), (4, 5)],
    "ab,bc,cd->ad": [(2, 3), (3, 4), (4, 2)],
    "ii->i": [(4, 4)],
    "ij->ji": [(3, 4)],
    "bij,bjk->bik": [(2, 3, 4), (2, 4, 3)],
    "...ij,...jk->...ik": [(2, 3, 4), (4, 2)],
    "ij,j->": [(3, 4), (4,)],
    "i,j->ij": [(3,), (2,)],
}

all_funcs = pytest.mark.parametrize("name", sorted(FUNCS))
all_equations = pytest.mark.parametrize("eq", sorted(EQUATIONS))


def make(shapes: Sequence[tuple[int, ...]], seed: int = 0, neg_inf: bool = True) -> list[Tensor]:
    """Random float32 inputs, with a few -inf entries (legal in every log-like semiring)."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for s in shapes:
        x = torch.randn(s, generator=g)
        if neg_inf and x.numel() > 2:
            x.view(-1)[1] = -torch.inf
        xs.append(x)
    return xs


def snapshot(xs: Sequence[Tensor]) -> list[tuple[Tensor, int]]:
    return [(x.detach().clone(), x._version) for x in xs]


def assert_untouched(xs: Sequence[Tensor], snap: Sequence[tuple[Tensor, int]]) -> None:
    for k, (x, (x0, v)) in enumerate(zip(xs, snap)):
        assert torch.equal(x.detach(), x0), f"operand {k} was modified"
        assert x._version == v, f"operand {k} was written in place (version {v} -> {x._version})"


def storages(ts: Sequence[Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in ts if t.numel() > 0}


def assert_fresh(outs: Sequence[Tensor], xs: Sequence[Tensor]) -> None:
    shared = storages(outs) & storages(xs)
    assert not shared, "an output shares storage with an input"


# ------------------------------------------------------------------ forward
@all_funcs
@all_equations
def test_forward_leaves_inputs_untouched(name: str, eq: str) -> None:
    xs = make(EQUATIONS[eq])
    snap = snapshot(xs)
    outs = FUNCS[name](eq, *xs)
    assert_untouched(xs, snap)
    assert_fresh(outs, xs)


@all_funcs
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eq", ["ij,jk->ik", "ij->ji", "ii->i"])
def test_other_dtypes_leave_inputs_untouched(name: str, dtype: torch.dtype, eq: str) -> None:
    xs = [x.to(dtype) for x in make(EQUATIONS[eq])]
    snap = snapshot(xs)
    outs = FUNCS[name](eq, *xs)
    assert_untouched(xs, snap)
    assert_fresh(outs, xs)
    assert outs[0].dtype == dtype
    outs[0].add_(1)
    assert_untouched(xs, snap)


@all_equations
def test_plan_leaves_inputs_untouched(eq: str) -> None:
    xs = make(EQUATIONS[eq])
    snap = snapshot(xs)
    for semiring in (func.REAL, func.LOG, func.MAX_PLUS, PLAIN):
        func.plan(eq, *xs, semiring=semiring, block_size=2)
    assert_untouched(xs, snap)


# ----------------------------------------------------------------- backward
@all_funcs
@all_equations
def test_backward_leaves_inputs_untouched(name: str, eq: str) -> None:
    xs = [x.requires_grad_() for x in make(EQUATIONS[eq], neg_inf=False)]
    snap = snapshot(xs)
    out = FUNCS[name](eq, *xs)[0]
    cot = torch.randn_like(out)
    cot0 = cot.clone()
    out.backward(cot)
    assert_untouched(xs, snap)
    assert torch.equal(cot, cot0), "the cotangent was modified"
    assert all(x.grad is not None for x in xs)
    assert_fresh([x.grad for x in xs if x.grad is not None], xs)


@pytest.mark.parametrize("name", ["einsum_blocked", "log_einsum", "max_einsum", "semiring_custom"])
def test_double_backward_leaves_inputs_untouched(name: str) -> None:
    eq = "ij,jk->ik"
    xs = [x.double().requires_grad_() for x in make(EQUATIONS[eq], neg_inf=False)]
    snap = snapshot(xs)
    out = FUNCS[name](eq, *xs)[0]
    (g,) = torch.autograd.grad(out.square().sum(), xs[0], create_graph=True)
    g.sum().backward()
    assert_untouched(xs, snap)


# --------------------------------------------------------------- torch.func
@all_funcs
@pytest.mark.parametrize("eq", ["ij,jk->ik", "ab,bc,cd->ad", "ii->i"])
def test_vmap_leaves_inputs_untouched_and_matches_a_loop(name: str, eq: str) -> None:
    fn = FUNCS[name]
    xs = make([(3, *s) for s in EQUATIONS[eq]])
    snap = snapshot(xs)
    batched = vmap(lambda *ys: fn(eq, *ys))(*xs)
    assert_untouched(xs, snap)
    assert_fresh(batched, xs)
    looped = [fn(eq, *(x[b] for x in xs)) for b in range(3)]
    for k, got in enumerate(batched):
        want = torch.stack([r[k] for r in looped])
        torch.testing.assert_close(got, want, equal_nan=True)


@all_funcs
def test_vmap_over_one_operand_only(name: str) -> None:
    fn = FUNCS[name]
    a, b = make([(3, 2, 4), (4, 5)])
    snap = snapshot([a, b])
    batched = vmap(lambda x: fn("ij,jk->ik", x, b)[0])(a)
    assert_untouched([a, b], snap)
    want = torch.stack([fn("ij,jk->ik", x, b)[0] for x in a])
    torch.testing.assert_close(batched, want, equal_nan=True)


@pytest.mark.parametrize(
    "name", ["einsum", "einsum_blocked", "log_einsum", "max_einsum", "semiring_custom"]
)
def test_grad_and_vjp_leave_inputs_untouched(name: str) -> None:
    fn = FUNCS[name]
    eq = "ij,jk->ik"
    xs = make(EQUATIONS[eq], neg_inf=False)
    snap = snapshot(xs)
    g = grad(lambda a, b: fn(eq, a, b)[0].sum(), argnums=(0, 1))(*xs)
    out, pullback = vjp(lambda a, b: fn(eq, a, b)[0], *xs)
    gs = pullback(torch.ones_like(out))
    assert_untouched(xs, snap)
    for got, want in zip(gs, g):
        torch.testing.assert_close(got, want)
    assert_fresh([*g, *gs, out], xs)


# ------------------------------------------- degenerate equations: no alias
DEGENERATE: dict[str, tuple[int, ...]] = {
    "ij->ij": (3, 4),
    "ij->ji": (3, 4),
    "i->i": (5,),
    "ii->i": (4, 4),
}


@pytest.mark.parametrize("name", SEMIRING_FUNCS)
@pytest.mark.parametrize("eq", sorted(DEGENERATE))
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_degenerate_equations_return_fresh_tensors(name: str, eq: str, requires_grad: bool) -> None:
    x = make([DEGENERATE[eq]], neg_inf=False)[0].requires_grad_(requires_grad)
    snap = snapshot([x])
    outs = FUNCS[name](eq, x)
    out = outs[0]
    assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert_fresh(outs, [x])
    expected = torch.einsum(eq, x.detach())
    torch.testing.assert_close(out.detach(), expected)
    for o in outs:  # values, and viterbi's argmax
        o.add_(1)
    assert_untouched([x], snap)
    torch.testing.assert_close(out.detach(), expected + 1)


@pytest.mark.parametrize("name", SEMIRING_FUNCS)
@pytest.mark.parametrize("eq", sorted(DEGENERATE))
def test_degenerate_equations_on_expanded_inputs(name: str, eq: str) -> None:
    """A stride-0 input: the output must still be a writable, fresh tensor."""
    shape = DEGENERATE[eq]
    base = torch.randn((1,) * (len(shape) - 1) + shape[-1:])
    x = base.expand(shape)
    snap = snapshot([x, base])
    out = FUNCS[name](eq, x)[0]
    assert_fresh([out], [x])
    out.add_(1)  # would fail on an expanded (overlapping) view
    assert_untouched([x, base], snap)
    torch.testing.assert_close(out, torch.einsum(eq, x) + 1)


@all_funcs
@all_equations
def test_add_inplace_after_the_call(name: str, eq: str) -> None:
    xs = [x.requires_grad_() for x in make(EQUATIONS[eq], neg_inf=False)]
    snap = snapshot(xs)
    out = FUNCS[name](eq, *xs)[0]
    before = out.detach().clone()
    out.add_(1)
    torch.testing.assert_close(out.detach(), before + 1)
    assert_untouched(xs, snap)


# ---------------------------------------------------------------- layouts
def _layouts(x: Tensor) -> dict[str, Tensor]:
    """``x``'s values in other memory layouts (same shape, same values)."""
    out = {"contiguous": x}
    if x.dim() >= 2:
        out["transposed"] = x.transpose(0, 1).contiguous().transpose(0, 1)
    big = torch.zeros([2 * n for n in x.shape], dtype=x.dtype)
    idx = tuple(slice(None, None, 2) for _ in x.shape)
    big[idx] = x
    out["strided"] = big[idx]
    return out


@all_funcs
@pytest.mark.parametrize("eq", ["ij,jk->ik", "ab,bc,cd->ad", "bij,bjk->bik", "ii->i"])
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_inputs_give_the_same_results(name: str, eq: str, layout: str) -> None:
    fn = FUNCS[name]
    xs = make(EQUATIONS[eq], neg_inf=False)
    ys = [_layouts(x)[layout] for x in xs]
    assert any(not y.is_contiguous() for y in ys)
    for x, y in zip(xs, ys):
        assert torch.equal(x, y)
    want = fn(eq, *xs)
    snap = snapshot(ys)
    got = fn(eq, *ys)
    assert_untouched(ys, snap)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@all_funcs
@pytest.mark.parametrize("eq", ["ij,jk->ik", "ab,bc,cd->ad"])
def test_non_contiguous_inputs_give_the_same_gradients(name: str, eq: str) -> None:
    fn = FUNCS[name]
    xs = make(EQUATIONS[eq], neg_inf=False)
    leaves = [x.clone().requires_grad_() for x in xs]
    fn(eq, *leaves)[0].sum().backward()
    # leaves stored transposed; the operands are transposed views of them
    tleaves = [x.t().contiguous().requires_grad_() for x in xs]
    fn(eq, *(t.t() for t in tleaves))[0].sum().backward()
    for a, b in zip(leaves, tleaves):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(b.grad.t(), a.grad)


@all_funcs
@pytest.mark.parametrize(
    "eq,shapes,expand",
    [
        ("ij,jk->ik", [(3, 4), (4, 5)], 1),  # rows of B all equal: B = b.expand(4, 5)
        ("ij,jk->ik", [(3, 4), (4, 5)], 0),
        ("ab,bc,cd->ad", [(2, 3), (3, 4), (4, 2)], 1),
        ("bij,bjk->bik", [(2, 3, 4), (2, 4, 3)], 0),  # the batch dim broadcast
    ],
)
def test_expanded_inputs_match_contiguous_copies(
    name: str, eq: str, shapes: list[tuple[int, ...]], expand: int
) -> None:
    fn = FUNCS[name]
    xs = make(shapes, neg_inf=False)
    shape = shapes[expand]
    base = torch.randn((1, *shape[1:])).requires_grad_()
    expanded = base.expand(shape)
    assert 0 in expanded.stride()
    copy = expanded.detach().clone().requires_grad_()
    snap = snapshot([base, expanded])
    with_expanded = [expanded if k == expand else x for k, x in enumerate(xs)]
    with_copy = [copy if k == expand else x for k, x in enumerate(xs)]
    got = fn(eq, *with_expanded)
    want = fn(eq, *with_copy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    got[0].sum().backward()
    want[0].sum().backward()
    assert_untouched([base, expanded], snap)
    assert base.grad is not None and copy.grad is not None
    torch.testing.assert_close(base.grad, copy.grad.sum(0, keepdim=True))


# ------------------------------------------------------ one tensor, twice
def _oracle(name: str, a: Tensor, b: Tensor) -> Tensor:
    """'ij,jk->ik' by brute force over the joint (i, j, k) space."""
    if name in ("einsum", "einsum_blocked", "semiring_real", "semiring_custom"):
        return (a[:, :, None] * b[None, :, :]).sum(1)
    terms = a[:, :, None] + b[None, :, :]
    if name.startswith("log") or name == "semiring_log":
        return terms.logsumexp(1)
    if name in ("min_einsum", "semiring_min"):
        return terms.amin(1)
    return terms.amax(1)


@all_funcs
@pytest.mark.parametrize("second", ["same", "transposed_view"])
def test_same_tensor_twice_with_gradients(name: str, second: str) -> None:
    fn = FUNCS[name]
    a = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    snap = snapshot([a])
    b = a if second == "same" else a.t()
    out = fn("ij,jk->ik", a, b)[0]
    cot = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, a, cot)
    assert_untouched([a], snap)

    ref = a.detach().clone().requires_grad_()
    want_out = _oracle(name, ref, ref if second == "same" else ref.t())
    (want_g,) = torch.autograd.grad(want_out, ref, cot)
    torch.testing.assert_close(out.detach(), want_out.detach())
    torch.testing.assert_close(g, want_g)


@pytest.mark.parametrize("name", ["einsum_blocked", "log_einsum", "semiring_custom"])
def test_same_tensor_twice_gradcheck(name: str) -> None:
    fn = FUNCS[name]
    a = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fn("ij,jk->ik", x, x)[0], (a,))
    assert torch.autograd.gradgradcheck(lambda x: fn("ij,jk->ik", x, x)[0], (a,))
