"""Gradients: gradcheck / gradgradcheck, agreement with the oracle's autograd,
and the ``grad_of_neg_inf`` policy of :func:`func.log_einsum` (DESIGN §3.1)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from oracle import brute, joint, log_vjp
from semiring_einsum import func

USER_LOG = dataclasses.replace(func.LOG)  # generic path, differentiated by autograd


def _user_log(eq, *xs, **kw):
    return func.semiring_einsum(USER_LOG, eq, *xs, **kw)


FUNCTIONS = {
    "real": (func.einsum, "real"),
    "log": (func.log_einsum, "log"),
    "max": (func.max_einsum, "max"),
    "min": (func.min_einsum, "min"),
    "user_log": (_user_log, "log"),
}

EQUATIONS = [
    ("ij,jk->ik", [(3, 4), (4, 2)]),
    ("ij,jk,kl->il", [(2, 3), (3, 2), (2, 3)]),
    ("bij,bjk->bik", [(2, 2, 3), (2, 3, 2)]),
    ("iij,jk", [(3, 3, 2), (2, 2)]),
    ("...ij,...jk->...ik", [(2, 2, 3), (3, 2)]),
    ("ij->", [(3, 4)]),
    ("i,j->ij", [(3,), (2,)]),
    ("ij,jk->ik", [(3, 1), (2, 2)]),
    ("abce,abde,abdf->acd", [(2, 2, 3, 2), (2, 2, 2, 2), (2, 2, 2, 1)]),
]

# (optimize, block_size): the pairwise plan with the default budget, and the
# joint blocked loop with ragged windows.
PLANS = {"auto": ("auto", None), "joint-bs2": (False, 2)}


def make(shapes, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, generator=g, dtype=torch.float64) * scale).requires_grad_() for s in shapes
    ]


def tie_free(equation, shapes, seed=0, gap=1e-3, tries=200):
    """Float64 operands whose max-plus and min-plus terms are at least ``gap``
    apart within every output cell (so finite differences never cross a tie)."""
    for s in range(seed, seed + tries):
        xs = make(shapes, s, scale=2.0)
        tensors, output, summed, size = joint(equation, *[x.detach() for x in xs])
        full = [size[c] for c in output + summed]
        terms = sum(t.expand(full) for t in tensors).reshape([size[c] for c in output] + [-1])
        if terms.shape[-1] < 2:
            return xs
        top = terms.sort(dim=-1).values
        if (top[..., 1:] - top[..., :-1]).min() > gap:
            return xs
    raise AssertionError("no tie-free data found")


def _eq_id(case):
    eq, shapes = case
    return f"{eq}|{'x'.join(''.join(map(str, s)) for s in shapes)}"


# ---------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("semiring", ["real", "log"])
@pytest.mark.parametrize(("equation", "shapes"), EQUATIONS, ids=[_eq_id(c) for c in EQUATIONS])
def test_gradcheck(equation, shapes, semiring, plan):
    fn, _ = FUNCTIONS[semiring]
    optimize, block_size = PLANS[plan]
    xs = make(shapes, 1)
    assert gradcheck(
        lambda *a: fn(equation, *a, optimize=optimize, block_size=block_size),
        xs,
        check_forward_ad=True,
        check_batched_grad=True,
    )


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("semiring", ["max", "min"])
@pytest.mark.parametrize(("equation", "shapes"), EQUATIONS, ids=[_eq_id(c) for c in EQUATIONS])
def test_gradcheck_tropical(equation, shapes, semiring, plan):
    fn, _ = FUNCTIONS[semiring]
    optimize, block_size = PLANS[plan]
    xs = tie_free(equation, shapes)
    assert gradcheck(
        lambda *a: fn(equation, *a, optimize=optimize, block_size=block_size),
        xs,
        check_forward_ad=True,
        check_batched_grad=True,
    )


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("semiring", ["real", "log"])
@pytest.mark.parametrize(
    ("equation", "shapes"),
    [EQUATIONS[0], EQUATIONS[1], EQUATIONS[3], EQUATIONS[7]],
    ids=[_eq_id(c) for c in (EQUATIONS[0], EQUATIONS[1], EQUATIONS[3], EQUATIONS[7])],
)
def test_gradgradcheck(equation, shapes, semiring, plan):
    fn, _ = FUNCTIONS[semiring]
    optimize, block_size = PLANS[plan]
    xs = make(shapes, 2)
    assert gradgradcheck(
        lambda *a: fn(equation, *a, optimize=optimize, block_size=block_size),
        xs,
        check_batched_grad=True,
    )


def test_gradcheck_user_semiring():
    xs = make([(3, 4), (4, 2), (2, 3)], 3)
    for optimize, block_size in PLANS.values():
        assert gradcheck(
            lambda *a, o=optimize, b=block_size: _user_log(
                "ij,jk,kl->il", *a, optimize=o, block_size=b
            ),
            xs,
        )


def test_gradcheck_viterbi_values():
    xs = tie_free("ij,jk->ik", [(3, 4), (4, 2)])
    for block_size in (1, 3, None):
        assert gradcheck(
            lambda *a, b=block_size: func.viterbi_einsum("ij,jk->ik", *a, block_size=b)[0],
            xs,
            check_forward_ad=True,
        )


# ------------------------------------------------------ agreement with oracle
@pytest.mark.parametrize("block_size", [1, 3, None], ids=["bs1", "bs3", "None"])
@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
@pytest.mark.parametrize("semiring", list(FUNCTIONS))
@pytest.mark.parametrize(("equation", "shapes"), EQUATIONS, ids=[_eq_id(c) for c in EQUATIONS])
def test_grad_matches_oracle(equation, shapes, semiring, optimize, block_size):
    fn, name = FUNCTIONS[semiring]
    xs = tie_free(equation, shapes, seed=7)
    ys = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(equation, *xs, optimize=optimize, block_size=block_size)
    want = brute(name, equation, *ys)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = torch.autograd.grad(out, xs, g)
    ref = torch.autograd.grad(want, ys, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize("semiring", ["max", "min"])
def test_tropical_tie_gradient_goes_to_first(semiring, block_size):
    """At a tie the whole gradient goes to the first maximiser (row-major),
    not split evenly as torch.amax would."""
    fn, _ = FUNCTIONS[semiring]
    a = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    out = fn("ij,jk->ik", a, b, block_size=block_size, optimize=False)
    ga, gb = torch.autograd.grad(out.sum(), (a, b))
    assert torch.equal(ga, torch.tensor([[2.0, 0, 0], [2.0, 0, 0]], dtype=torch.float64))
    assert torch.equal(gb, torch.tensor([[2.0, 2.0], [0, 0], [0, 0]], dtype=torch.float64))


@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
@pytest.mark.parametrize("semiring", ["max", "min"])
def test_tropical_tie_gradient_first_appearance_order_with_diagonal(semiring, optimize, block_size):
    """'aab->' sums (a, b) in order of first appearance; the tie between terms
    (a, b) = (0, 1) and (1, 0) goes to (0, 1), i.e. to x[0, 0, 1]."""
    fn, _ = FUNCTIONS[semiring]
    sign = 1.0 if semiring == "max" else -1.0
    x = torch.zeros(2, 2, 2, dtype=torch.float64)
    x[0, 0, 1] = sign
    x[1, 1, 0] = sign
    x.requires_grad_()
    out = fn("aab->", x, optimize=optimize, block_size=block_size)
    (gx,) = torch.autograd.grad(out, (x,))
    want = torch.zeros(2, 2, 2, dtype=torch.float64)
    want[0, 0, 1] = 1.0
    assert torch.equal(gx, want)


# ----------------------------------------------------------- grad_of_neg_inf
def _softmax_cells(a, b):
    """Softmax weights w[i, j, k] of the terms a[i, j] + b[j, k] of each cell (i, k)."""
    t = a[:, :, None] + b[None, :, :]
    return torch.softmax(t, dim=1)


POLICIES = [0.0, 1.5, -2.0, 1, "uniform"]


@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
@pytest.mark.parametrize("policy", POLICIES, ids=[str(p) for p in POLICIES])
def test_grad_of_neg_inf_matmul_by_hand(policy, optimize, block_size):
    """'ij,jk->ik' with row 0 of A all -inf: cells (0, k) are dead (3 terms each)."""
    g0 = torch.Generator().manual_seed(4)
    a = torch.randn(2, 3, generator=g0, dtype=torch.float64)
    a[0] = -math.inf
    b = torch.randn(3, 2, generator=g0, dtype=torch.float64)
    cot = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    c = 1.0 / 3.0 if policy == "uniform" else float(policy)
    w = _softmax_cells(a[1:], b)[0]  # (j, k) weights of the finite cells (1, k)
    want_a = torch.empty(2, 3, dtype=torch.float64)
    want_a[0] = c * cot[0].sum()  # each a[0, j] is in one term of each dead cell
    want_a[1] = (w * cot[1]).sum(1)
    want_b = c * cot[0][None, :] + w * cot[1][None, :]

    a_ = a.clone().requires_grad_()
    b_ = b.clone().requires_grad_()
    out = func.log_einsum(
        "ij,jk->ik", a_, b_, grad_of_neg_inf=policy, optimize=optimize, block_size=block_size
    )
    assert (out[0] == -math.inf).all() and torch.isfinite(out[1]).all()
    ga, gb = torch.autograd.grad(out, (a_, b_), cot)
    torch.testing.assert_close(ga, want_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, want_b, rtol=1e-12, atol=1e-12)
    # The oracle encodes the same rule.
    oa, ob = log_vjp("ij,jk->ik", [a, b], cot, policy)
    torch.testing.assert_close(oa, want_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ob, want_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block_size", [1, 4, None], ids=["bs1", "bs4", "None"])
@pytest.mark.parametrize("policy", POLICIES, ids=[str(p) for p in POLICIES])
def test_grad_of_neg_inf_multiplicity(policy, block_size):
    """'i,jk->i': a[0] = -inf takes part in all N = 6 terms of dead cell 0, so it
    gets 6·c·g[0] ('uniform': exactly g[0]); each b[j, k] is in one of them."""
    a = torch.tensor([-math.inf, 0.3], dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    b = b0.clone().requires_grad_()
    cot = torch.tensor([2.0, -1.5], dtype=torch.float64)
    out = func.log_einsum("i,jk->i", a, b, grad_of_neg_inf=policy, block_size=block_size)
    ga, gb = torch.autograd.grad(out, (a, b), cot)
    c = 1.0 / 6.0 if policy == "uniform" else float(policy)
    soft = torch.softmax(b0.reshape(-1), 0).reshape(2, 3)
    torch.testing.assert_close(ga, torch.tensor([6 * c * 2.0, -1.5], dtype=torch.float64))
    torch.testing.assert_close(gb, c * 2.0 + soft * -1.5)


@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize("policy", POLICIES, ids=[str(p) for p in POLICIES])
def test_grad_of_neg_inf_broadcast_multiplicity(policy, block_size):
    """'ij,jk->ik' with B of shape (1, 2) broadcast along j (size 3): B[0, k] is in
    all 3 terms of the dead cell (0, k), so it gets 3·c·g[0, k]."""
    a = torch.randn(2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a[0] = -math.inf
    b = torch.randn(1, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    cot = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = func.log_einsum("ij,jk->ik", a_, b_, grad_of_neg_inf=policy, block_size=block_size)
    ga, gb = torch.autograd.grad(out, (a_, b_), cot)
    c = 1.0 / 3.0 if policy == "uniform" else float(policy)
    # finite row: softmax over j of a[1, j] (b is constant along j), weights sum to 1
    want_b = 3 * c * cot[0] + cot[1]
    torch.testing.assert_close(gb, want_b[None, :])
    want_a0 = torch.full((3,), c * cot[0].sum().item(), dtype=torch.float64)
    torch.testing.assert_close(ga[0], want_a0)
    torch.testing.assert_close(ga[1], torch.softmax(a[1], 0) * cot[1].sum())


@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
def test_grad_of_neg_inf_default_nan(optimize, block_size):
    """Default policy: NaN gradient for the inputs touching a dead cell, ordinary
    (finite) gradients for the rest."""
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    a[0] = -math.inf
    b = torch.randn(4, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = func.log_einsum("ij,jk->ik", a_, b_, optimize=optimize, block_size=block_size)
    assert not torch.isnan(out).any()
    cot = torch.ones(3, 2, dtype=torch.float64)
    ga, gb = torch.autograd.grad(out, (a_, b_), cot)
    assert torch.isnan(ga[0]).all()
    assert torch.isnan(gb).all()  # every b[j, k] is in a term of the dead cell (0, k)
    want = (_softmax_cells(a[1:], b) * cot[1:, None, :]).sum(2)
    torch.testing.assert_close(ga[1:], want)
    # Explicit NaN is the same as the default.
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = func.log_einsum("ij,jk->ik", a_, b_, grad_of_neg_inf=math.nan, block_size=block_size)
    ga2, _ = torch.autograd.grad(out, (a_, b_), cot)
    torch.testing.assert_close(ga2, ga, equal_nan=True)


@pytest.mark.parametrize("policy", [0.5, "uniform"])
def test_grad_of_neg_inf_forward_mode_agrees(policy):
    """The jvp rule applies the same weights: jacfwd == jacrev."""
    a = torch.randn(2, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    a[0] = -math.inf
    b = torch.randn(3, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def f(b):
        return func.log_einsum("ij,jk->ik", a, b, grad_of_neg_inf=policy, block_size=2)

    jr = torch.func.jacrev(f)(b)
    jf = torch.func.jacfwd(f)(b)
    torch.testing.assert_close(jf, jr)
    c = 1.0 / 3.0 if policy == "uniform" else policy
    # d out[0, k] / d b[j, k'] = c if k == k' else 0
    want = torch.zeros(2, 3, 2, dtype=torch.float64)
    for k in range(2):
        want[k, :, k] = c
    torch.testing.assert_close(jr[0], want)


@pytest.mark.parametrize("policy", [0.0, 2.0, "uniform"])
@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize(
    ("equation", "shapes"),
    [
        ("ij,jk,kl->il", [(3, 2), (2, 3), (3, 2)]),
        ("iij,jk->ik", [(3, 3, 2), (2, 2)]),
        ("bij,bjk->bik", [(2, 2, 3), (2, 3, 2)]),
    ],
)
def test_grad_of_neg_inf_matches_oracle(equation, shapes, block_size, policy):
    g = torch.Generator().manual_seed(12)
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    xs = [torch.where(torch.rand(s, generator=g) < 0.5, -math.inf, x) for s, x in zip(shapes, xs)]
    xs[0][0] = -math.inf
    ins = [x.clone().requires_grad_() for x in xs]
    out = func.log_einsum(equation, *ins, grad_of_neg_inf=policy, block_size=block_size)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, ins, cot)
    want = log_vjp(equation, xs, cot, policy)
    assert torch.isneginf(out).any()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize(
    "optimize", ["auto", False, [(0, 1), (0, 1)]], ids=["auto", "joint", "path"]
)
def test_dead_intermediate_cell_default_policy(optimize, block_size):
    """A pairwise plan meets cells that are all -inf in an intermediate result
    ('ij,jk->ik' with column 0 of B all -inf) while every final cell is finite:
    gradients are finite and equal the joint sum's (the oracle's)."""
    g = torch.Generator().manual_seed(13)
    a = torch.randn(2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, 2, generator=g, dtype=torch.float64)
    c = torch.randn(2, 2, generator=g, dtype=torch.float64)
    b[:, 0] = -math.inf
    xs = [a, b, c]
    ins = [x.clone().requires_grad_() for x in xs]
    out = func.log_einsum("ij,jk,kl->il", *ins, optimize=optimize, block_size=block_size)
    assert torch.isfinite(out).all()
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, ins, cot)
    want = log_vjp("ij,jk,kl->il", xs, cot, math.nan)
    for gg, wg in zip(got, want):
        assert torch.isfinite(gg).all()
        torch.testing.assert_close(gg, wg, rtol=1e-10, atol=1e-10)
