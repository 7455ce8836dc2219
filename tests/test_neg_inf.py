"""-inf as a normal log-space input: exact values and gradients on -inf-heavy data, the
``grad_of_neg_inf`` rule at cells whose terms are all -inf (a weight 0 does not use the
cotangent, whatever it holds, as in torch-semiring-einsum), in every mode; and the real
semiring on bool and integer tensors.

Every expected value comes from the float64 brute-force oracle (``tests/oracle.py``) or from
:func:`torch.einsum` / the installed reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from oracle import _terms, brute, log_vjp
from semiring_einsum import func
from semiring_einsum.func import _ops

INF = math.inf
F64 = torch.float64
POLICIES = [0.0, "nan", 0.5, "uniform"]


def _triangle(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A stack RNN's gamma (b, i, k, ...): -inf where k <= i, random elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    i = torch.arange(shape[1])
    below = (i[None, :] <= i[:, None]).reshape(1, shape[1], shape[2], *([1] * (len(shape) - 3)))
    return x.masked_fill(below, -INF)


def _masked(shape: tuple[int, ...], seed: int, p: float, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64) * scale
    return x.masked_fill(torch.rand(shape, generator=g, dtype=F64) < p, -INF)


def _dead_rows(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random, with a few rows entirely -inf (every cell they meet is all -inf)."""
    x = _masked(shape, seed, 0.0)
    x[(0,) * (len(shape) - 1)] = -INF
    x[(-1,) * (len(shape) - 2)] = -INF
    return x


POP = "bikqxty,bktyr->biqxry"  # the stack RNN's POP step: BLAS, -inf triangle
CASES = {
    # name: (equation, operands)
    "pop-triangle": (
        POP,
        lambda: [_triangle((2, 5, 5, 2, 3, 2, 3), 0), _masked((2, 5, 2, 3, 2), 1, 0)],
    ),
    # big enough that the BLAS route copies the operand into a summed-last layout
    "pop-triangle-relaid": (
        POP,
        lambda: [_triangle((4, 24, 24, 2, 3, 2, 3), 2), _masked((4, 24, 2, 3, 2), 3, 0)],
    ),
    "bmm-dead-rows": ("bij,bjk->bik", lambda: [_dead_rows((2, 5, 6), 4), _dead_rows((2, 6, 4), 5)]),
    "bmm-half-masked": (
        "bij,bjk->bik",
        lambda: [_masked((2, 6, 7), 6, 0.5), _masked((2, 7, 5), 7, 0.5)],
    ),
    "mm-mostly-masked": ("ij,jk->ik", lambda: [_masked((6, 5), 8, 0.85), _masked((5, 7), 9, 0.85)]),
    # terms spread over hundreds of nats: cells that fail the BLAS certificate, next to dead ones
    "bmm-spread": (
        "bij,bjk->bik",
        lambda: [_dead_rows((2, 8, 9), 10) * 150, _masked((2, 9, 6), 11, 0.2, 150)],
    ),
    # not a BLAS step (j only in the first operand): the blocked path
    "blocked": ("ij,k->ik", lambda: [_masked((4, 5), 12, 0.6), _masked((3,), 13, 0.3)]),
    "chain": (
        "ij,jk,kl->il",
        lambda: [_masked((3, 4), 14, 0.5), _masked((4, 5), 15, 0.5), _masked((5, 2), 16, 0.5)],
    ),
}


def _cotangent(out: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    if kind == "finite":
        return g
    value = {"nan": math.nan, "inf": INF, "-inf": -INF}[kind]
    return torch.where(torch.isneginf(out.detach()), value, g)


def _close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-9) -> None:
    torch.testing.assert_close(got.to(F64), want, atol=atol, rtol=1e-7, equal_nan=True)


@pytest.mark.parametrize("block_size", [2, None], ids=["bs2", "auto"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients_on_neg_inf_heavy_data(case: str, block_size: int | None) -> None:
    equation, make = CASES[case]
    xs = [x.requires_grad_() for x in make()]
    out = func.log_einsum(equation, *xs, block_size=block_size, grad_of_neg_inf=0.0)
    want = brute("log", equation, *[x.detach() for x in xs])
    _close(out.detach(), want)
    g = _cotangent(out, "nan", 1)
    grads = torch.autograd.grad(out, xs, g)
    for got, exp in zip(grads, log_vjp(equation, xs, g, 0.0)):
        assert torch.isfinite(got).all()
        _close(got, exp)


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "finite"])
@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize(
    "case", ["pop-triangle", "bmm-dead-rows", "bmm-spread", "blocked", "chain"]
)
def test_cotangent_at_dead_cells(case: str, policy: object, kind: str) -> None:
    """Per policy, with NaN / inf cotangents sent back into the all -inf cells."""
    equation, make = CASES[case]
    xs = [x.requires_grad_() for x in make()]
    out = func.log_einsum(equation, *xs, grad_of_neg_inf=policy)
    g = _cotangent(out, kind, 2)
    grads = torch.autograd.grad(out, xs, g)
    want = log_vjp(equation, xs, g, policy)
    for got, exp in zip(grads, want):
        _close(got, exp)
    if policy == 0.0:
        assert all(torch.isfinite(gr).all() for gr in grads)


def test_the_reference_example() -> None:
    """A later logsumexp sends NaN into the -inf cell; grad_of_neg_inf=0 keeps it out."""
    a = torch.tensor([[-INF, -INF], [0.0, 1.0]], requires_grad=True)
    w = torch.tensor([0.5, 0.25], requires_grad=True)
    h = func.log_einsum("ij,i->i", a, w, grad_of_neg_inf=0.0)
    torch.logsumexp(h.unsqueeze(1), dim=1)[1].backward()
    torch.testing.assert_close(a.grad, torch.tensor([[0.0, 0.0], [0.2689414, 0.7310586]]))
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("mode", ["func.vjp", "func.grad", "vmap", "double-backward"])
@pytest.mark.parametrize("case", ["pop-triangle", "bmm-spread", "blocked"])
def test_dead_cells_in_every_mode(case: str, mode: str, policy: object) -> None:
    equation, make = CASES[case]
    xs = make()
    out = func.log_einsum(equation, *xs)
    g = _cotangent(out, "nan", 3)
    want = log_vjp(equation, xs, g, policy)

    def f(*ys: torch.Tensor) -> torch.Tensor:
        return func.log_einsum(equation, *ys, grad_of_neg_inf=policy)

    if mode == "func.vjp":
        got = torch.func.vjp(f, *xs)[1](g)
    elif mode == "func.grad":  # a later logsumexp sends NaN into rows of -inf cells

        def loss(o: torch.Tensor) -> torch.Tensor:
            return torch.logsumexp(o, dim=-1).sum()

        got = torch.func.grad(lambda *ys: loss(f(*ys)), argnums=tuple(range(len(xs))))(*xs)
        g = torch.func.grad(loss)(brute("log", equation, *xs))
        want = log_vjp(equation, xs, g, policy)
    elif mode == "vmap":  # a batch of two cotangents, one of them NaN at the dead cells
        gs = torch.stack([g, _cotangent(out, "finite", 4)])
        pull = torch.func.vjp(f, *xs)[1]
        got = [t[0] for t in torch.func.vmap(pull)(gs)]
        second = log_vjp(equation, xs, gs[1], policy)
        for gk, exp in zip(torch.func.vmap(pull)(gs), second):
            _close(gk[1], exp)
    else:  # the backward recorded for a second derivative (the differentiable vjp)
        ys = [x.clone().requires_grad_() for x in xs]
        got = torch.autograd.grad(f(*ys), ys, g, create_graph=True)
    for gk, exp in zip(got, want):
        _close(gk.detach(), exp)


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("case", ["pop-triangle", "bmm-dead-rows", "blocked"])
def test_jvp_at_dead_cells(case: str, policy: object) -> None:
    """Forward mode: a weight-0 cell's tangent is 0 even where the operands' tangents are NaN."""
    equation, make = CASES[case]
    xs = make()
    gen = torch.Generator().manual_seed(5)
    ts = [torch.randn(x.shape, generator=gen, dtype=F64) for x in xs]
    ts[0] = torch.where(torch.isneginf(xs[0]), math.nan, ts[0])  # NaN tangents at -inf entries

    def f(*ys: torch.Tensor) -> torch.Tensor:
        return func.log_einsum(equation, *ys, grad_of_neg_inf=policy)

    out, tangent = torch.func.jvp(f, tuple(xs), tuple(ts))
    terms, _ = _terms("log", equation, tuple(xs))
    tterms, _ = _terms("log", equation, tuple(ts))
    top = torch.logsumexp(terms, -1, keepdim=True)
    dead = torch.isneginf(top)
    weights = torch.exp(terms - torch.where(dead, 0.0, top))
    n = terms.shape[-1]
    if policy == "nan":
        weights = torch.where(dead, math.nan, weights)
    else:
        weights = torch.where(dead, 1.0 / n if policy == "uniform" else float(policy), weights)
    want = (weights * tterms).sum(-1)
    if policy == 0.0:  # the transpose of not using the cotangent there
        want = torch.where(dead.squeeze(-1), 0.0, want)
    _close(tangent, want)
    _close(out, top.squeeze(-1))


def test_certified_blas_route_keeps_dead_cells() -> None:
    """A -inf triangle no longer sends the BLAS step to the slow exact route: the forward
    is certified with its dead cells, and the backward comes from its residuals."""
    equation, make = CASES["pop-triangle"]
    xs = [x.requires_grad_() for x in make()]
    out = func.log_einsum(equation, *xs, grad_of_neg_inf=0.0)
    assert int(out.grad_fn.saved_tensors[-1]) == _ops.CERTIFIED_DEAD
    g = _cotangent(out, "inf", 6)
    for got, exp in zip(torch.autograd.grad(out, xs, g), log_vjp(equation, xs, g, 0.0)):
        _close(got, exp)


def test_inf_and_nan_operands_next_to_dead_rows() -> None:
    """A row of -inf meeting a row with +inf or NaN gives NaN (-inf + inf), not -inf."""
    a = torch.randn(2, 4, 5, dtype=F64)
    b = torch.randn(2, 5, 3, dtype=F64)
    a[0, 1] = -INF
    b[0, 2, 0] = INF
    b[1, 0, 1] = math.nan
    a[1, 2] = -INF
    got = func.log_einsum("bij,bjk->bik", a, b)
    _close(got, brute("log", "bij,bjk->bik", a, b))
    assert torch.isnan(got[0, 1, 0]) and torch.isneginf(got[0, 1, 1])


def test_compiled_dead_cells() -> None:
    equation, make = CASES["bmm-dead-rows"]
    xs = make()

    @torch.compile(backend="aot_eager", fullgraph=False)
    def loss(*ys: torch.Tensor) -> torch.Tensor:
        out = func.log_einsum(equation, *ys, grad_of_neg_inf=0.0)
        return torch.logsumexp(out, dim=-1).sum()  # NaN into the all -inf rows

    ys = [x.clone().requires_grad_() for x in xs]
    grads = torch.autograd.grad(loss(*ys), ys)
    zs = [x.clone().requires_grad_() for x in xs]
    want = torch.autograd.grad(
        torch.logsumexp(func.log_einsum(equation, *zs, grad_of_neg_inf=0.0), dim=-1).sum(), zs
    )
    for got, exp in zip(grads, want):
        assert torch.isfinite(got).all()
        _close(got, exp.to(F64))


# ------------------------------------------------------------- bool and integer einsum
BOOL_CASES = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,j->i", [(3, 4), (4,)]),
    ("ij->i", [(3, 4)]),
    ("ij->", [(3, 4)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 3)]),
]


@pytest.mark.parametrize(("equation", "shapes"), BOOL_CASES)
def test_bool_einsum_counts_in_int64(equation: str, shapes: list[tuple[int, ...]]) -> None:
    g = torch.Generator().manual_seed(len(equation))
    xs = [torch.rand(s, generator=g) < 0.6 for s in shapes]
    want = torch.einsum(equation, *[x.long() for x in xs])
    for optimize in ("auto", False):
        got = func.einsum(equation, *xs, optimize=optimize)
        assert got.dtype == torch.int64
        assert torch.equal(got, want)


def test_drop_in_einsum_promotes_mixed_integer_and_float_operands() -> None:
    import semiring_einsum

    a = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    b = torch.rand(3, 4)
    got = semiring_einsum.einsum("ij,jk->ik", a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, a.float() @ b)


def test_bool_einsum_without_a_sum_stays_bool() -> None:
    x = torch.tensor([True, False, True])
    y = torch.tensor([True, True])
    got = func.einsum("i,j->ij", x, y)
    assert got.dtype == torch.bool
    assert torch.equal(got, x[:, None] & y[None, :])


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("equation", ["ij,jk->ik", "ij,j->i", "ij->i", "ij->", "ij,ij->ij"])
def test_drop_in_einsum_on_bool_and_integers_matches_the_reference(
    equation: str, dtype: torch.dtype
) -> None:
    reference = pytest.importorskip("torch_semiring_einsum")
    import semiring_einsum

    g = torch.Generator().manual_seed(0)
    shapes = {"ij": (3, 4), "jk": (4, 5), "j": (4,)}
    terms = equation.split("->")[0].split(",")
    xs = [torch.randint(0, 3, shapes[t], generator=g).to(dtype) for t in terms]
    want = reference.einsum(reference.compile_equation(equation), *xs, block_size=2)
    got = semiring_einsum.einsum(semiring_einsum.compile_equation(equation), *xs, block_size=2)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


def test_the_policy_is_one_value_type_that_round_trips_through_operators() -> None:
    from semiring_einsum.func import _kernels as K

    for user, kind in [(math.nan, "nan"), ("nan", "nan"), ("uniform", "uniform"), (0.0, "weight")]:
        assert K.NegInf.of(user).kind == kind
    policies = [K.NAN, K.UNIFORM, K.THROUGH, K.NegInf.of(0.0), K.NegInf.of(0.1), K.NegInf.of(-2.5)]
    for policy in policies:
        again = K.NegInf.from_key(policy.key)
        assert again == policy and hash(again) == hash(policy)
    assert K.NegInf.of(0.0).ignores_cotangent and not K.THROUGH.ignores_cotangent
    assert K.THROUGH.dead_weight(4) == 0.0 and K.UNIFORM.dead_weight(4) == 0.25
    assert K.NegInf.of(0.1).dead_weight(4) == 0.1 and K.NAN.is_nan
