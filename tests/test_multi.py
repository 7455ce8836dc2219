"""Several outputs of one equation (``"bij,bjk->,bij,bjk"``) against one brute force per output."""

from __future__ import annotations

import math

import pytest
import torch

import semiring_einsum
from oracle import brute
from semiring_einsum import func
from semiring_einsum.func import EquationError, Semiring

Tensor = torch.Tensor
F64 = torch.float64

FUNCTIONS = {
    "real": func.einsum,
    "log": func.log_einsum,
    "max": func.max_einsum,
    "min": func.min_einsum,
}

CASES = {
    # equation with several outputs, operand shapes
    "factor-marginals": ("bij,bjk->,bij,bjk", [(2, 3, 4), (2, 4, 5)]),
    "per-batch": ("bij,bjk->b,bik,bj,k", [(2, 3, 4), (2, 4, 5)]),
    "intermediate-node": ("ij,jk,kl->,ik,jl,l", [(3, 4), (4, 5), (5, 2)]),
    "hmm-step": ("bi,ij,bj->,bi,ij,bj", [(2, 4), (4, 4), (2, 4)]),
    "cky": ("bsxk,bsyk,xyz->,bsxk,bsyk,xyz", [(1, 2, 3, 2), (1, 2, 3, 2), (3, 3, 2)]),
    "joint-only": ("ab,bc,cd->ad,bc", [(2, 3), (3, 2), (2, 3)]),  # 'ad' meets in no node
    "ellipsis": ("...ij,...jk->...,...ik", [(2, 3, 4), (2, 4, 2)]),
    "diagonal": ("ii,ij->,j,ij", [(3, 3), (3, 2)]),
    "broadcast": ("ij,jk->,ij,jk", [(1, 4), (4, 3)]),
    "same-twice": ("ij,jk->ik,ki", [(2, 3), (3, 2)]),
    "empty-sum": ("ij,jk->,ik", [(2, 0), (0, 3)]),
}


def _operands(shapes: list[tuple[int, ...]], seed: int, ints: bool) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    if ints:
        return [torch.randint(-2, 3, s, generator=g).to(F64) for s in shapes]
    return [torch.randn(s, generator=g, dtype=F64) for s in shapes]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("semiring", sorted(FUNCTIONS))
@pytest.mark.parametrize("optimize", ["auto", False])
def test_several_outputs_match_one_brute_force_each(
    case: str, semiring: str, optimize: object
) -> None:
    eq, shapes = CASES[case]
    lhs, rhs = eq.split("->")
    xs = _operands(shapes, 0, ints=semiring in ("max", "min"))
    if semiring == "log" and xs[0].numel():
        xs[0].view(-1)[0] = -math.inf
    outs = FUNCTIONS[semiring](eq, *xs, optimize=optimize, block_size=2)
    assert isinstance(outs, tuple) and len(outs) == len(rhs.split(","))
    for out, o in zip(outs, rhs.split(",")):
        want = brute(semiring, f"{lhs}->{o}", *xs)
        torch.testing.assert_close(out, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("case", sorted(CASES))
def test_several_outputs_in_the_boolean_semiring(case: str) -> None:
    eq, shapes = CASES[case]
    lhs, rhs = eq.split("->")
    g = torch.Generator().manual_seed(5)
    xs = [torch.rand(s, generator=g) < 0.4 for s in shapes]
    outs = func.bool_einsum(eq, *xs, block_size=2)
    for out, o in zip(outs, rhs.split(",")):
        assert out.dtype == torch.bool
        assert torch.equal(out, brute("real", f"{lhs}->{o}", *[x.double() for x in xs]) > 0)


@pytest.mark.parametrize("semiring", ["real", "log", "max"])
def test_several_outputs_are_differentiable(semiring: str) -> None:
    eq, shapes = CASES["hmm-step"]
    lhs, rhs = eq.split("->")
    xs = [x.requires_grad_() for x in _operands(shapes, 1, ints=False)]
    outs = FUNCTIONS[semiring](eq, *xs)
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(o.shape, generator=g, dtype=F64) for o in outs]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), xs)
    wants = [brute(semiring, f"{lhs}->{o}", *xs) for o in rhs.split(",")]
    want = torch.autograd.grad(sum((o * w).sum() for o, w in zip(wants, weights)), xs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if semiring == "log":
        assert torch.autograd.gradcheck(lambda *ys: func.log_einsum(eq, *ys), tuple(xs))


def test_several_outputs_compose_with_vmap() -> None:
    a = torch.randn(3, 2, 4, dtype=F64)
    b = torch.randn(4, 5, dtype=F64)
    z, ma, mb = torch.func.vmap(lambda x: func.log_einsum("ij,jk->,ij,jk", x, b))(a)
    for n in range(3):
        torch.testing.assert_close(z[n], brute("log", "ij,jk->", a[n], b))
        torch.testing.assert_close(ma[n], brute("log", "ij,jk->ij", a[n], b))
        torch.testing.assert_close(mb[n], brute("log", "ij,jk->jk", a[n], b))


def test_several_outputs_in_a_user_semiring() -> None:
    bottleneck = Semiring(
        "bottleneck",
        torch.maximum,
        torch.minimum,
        lambda x, dims: x.amax(dims) if dims else x,
        0.0,
        math.inf,
    )
    eq = "ij,jk,kl->il,jk"
    xs = _operands([(2, 3), (3, 4), (4, 2)], 3, ints=False)
    outs = func.semiring_einsum(bottleneck, eq, *xs)
    g = torch.zeros(2, 3, 4, 2, dtype=F64)
    joint = torch.minimum(
        torch.minimum(xs[0][:, :, None, None] + g, xs[1][None, :, :, None] + g),
        xs[2][None, None] + g,
    )
    torch.testing.assert_close(outs[0], joint.amax((1, 2)))
    torch.testing.assert_close(outs[1], joint.amax((0, 3)))


def test_marginals_share_the_work() -> None:
    """Five outputs: one forward and one outside pass, far fewer contractions than five calls."""
    reductions: list[tuple[int, ...]] = []

    def counted_sum(x: Tensor, dims: tuple[int, ...]) -> Tensor:
        reductions.append(dims)
        return torch.logsumexp(x, dims) if dims else x

    log = Semiring("counted", torch.logaddexp, torch.add, counted_sum, -math.inf, 0.0)
    lhs = "ab,bc,cd,de"
    outputs = ["", "ab", "bc", "cd", "de"]
    xs = _operands([(2, 3), (3, 3), (3, 3), (3, 2)], 4, ints=False)
    shared = func.semiring_einsum(log, f"{lhs}->{','.join(outputs)}", *xs)
    together = len(reductions)
    reductions.clear()
    alone = [func.semiring_einsum(log, f"{lhs}->{o}", *xs) for o in outputs]
    for a, b, o in zip(shared, alone, outputs):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, brute("log", f"{lhs}->{o}", *xs))
    steps = len(func.plan(f"{lhs}->", *xs, semiring=log).steps)
    assert steps == 3
    # Forward: one reduction per step; outside: one per operand of a step; then one per
    # output read off a node -- against a whole plan for each output alone.
    assert together <= steps + 2 * steps + len(outputs) < len(reductions), (
        together,
        len(reductions),
    )


def test_single_output_functions_refuse_several_outputs() -> None:
    x = torch.zeros(2, 3)
    for call in (
        lambda: func.viterbi_einsum("ij->,i", x),
        lambda: func.kbest_einsum("ij->,i", x, k=2),
        lambda: func.entropy_einsum("ij->,i", x),
        lambda: func.expectation_einsum("ij->,i", [x], [x]),
        lambda: func.sample_einsum("ij->,i", x),
    ):
        with pytest.raises(EquationError, match="returns one output"):
            call()
    # The drop-in layer keeps its single-output behaviour: an error, as the reference.
    with pytest.raises(ValueError):
        semiring_einsum.compile_equation("ij->,i")
    with pytest.raises(EquationError, match="output index 'k' appears in no operand"):
        func.log_einsum("ij->i,k", x)
