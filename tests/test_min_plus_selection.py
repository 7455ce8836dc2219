"""Viterbi and k-best in the min-plus semiring (``semiring=MIN_PLUS``): the shortest paths
and their assignments, against an oracle that enumerates every term in float64."""

from __future__ import annotations

import math

import pytest
import torch

from oracle import _terms, brute, joint
from semiring_einsum import func

Tensor = torch.Tensor
F64 = torch.float64

EQUATIONS = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,jk,kl->il", [(3, 4), (4, 3), (3, 2)]),
    ("ij,jk,kl->", [(2, 3), (3, 4), (4, 2)]),
    ("bij,bjk->bk", [(2, 3, 4), (2, 4, 3)]),
    ("ab,bc,cd,de->ae", [(2, 3), (3, 2), (2, 3), (3, 2)]),
]
OPTIMIZE = ["auto", False, "greedy"]


def _coords(flat: Tensor, summed: str, size: dict[str, int]) -> Tensor:
    coords, stride = [], 1
    for c in reversed(summed):
        coords.append(flat // stride % size[c])
        stride *= size[c]
    coords.reverse()
    return torch.stack(coords, dim=-1) if coords else flat.new_zeros(flat.shape + (0,))


def brute_argmin(equation: str, xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Min-plus values and the first minimiser in row-major order (NaN wins; a cell of +inf
    terms only: zeros)."""
    _, _, summed, size = joint(equation, *xs)
    terms, _ = _terms("min", equation, tuple(xs))
    nan = torch.isnan(terms)
    flat = torch.where(  # the first NaN, else the first minimal value (torch.argmin's)
        nan.any(-1), nan.to(torch.int8).argmax(-1), torch.where(nan, 0, terms).argmin(-1)
    )
    values = terms.gather(-1, flat.unsqueeze(-1)).squeeze(-1)
    argmin = _coords(flat, summed, size)
    return values, torch.where((values == math.inf).unsqueeze(-1), 0, argmin)


def brute_ksmallest(equation: str, xs: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The k smallest terms, ascending, ties row-major, NaN first; +inf is no term."""
    _, _, summed, size = joint(equation, *xs)
    terms, _ = _terms("min", equation, tuple(xs))
    order = terms.argsort(dim=-1, stable=True)  # (NaN last: moved first below)
    nan_first = torch.isnan(terms).gather(-1, order).to(torch.int8)
    order = order.gather(-1, nan_first.argsort(dim=-1, descending=True, stable=True))
    pad = max(k - terms.shape[-1], 0)
    values = terms.gather(-1, order)
    values = torch.cat([values, values.new_full(values.shape[:-1] + (pad,), math.inf)], -1)
    order = torch.cat([order, order.new_zeros(order.shape[:-1] + (pad,))], -1)
    values, order = values[..., :k], order[..., :k]
    argmin = _coords(order, summed, size)
    return values, torch.where((values == math.inf).unsqueeze(-1), 0, argmin)


def _operands(
    shapes: list[tuple[int, ...]], seed: int, special: bool, both: bool = True
) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(0, 3, s, generator=g).to(F64) for s in shapes]  # many ties
    if special:
        xs[0].view(-1)[0] = math.inf  # a forbidden edge
        xs[-1].view(-1)[-1] = -math.inf if both else math.inf  # (+inf - inf: NaN terms)
    return xs


@pytest.mark.parametrize("equation, shapes", EQUATIONS)
@pytest.mark.parametrize("optimize", OPTIMIZE)
@pytest.mark.parametrize("special", [False, True])
def test_min_plus_viterbi_is_the_first_minimiser(
    equation: str, shapes: list, optimize: object, special: bool
) -> None:
    # +inf and -inf together only on a joint plan: a pairwise plan does not make the joint
    # sum's NaN of +inf + -inf across steps (in max-plus as in min-plus).
    both = optimize is False
    xs = _operands(shapes, len(equation) + len(shapes), special, both)
    values, argmin = func.viterbi_einsum(equation, *xs, semiring=func.MIN_PLUS, optimize=optimize)
    want_values, want_argmin = brute_argmin(equation, xs)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(values, brute("min", equation, *xs), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(argmin, want_argmin)


@pytest.mark.parametrize("equation, shapes", EQUATIONS)
@pytest.mark.parametrize("k", [1, 3, 40])
def test_min_plus_kbest_is_the_k_smallest(equation: str, shapes: list, k: int) -> None:
    # (No NaN terms: a pairwise k-best keeps k partial terms per cell, so it cannot list
    # every NaN that +inf + -inf makes later, in max-plus as in min-plus.)
    xs = _operands(shapes, 7 * len(shapes) + k, special=True, both=False)
    values, argmin = func.kbest_einsum(equation, *xs, k=k, semiring=func.MIN_PLUS)
    want_values, want_argmin = brute_ksmallest(equation, xs, k)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(argmin, want_argmin)
    if k == 1:  # the k = 1 case is Viterbi's
        v, a = func.viterbi_einsum(equation, *xs, semiring=func.MIN_PLUS)
        torch.testing.assert_close(values[..., 0], v, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(argmin[..., 0, :], a)


def test_nan_wins_in_min_plus_as_in_max_plus() -> None:
    a = torch.tensor([[1.0, math.nan, 0.0]], dtype=F64)
    b = torch.zeros(3, 2, dtype=F64)
    values, argmin = func.viterbi_einsum("ij,jk->ik", a, b, semiring=func.MIN_PLUS)
    assert torch.isnan(values).all() and argmin[..., 0].tolist() == [[1, 1]]


def test_gradients_go_to_the_minimising_term() -> None:
    """The values of min-plus Viterbi and k-best are differentiable like ``min_einsum``'s."""
    xs = [torch.randn(3, 4, dtype=F64), torch.randn(4, 5, dtype=F64)]
    leaves = [x.clone().requires_grad_() for x in xs]
    values, _ = func.viterbi_einsum("ij,jk->ik", *leaves, semiring=func.MIN_PLUS)
    got = torch.autograd.grad(values.sum(), leaves)
    leaves2 = [x.clone().requires_grad_() for x in xs]
    want = torch.autograd.grad(func.min_einsum("ij,jk->ik", *leaves2).sum(), leaves2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    kv, _ = func.kbest_einsum("ij,jk->ik", *leaves, k=2, semiring=func.MIN_PLUS)
    gk = torch.autograd.grad(kv[..., 0].sum(), leaves)
    for g, w in zip(gk, want):
        torch.testing.assert_close(g, w)


def test_inputs_are_left_alone() -> None:
    xs = [torch.randn(3, 4), torch.randn(4, 5)]
    before = [x.clone() for x in xs]
    func.viterbi_einsum("ij,jk->ik", *xs, semiring=func.MIN_PLUS)
    func.kbest_einsum("ij,jk->ik", *xs, k=2, semiring=func.MIN_PLUS)
    assert all(torch.equal(x, b) for x, b in zip(xs, before))


@pytest.mark.parametrize(
    "semiring, error, match",
    [
        (func.LOG, ValueError, "MAX_PLUS or MIN_PLUS .* got 'log'"),
        (func.REAL, ValueError, "got 'real'"),
        (func.kbest_semiring(2), ValueError, "MAX_PLUS or MIN_PLUS"),
        ("min", TypeError, "got str"),
    ],
)
def test_other_semirings_are_refused(semiring: object, error: type, match: str) -> None:
    a, b = torch.randn(2, 3), torch.randn(3, 4)
    with pytest.raises(error, match=match):
        func.viterbi_einsum("ij,jk->ik", a, b, semiring=semiring)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        func.kbest_einsum("ij,jk->ik", a, b, k=2, semiring=semiring)  # type: ignore[arg-type]
