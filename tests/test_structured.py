"""Semirings with element dimensions, k-best, entropy and expectation against brute force."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from oracle import _terms, joint
from semiring_einsum import func
from semiring_einsum.func import EquationError, Semiring
from test_memory import LiveBytesRecorder

Tensor = torch.Tensor
F64 = torch.float64


# ----------------------------------------------------------------- oracles
def brute_kbest(equation: str, xs: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Every term enumerated: NaN first, then value descending, ties row-major; -inf is no term."""
    terms, _ = _terms("max", equation, tuple(xs))
    _, _, summed, size = joint(equation, *xs)
    n = terms.shape[-1]
    # One stable sort on a key that puts NaN first and -inf (no term) last.
    key = torch.where(torch.isnan(terms), math.inf, terms)
    order = key.argsort(dim=-1, descending=True, stable=True)
    nan_first = torch.isnan(terms).gather(-1, order).to(torch.int8)
    order = order.gather(-1, nan_first.argsort(dim=-1, descending=True, stable=True))
    pad = max(k - n, 0)
    values = terms.gather(-1, order)
    values = torch.cat([values, values.new_full(values.shape[:-1] + (pad,), -math.inf)], -1)[
        ..., :k
    ]
    order = torch.cat([order, order.new_zeros(order.shape[:-1] + (pad,))], -1)[..., :k]
    coords = []
    stride = 1
    for c in reversed(summed):
        coords.append(order // stride % size[c])
        stride *= size[c]
    coords.reverse()
    none = values == -math.inf
    if coords:
        argmax = torch.where(none.unsqueeze(-1), 0, torch.stack(coords, dim=-1))
    else:
        argmax = torch.zeros(values.shape + (0,), dtype=torch.int64)
    return values, argmax


def brute_expectation(
    equation: str, logs: list[Tensor], vals: list[Tensor]
) -> tuple[Tensor, Tensor]:
    scores, _ = _terms("log", equation, tuple(x.double() for x in logs))
    _, _, summed, size = joint(equation, *logs)
    # The value of each term: Σ_k values[k] at the term, through the same joint layout.
    masked = [torch.where(x == -math.inf, 0.0, v.double()) for x, v in zip(logs, vals)]
    values, _ = _terms("log", equation, tuple(masked))
    log_z = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - log_z.unsqueeze(-1))
    return log_z, (p * values).sum(-1)


def brute_entropy(equation: str, xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    scores, _ = _terms("log", equation, tuple(x.double() for x in xs))
    log_z = torch.logsumexp(scores, dim=-1)
    logp = scores - log_z.unsqueeze(-1)
    p = logp.exp()
    return log_z, -torch.where(p > 0, p * logp, 0.0).sum(-1)


CASES = {
    "matmul": ("ij,jk->ik", [(3, 4), (4, 5)]),
    "chain3": ("ab,bc,cd->a", [(2, 3), (3, 4), (4, 2)]),
    "chain3-all": ("ab,bc,cd->", [(2, 3), (3, 4), (4, 2)]),
    "chain4": ("ab,bc,cd,de->ae", [(2, 3), (3, 3), (3, 2), (2, 3)]),
    "reversed": ("ba,cb,dc->", [(3, 2), (4, 3), (2, 4)]),
    "star": ("ab,ac,ad->a", [(2, 3), (2, 2), (2, 3)]),
    "batch": ("zab,zbc->zc", [(2, 3, 4), (2, 4, 2)]),
    "ellipsis": ("...ab,...bc->...", [(2, 3, 2), (2, 2, 3)]),
    "diagonal": ("ii,ij->j", [(3, 3), (3, 2)]),
    "implicit": ("ij,jk", [(2, 3), (3, 2)]),
    "unsummed": ("ij,jk->ijk", [(2, 3), (3, 2)]),
    "one-term": ("ij,jk->", [(1, 2), (2, 1)]),
    "broadcast": ("ij,jk->ik", [(3, 1), (4, 2)]),
}


def _ints(shapes: list[tuple[int, ...]], seed: int, neg_inf: bool) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(-2, 2, s, generator=g).to(F64) for s in shapes]  # many exact ties
    if neg_inf:
        xs[0].view(-1)[:: max(2, xs[0].numel() // 2)] = -math.inf
    return xs


# ------------------------------------------------- element dimensions (user)
def _complex_mul(a: Tensor, b: Tensor) -> Tensor:
    re = a[..., 0] * b[..., 0] - a[..., 1] * b[..., 1]
    im = a[..., 0] * b[..., 1] + a[..., 1] * b[..., 0]
    return torch.stack([re, im], dim=-1)


def _csum(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return x.sum(dims) if dims else x


COMPLEX = Semiring("complex", torch.add, _complex_mul, _csum, 0.0, (1.0, 0.0), shape=(2,))


def _as_complex(x: Tensor) -> Tensor:
    return torch.view_as_complex(x.contiguous())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block", [None, 1, 2])
@pytest.mark.parametrize("optimize", ["auto", False])
def test_vector_semiring_matches_complex_einsum(
    case: str, block: int | None, optimize: object
) -> None:
    eq, shapes = CASES[case]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(*s, 2, generator=g, dtype=F64, requires_grad=True) for s in shapes]
    out = func.semiring_einsum(COMPLEX, eq, *xs, block_size=block, optimize=optimize)
    ref = torch.view_as_real(torch.einsum(eq, *[_as_complex(x) for x in xs]))
    torch.testing.assert_close(out, ref)
    weights = torch.randn(ref.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((out * weights).sum(), xs)
    want = torch.autograd.grad((ref * weights).sum(), xs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_vector_semiring_size_zero_sum_gives_the_element_zero() -> None:
    s = Semiring("pairs", torch.add, torch.mul, _csum, (1.0, 2.0), (1.0, 1.0), shape=(2,))
    out = func.semiring_einsum(s, "ij,jk->ik", torch.ones(2, 0, 2), torch.ones(0, 3, 2))
    assert out.shape == (2, 3, 2)
    assert torch.equal(out, torch.tensor([1.0, 2.0]).expand(2, 3, 2))


def test_vector_semiring_composes_with_vmap_jvp_and_pickle() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 3, 5, 2, generator=g, dtype=F64)
    b = torch.randn(5, 2, 2, generator=g, dtype=F64)
    batched = torch.func.vmap(lambda x: func.semiring_einsum(COMPLEX, "ij,jk->ik", x, b))(a)
    ref = torch.view_as_real(torch.einsum("zij,jk->zik", _as_complex(a), _as_complex(b)))
    torch.testing.assert_close(batched, ref)
    ta = torch.randn(a.shape[1:], generator=g, dtype=F64)
    _, tangent = torch.func.jvp(
        lambda x: func.semiring_einsum(COMPLEX, "ij,jk->ik", x, b), (a[0],), (ta,)
    )
    want = torch.view_as_real(torch.einsum("ij,jk->ik", _as_complex(ta), _as_complex(b)))
    torch.testing.assert_close(tangent, want)
    copy = pickle.loads(pickle.dumps(COMPLEX))
    assert copy == COMPLEX and copy.shape == (2,) and copy.one == (1.0, 0.0)
    two = Semiring("s", torch.add, torch.mul, _csum, 0.0, 1.0, shape=(2,))
    assert two != Semiring("s", torch.add, torch.mul, _csum, 0.0, 1.0, shape=(3,))


def test_vector_semiring_validation() -> None:
    with pytest.raises(ValueError, match="shape must be a tuple of non-negative ints"):
        Semiring("s", torch.add, torch.mul, _csum, 0.0, 1.0, shape=(-1,))
    with pytest.raises(ValueError, match="element shape"):
        Semiring("s", torch.add, torch.mul, _csum, (0.0, 1.0, 2.0), 1.0, shape=(2,))
    with pytest.raises(TypeError, match="one must be a Python int or float"):
        Semiring("s", torch.add, torch.mul, _csum, 0.0, (1.0, 0.0))  # no element shape
    with pytest.raises(EquationError, match=r"operand 1 has shape \(4, 5\).*\(2,\)"):
        func.semiring_einsum(COMPLEX, "ij,jk->ik", torch.ones(3, 4, 2), torch.ones(4, 5))


def test_vector_semiring_plan_counts_element_bytes() -> None:
    scalar = func.plan("ij,jk->ik", (8, 16), (16, 4), semiring=func.LOG, optimize=False)
    vector = func.plan("ij,jk->ik", (8, 16, 2), (16, 4, 2), semiring=COMPLEX, dtype=torch.float32)
    assert vector.steps[0].output.endswith(vector.contraction.output[-1])
    assert vector.peak_bytes >= 2 * scalar.peak_bytes


# --------------------------------------------------------------------- k-best
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [1, 3, 40])
@pytest.mark.parametrize("neg_inf", [False, True])
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_kbest_matches_brute_force_with_ties(
    case: str, k: int, neg_inf: bool, kernel: str, request: pytest.FixtureRequest
) -> None:
    if kernel == "torch":
        request.getfixturevalue("pure_torch")
    eq, shapes = CASES[case]
    for seed in range(3):
        xs = _ints(shapes, seed, neg_inf)
        want_v, want_a = brute_kbest(eq, xs, k)
        for optimize, block in (("auto", None), ("auto", 1), (False, 2), ("greedy", None)):
            values, argmax = func.kbest_einsum(eq, *xs, k=k, optimize=optimize, block_size=block)
            assert torch.equal(values, want_v), (eq, seed, optimize, block)
            assert torch.equal(argmax, want_a), (eq, seed, optimize, block)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kbest_with_k_1_is_viterbi(case: str) -> None:
    eq, shapes = CASES[case]
    xs = _ints(shapes, 7, neg_inf=True)
    values, argmax = func.kbest_einsum(eq, *xs, k=1)
    v, a = func.viterbi_einsum(eq, *xs)
    assert torch.equal(values[..., 0], v)
    assert torch.equal(argmax[..., 0, :], a)


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_kbest_nan_terms_come_first_and_float_data(
    kernel: str, request: pytest.FixtureRequest
) -> None:
    if kernel == "torch":
        request.getfixturevalue("pure_torch")
    x = torch.tensor([[1.0, math.nan], [3.0, 5.0]])
    values, argmax = func.kbest_einsum("ij->", x, k=3)
    assert math.isnan(values[0]) and values[1:].tolist() == [5.0, 3.0]
    assert argmax.tolist() == [[0, 1], [1, 1], [1, 0]]
    y = torch.tensor([[2.0, math.nan, 1.0], [math.nan, 4.0, 4.0]])  # a matrix-shaped step
    values, argmax = func.kbest_einsum("ij,jk->ik", y, y.T, k=4)
    want_v, want_a = brute_kbest("ij,jk->ik", [y, y.T], 4)
    assert torch.equal(values.isnan(), want_v.isnan())
    assert torch.equal(values.nan_to_num(), want_v.float().nan_to_num())
    assert torch.equal(argmax, want_a)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=g) for s in [(3, 5), (5, 6), (6, 2)]]
    want_v, want_a = brute_kbest("ab,bc,cd->ad", xs, 4)
    values, argmax = func.kbest_einsum("ab,bc,cd->ad", *xs, k=4)
    torch.testing.assert_close(values.double(), want_v)
    assert torch.equal(argmax, want_a)
    assert values.dtype == torch.float32


def test_kbest_values_gradients() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    c = torch.randn(5, 2, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *xs: func.kbest_einsum("ij,jk,kl->il", *xs, k=3)[0], (a, b, c)
    )
    # Each value passes its gradient to the entries of its own term, once.
    values, argmax = func.kbest_einsum("ij,jk,kl->il", a, b, c, k=3)
    grads = torch.autograd.grad(values[..., 2].sum(), (a, b, c))
    assert all(gr.sum().item() == 3 * 2 for gr in grads)  # 6 cells, one term each
    j, k = argmax[0, 1, 2].tolist()
    assert values[0, 1, 2] == a[0, j] + b[j, k] + c[k, 1]


def test_kbest_composes_with_vmap_and_grad() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 2, 4, generator=g, dtype=F64)
    b = torch.randn(4, 5, generator=g, dtype=F64)
    values, argmax = torch.func.vmap(lambda x: func.kbest_einsum("ij,jk->ik", x, b, k=3))(a)
    for z in range(3):
        v, am = func.kbest_einsum("ij,jk->ik", a[z], b, k=3)
        assert torch.equal(values[z], v) and torch.equal(argmax[z], am)
    grad = torch.func.grad(lambda x: func.kbest_einsum("ij,jk->ik", x, b, k=2)[0].sum())(a[0])
    assert grad.sum().item() == 2 * 2 * 5


def test_kbest_semiring_values_through_semiring_einsum() -> None:
    eq, shapes = CASES["chain4"]
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    k = 4
    lists = [
        torch.cat([x.unsqueeze(-1), x.new_full(x.shape + (k - 1,), -math.inf)], -1) for x in xs
    ]
    S = func.kbest_semiring(k)
    assert S.shape == (k,) and S == func.kbest_semiring(k) and S != func.kbest_semiring(k + 1)
    got = func.semiring_einsum(S, eq, *lists, block_size=2)
    torch.testing.assert_close(got, func.kbest_einsum(eq, *xs, k=k)[0])


def test_kbest_errors() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        func.kbest_einsum("ij->", x, k=0)
    with pytest.raises(TypeError, match="k must be a positive int"):
        func.kbest_einsum("ij->", x, k=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        func.kbest_einsum("ij->", x)  # type: ignore[call-arg]
    with pytest.raises(EquationError):
        func.kbest_einsum("ij,jk->", x, k=2)
    with pytest.raises(ValueError, match="kbest_semiring needs a positive int"):
        func.kbest_semiring(0)


def test_kbest_memory_stays_within_the_budget() -> None:
    budget = 1 << 16
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(s, generator=g) for s in [(16, 64), (64, 64), (64, 16)]]
    k = 8
    block = func.AutomaticBlockSize(max_cpu_bytes=budget)
    rec = LiveBytesRecorder()
    with rec:
        out = func.kbest_einsum("ab,bc,cd->ad", *xs, k=k, block_size=block)
    results = 3 * (8 + 8 + 4) * k * 64 * 64  # each step's kept lists (values, ranks, ids)
    assert rec.peak <= 8 * budget + results, rec.peak
    assert torch.equal(out[1], func.kbest_einsum("ab,bc,cd->ad", *xs, k=k)[1])


# -------------------------------------------------- entropy and expectation
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("neg_inf", [False, True])
def test_entropy_and_expectation_match_brute_force(case: str, neg_inf: bool) -> None:
    eq, shapes = CASES[case]
    g = torch.Generator().manual_seed(9)
    logs = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    if neg_inf:
        logs[-1].view(-1)[::3] = -math.inf
    vals = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    want_z, want_e = brute_expectation(eq, logs, vals)
    want_z2, want_h = brute_entropy(eq, logs)
    finite = want_z > -math.inf
    for optimize, block in (("auto", None), (False, 1), ("auto", 2)):
        log_z, expected = func.expectation_einsum(
            eq, logs, vals, optimize=optimize, block_size=block
        )
        torch.testing.assert_close(log_z, want_z, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(expected[finite], want_e[finite], atol=1e-9, rtol=1e-9)
        assert torch.isnan(expected[~finite]).all()
        log_z, h = func.entropy_einsum(eq, *logs, optimize=optimize, block_size=block)
        torch.testing.assert_close(log_z, want_z2, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(h[finite], want_h[finite], atol=1e-9, rtol=1e-9)
    # The semiring with (2,) elements gives the same.
    pairs = [torch.stack([x, torch.where(x == -math.inf, 0.0, v)], -1) for x, v in zip(logs, vals)]
    both = func.semiring_einsum(func.EXPECTATION, eq, *pairs, block_size=2)
    torch.testing.assert_close(both[..., 0], want_z, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(both[..., 1][finite], want_e[finite], atol=1e-9, rtol=1e-9)


def test_entropy_and_expectation_gradients() -> None:
    g = torch.Generator().manual_seed(10)
    a = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: func.entropy_einsum("ij,jk->ik", x, y), (a, b))
    assert torch.autograd.gradcheck(
        lambda x, y, w: func.expectation_einsum("ij,jk->i", [x, y], [torch.zeros(()), w]),
        (a, b, v),
    )
    # Against the oracle's own autograd.
    h = func.entropy_einsum("ij,jk->", a, b)[1]
    want = brute_entropy("ij,jk->", [a, b])[1]
    for got, ref in zip(torch.autograd.grad(h, (a, b)), torch.autograd.grad(want, (a, b))):
        torch.testing.assert_close(got, ref)


def test_entropy_composes_with_vmap_jacrev_jacfwd_and_hessian() -> None:
    g = torch.Generator().manual_seed(11)
    a = torch.randn(2, 3, 4, generator=g, dtype=F64)
    b = torch.randn(4, 5, generator=g, dtype=F64)
    batched = torch.func.vmap(lambda x: func.entropy_einsum("ij,jk->k", x, b)[1])(a)
    for z in range(2):
        torch.testing.assert_close(batched[z], brute_entropy("ij,jk->k", [a[z], b])[1])
    jac = torch.func.jacrev(lambda x: func.entropy_einsum("ij,jk->k", x, b)[1])(a[0])
    ref = torch.func.jacrev(lambda x: brute_entropy("ij,jk->k", [x, b])[1])(a[0])
    torch.testing.assert_close(jac, ref)
    fwd = torch.func.jacfwd(lambda x: func.entropy_einsum("ij,jk->k", x, b)[1])(a[0])
    torch.testing.assert_close(fwd, ref)
    hess = torch.func.hessian(lambda x: func.entropy_einsum("ij,jk->", x, b)[1])(a[0])
    want = torch.func.hessian(lambda x: brute_entropy("ij,jk->", [x, b])[1])(a[0])
    torch.testing.assert_close(hess, want)


def test_entropy_under_torch_compile() -> None:
    g = torch.Generator().manual_seed(12)
    a = torch.randn(3, 4, generator=g, dtype=F64)
    b = torch.randn(4, 5, generator=g, dtype=F64)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: func.entropy_einsum("ij,jk->ik", x, y), backend="eager")
    got = compiled(a, b)
    for x, y in zip(got, brute_entropy("ij,jk->ik", [a, b])):
        torch.testing.assert_close(x, y)


def test_kbest_under_torch_compile() -> None:
    g = torch.Generator().manual_seed(15)
    xs = [torch.randint(-1, 2, s, generator=g).float() for s in [(3, 4), (4, 5), (5, 2)]]
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda *ys: func.kbest_einsum("ij,jk,kl->il", *ys, k=3), backend="aot_eager"
    )
    values, argmax = compiled(*xs)
    want_v, want_a = brute_kbest("ij,jk,kl->il", xs, 3)
    assert torch.equal(values.double(), want_v) and torch.equal(argmax, want_a)


def test_expectation_errors() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one value tensor per log operand"):
        func.expectation_einsum("ij->", [x], [x, x])
    with pytest.raises(TypeError, match="must be a sequence of tensors"):
        func.expectation_einsum("ij->", x, [x])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not broadcast"):
        func.expectation_einsum("ij->", [x], [torch.zeros(4)])
    with pytest.raises(TypeError, match="operand 0 must be a torch.Tensor"):
        func.entropy_einsum("ij->", [[0.0]])  # type: ignore[arg-type]


def test_structured_functions_leave_inputs_alone() -> None:
    g = torch.Generator().manual_seed(13)
    xs = [torch.randn(s, generator=g) for s in [(3, 4), (4, 5)]]
    copies = [x.clone() for x in xs]
    func.kbest_einsum("ij,jk->ik", *xs, k=2)
    func.entropy_einsum("ij,jk->ik", *xs)
    func.expectation_einsum("ij,jk->ik", xs, xs)
    assert all(torch.equal(x, c) for x, c in zip(xs, copies))


def _chain_kbest_dp(xs: list[Tensor], k: int) -> Tensor:
    """The k best path scores of a chain ``ab,bc,cd,...->`` by a plain list-Viterbi DP."""
    best = torch.full((xs[0].shape[0], k), -math.inf, dtype=xs[0].dtype)
    best[:, 0] = 0.0  # per state of the first index: its k best prefixes
    for x in xs:
        cand = best.unsqueeze(0) + x.T.unsqueeze(-1)  # (next, previous, k)
        best = cand.reshape(x.shape[1], -1).topk(k, dim=-1).values
    return best.reshape(-1).topk(k).values


def test_chains_past_int64_ranks_still_give_best_assignments() -> None:
    """8**30 assignments: no int64 rank; values and assignments stay right (ties aside)."""
    steps, n = 30, 8
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGH"[: steps + 1]
    eq = ",".join(letters[i : i + 2] for i in range(steps)) + "->"
    g = torch.Generator().manual_seed(14)
    xs = [torch.randn(n, n, generator=g, dtype=F64) for _ in range(steps)]

    def score(path: list[int]) -> float:
        return sum(float(xs[i][path[i], path[i + 1]]) for i in range(steps))

    value, argmax = func.viterbi_einsum(eq, *xs)
    want = _chain_kbest_dp(xs, 1)[0]
    torch.testing.assert_close(value, want)
    assert math.isclose(score(argmax.tolist()), float(value), rel_tol=1e-12)
    values, paths = func.kbest_einsum(eq, *xs, k=4)
    torch.testing.assert_close(values, _chain_kbest_dp(xs, 4))
    rows = paths.tolist()
    assert len({tuple(r) for r in rows}) == 4
    for v, r in zip(values.tolist(), rows):
        assert math.isclose(score(r), v, rel_tol=1e-12)
