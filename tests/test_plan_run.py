"""``func.plan`` is what runs, and a plan runs: the plan a call makes equals ``func.plan``'s
for the same call (kernels included), and ``plan(*operands)`` is that call."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch

from oracle import brute, brute_viterbi
from semiring_einsum import func
from semiring_einsum.func import _engine

Tensor = torch.Tensor
F64 = torch.float64


def _made_plans(monkeypatch: pytest.MonkeyPatch, call: Callable[[], Any]) -> list[func.Plan]:
    """The plans the engine prepared while ``call`` ran."""
    seen: list[func.Plan] = []

    class Recording(_engine.Prepared):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.append(self.plan)

    monkeypatch.setattr(_engine, "Prepared", Recording)
    call()
    monkeypatch.undo()
    return seen


def _ints(*shapes: tuple[int, ...], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 3, s, generator=g).to(F64) for s in shapes]  # ties


CALLS = [
    # (name, semiring, equation, shapes, options for plan, the call)
    ("log-values", func.LOG, "ab,bc,cd->ad", [(4, 5), (5, 6), (6, 7)], {}, False),
    ("log-grad", func.LOG, "ab,bc,cd->ad", [(4, 5), (5, 6), (6, 7)], {}, True),
    ("log-policy", func.LOG, "ab,bc,cd->ad", [(4, 5), (5, 6), (6, 7)], {"nan": 0.0}, True),
    ("log-big", func.LOG, "bij,bjk->bik", [(2, 30, 40), (2, 40, 20)], {}, False),
    ("max-values", func.MAX_PLUS, "ij,jk->ik", [(100, 3), (3, 100)], {}, False),
    ("max-grad", func.MAX_PLUS, "ij,jk->ik", [(100, 3), (3, 100)], {}, True),
    ("min-grad", func.MIN_PLUS, "ab,bc,cd->ad", [(20, 30), (30, 40), (40, 50)], {}, True),
    ("viterbi-ranked", func.MAX_PLUS, "ab,bc,cd->ad", [(20, 30), (30, 40), (40, 50)], {}, "v"),
    ("viterbi-outer", func.MAX_PLUS, "ab,bc,ca->", [(40, 50), (50, 60), (60, 40)], {}, "v"),
    ("real", func.REAL, "ab,bc,cd->ad", [(4, 5), (5, 6), (6, 7)], {}, False),
]


@pytest.mark.parametrize("name, semiring, equation, shapes, options, mode", CALLS)
def test_the_plan_is_what_the_call_runs(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    semiring: func.Semiring,
    equation: str,
    shapes: list,
    options: dict,
    mode: object,
) -> None:
    xs = _ints(*shapes)
    grad = mode is True
    policy = options.get("nan", math.nan)
    leaves = [x.clone().requires_grad_(grad) for x in xs]
    p = func.plan(
        equation,
        *leaves,
        semiring=semiring,
        grad_of_neg_inf=policy,
        viterbi=mode == "v",
    )

    def call() -> Any:
        if mode == "v":
            return func.viterbi_einsum(equation, *leaves, semiring=semiring)
        if semiring is func.LOG:
            return func.log_einsum(equation, *leaves, grad_of_neg_inf=policy)
        return func.semiring_einsum(semiring, equation, *leaves)

    (made,) = _made_plans(monkeypatch, call)
    assert made == p
    assert [s.kernel for s in made.steps] == [s.kernel for s in p.steps]
    if name == "viterbi-ranked":  # a chain summed from the inside: ties need ranks
        assert "ranked" in [s.kernel.name for s in p.steps]
        assert "ranked" in str(p)
    if name == "log-values":
        assert [s.kernel.name for s in p.steps] == ["small"]


@pytest.mark.parametrize("semiring", ["log", "max", "min", "real"])
def test_a_plan_runs_its_call_and_differentiates(semiring: str) -> None:
    s = {"log": func.LOG, "max": func.MAX_PLUS, "min": func.MIN_PLUS, "real": func.REAL}[semiring]
    xs = [torch.randn(3, 4, dtype=F64), torch.randn(4, 5, dtype=F64), torch.randn(5, 2, dtype=F64)]
    p = func.plan("ab,bc,cd->ad", *xs, semiring=s, requires_grad=True)
    leaves = [x.clone().requires_grad_() for x in xs]
    out = p(*leaves)
    torch.testing.assert_close(out, brute(semiring, "ab,bc,cd->ad", *xs))
    got = torch.autograd.grad(out.sum(), leaves)
    leaves2 = [x.clone().requires_grad_() for x in xs]
    want = torch.autograd.grad(func.semiring_einsum(s, "ab,bc,cd->ad", *leaves2).sum(), leaves2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_a_viterbi_plan_returns_the_named_tuple() -> None:
    xs = _ints((4, 5), (5, 6), (6, 4), seed=3)
    p = func.plan("ab,bc,ca->a", *xs, semiring=func.MAX_PLUS, viterbi=True)
    result = p(*xs)
    assert isinstance(result, func.ViterbiResult)
    values, argmax = brute_viterbi("ab,bc,ca->a", *xs)
    torch.testing.assert_close(result.values, values)
    assert torch.equal(result.argmax, argmax)


def test_a_plan_composes_with_vmap_grad_and_compile() -> None:
    x, y = torch.randn(3, 4), torch.randn(4, 5)
    p = func.plan("ij,jk->ik", x, y, semiring=func.LOG, requires_grad=True)
    batch = torch.randn(6, 3, 4)
    got = torch.func.vmap(torch.func.grad(lambda a: p(a, y).sum()))(batch)
    want = torch.func.vmap(torch.func.grad(lambda a: func.log_einsum("ij,jk->ik", a, y).sum()))(
        batch
    )
    torch.testing.assert_close(got, want)
    compiled = torch.compile(lambda a, b: p(a, b), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, y), func.log_einsum("ij,jk->ik", x, y))


def test_a_plan_pickles_and_refuses_other_shapes_and_dtypes() -> None:
    x, y = torch.randn(3, 4), torch.randn(4, 5)
    p = pickle.loads(pickle.dumps(func.plan("ij,jk->ik", x, y, semiring=func.MAX_PLUS)))
    torch.testing.assert_close(p(x, y), func.max_einsum("ij,jk->ik", x, y))
    with pytest.raises(ValueError, match=r"shapes \(\(3, 4\), \(4, 5\)\), got \(\(3, 4\),"):
        p(x, torch.randn(4, 6))
    with pytest.raises(TypeError, match="float32 operands, got.*float64"):
        p(x.double(), y.double())
    bare = func.Plan(p.equation, p.semiring, p.contraction, p.path, p.steps, 4, p.peak_bytes)
    with pytest.raises(TypeError, match="only plans made by semiring_einsum.func.plan"):
        bare(x, y)


def test_plan_options_are_checked() -> None:
    with pytest.raises(ValueError, match="grad_of_neg_inf is an option of the log semiring"):
        func.plan("ij,jk->ik", (3, 4), (4, 5), semiring=func.MAX_PLUS, grad_of_neg_inf=0.0)
    with pytest.raises(ValueError, match="MAX_PLUS or MIN_PLUS"):
        func.plan("ij,jk->ik", (3, 4), (4, 5), semiring=func.LOG, viterbi=True)
    with pytest.raises(TypeError, match="semiring must be a Semiring"):
        func.plan("ij,jk->ik", (3, 4), (4, 5), semiring="log")  # type: ignore[arg-type]
