"""Property-based tests: random equations against the brute-force oracle.

Hypothesis draws the equation (2-4 operands, up to 5 distinct indices, sizes
0-4, repeated indices inside an operand, size-1 broadcasting, ``...`` some of
the time, explicit or implicit output), the values (-inf included for the
log / max / min semirings), the block size and the plan kind; every semiring is
compared with the float64 oracle in :mod:`oracle`.  Runs are derandomized, so
they are reproducible.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matrix import examples
from oracle import brute, brute_viterbi, log_vjp
from semiring_einsum import func

# When a Hypothesis test fails, its pytest plugin imports this module (through
# libcst, which imports a deprecated mypy_extensions name) to write a patch.
# Under ``filterwarnings = error`` that DeprecationWarning becomes an
# INTERNALERROR that aborts the whole session; importing it here, with the
# warning silenced, keeps a failing example an ordinary test failure.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # pragma: no cover - libcst not installed
        pass

USER_LOG = dataclasses.replace(func.LOG)  # equal to LOG, not LOG: the generic path

# Examples per test in the full run (python -m pytest --full); the default run draws an eighth.
FORWARD_EXAMPLES = examples(4000)
GRADIENT_EXAMPLES = examples(1000)
NEG_INF_GRADIENT_EXAMPLES = examples(1000)
TOTAL_EXAMPLES = FORWARD_EXAMPLES + GRADIENT_EXAMPLES + NEG_INF_GRADIENT_EXAMPLES
"""Hypothesis examples run by this module in all."""

_SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclasses.dataclass
class Problem:
    equation: str
    shapes: list[tuple[int, ...]]


@st.composite
def problems(draw, min_ops: int = 2, max_ops: int = 4, max_size: int = 4) -> Problem:
    n_idx = draw(st.integers(1, 5))
    # Mostly lower case, sometimes an upper-case index (ASCII order in implicit outputs).
    pool = draw(st.sampled_from(["abcde", "abcde", "aBcDe", "zyxwv"]))[:n_idx]
    # Size 0 (an empty sum or an empty output) about one index in eight.
    sizes = [n for n in (2, 3, 4, 2, 3, 1, 0, 4) if n <= max_size]
    size = {c: draw(st.sampled_from(sizes)) for c in pool}
    n_ops = draw(st.integers(min_ops, max_ops))
    use_ellipsis = draw(st.integers(0, 3)) == 0
    ell_sizes = draw(st.lists(st.integers(0, 3), min_size=1, max_size=2)) if use_ellipsis else []
    terms: list[str] = []
    shapes: list[tuple[int, ...]] = []
    any_ellipsis = False
    for _ in range(n_ops):
        rank = draw(st.sampled_from([2, 1, 3, 2, 0]))
        if draw(st.booleans()):  # distinct indices
            letters = list(draw(st.permutations(pool)))[:rank]
        else:  # repeats allowed: diagonals
            letters = draw(st.lists(st.sampled_from(pool), min_size=rank, max_size=rank))
        ones = set()
        if draw(st.integers(0, 4)) == 0:  # size-1 broadcasting of some indices
            ones = set(draw(st.lists(st.sampled_from(pool), max_size=2)))
        shape = [1 if c in ones else size[c] for c in letters]
        term = "".join(letters)
        if use_ellipsis and draw(st.booleans()):
            any_ellipsis = True
            width = draw(st.integers(0, len(ell_sizes)))
            ell = ell_sizes[len(ell_sizes) - width :]
            ell = [1 if draw(st.integers(0, 3)) == 0 else n for n in ell]
            pos = draw(st.integers(0, len(letters)))
            term = term[:pos] + "..." + term[pos:]
            shape = shape[:pos] + ell + shape[pos:]
        terms.append(term)
        shapes.append(tuple(shape))
    equation = ",".join(terms)
    if draw(st.booleans()):  # explicit output
        present = sorted({c for t in terms for c in t if c != "."})
        out = draw(st.permutations(present))
        out = out[: draw(st.integers(0, len(out)))]
        rhs = "".join(out)
        if any_ellipsis and draw(st.booleans()):
            pos = draw(st.integers(0, len(rhs)))
            rhs = rhs[:pos] + "..." + rhs[pos:]
        equation += "->" + rhs
    if draw(st.integers(0, 5)) == 0:
        equation = equation.replace(",", " , ").replace("->", " -> ")
    return Problem(equation, shapes)


def values(shapes, seed: int, kind: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    if kind == "int":
        return [torch.randint(-3, 4, s, generator=g).to(dtype) for s in shapes]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def with_infinities(xs, seed: int, fraction: float, inf: float):
    if fraction == 0.0:
        return xs
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.where(torch.rand(x.shape, generator=g) < fraction, inf, x) for x in xs]


def assert_same(got: torch.Tensor, want: torch.Tensor, tol: float, what) -> None:
    assert tuple(got.shape) == tuple(want.shape), (what, got.shape, want.shape)
    got = got.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (what, got, want)
    assert torch.equal(got == math.inf, want == math.inf), (what, got, want)
    assert torch.equal(got == -math.inf, want == -math.inf), (what, got, want)
    fin = torch.isfinite(want)
    torch.testing.assert_close(
        got[fin], want[fin], rtol=tol, atol=tol, msg=lambda m: f"{what}\n{m}"
    )


BLOCK_SIZES = st.one_of(
    st.integers(1, 5),
    st.none(),
    st.integers(8, 256).map(lambda n: func.AutomaticBlockSize(max_cpu_bytes=n)),
)


@settings(max_examples=FORWARD_EXAMPLES, **_SETTINGS)
@given(
    problem=problems(),
    seed=st.integers(0, 2**20),
    kind=st.sampled_from(["int", "normal"]),
    dtype=st.sampled_from([torch.float64, torch.float64, torch.float32]),
    fraction=st.sampled_from([0.0, 0.0, 0.2, 0.5, 1.0]),
    block_size=BLOCK_SIZES,
    optimize=st.sampled_from(["auto", False, "greedy", "optimal"]),
)
def test_every_semiring_matches_oracle(problem, seed, kind, dtype, fraction, block_size, optimize):
    eq, shapes = problem.equation, problem.shapes
    xs = values(shapes, seed, kind, dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    what = (eq, shapes, kind, fraction, block_size, optimize)
    kw = {"block_size": block_size, "optimize": optimize}

    # real: oracle and torch.einsum
    got = func.einsum(eq, *xs, **kw)
    assert got.dtype == dtype
    assert_same(got, brute("real", eq, *xs), tol * 10, ("real",) + what)
    ref = torch.einsum(eq, *xs)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=tol * 10, atol=tol * 10)

    neg = with_infinities(xs, seed, fraction, -math.inf)
    for name, fn in [
        ("log", func.log_einsum),
        ("max", func.max_einsum),
        ("log", lambda e, *a, **k: func.semiring_einsum(USER_LOG, e, *a, **k)),
    ]:
        got = fn(eq, *neg, **kw)
        assert got.dtype == dtype
        assert_same(got, brute(name, eq, *neg), tol, (name,) + what)

    pos = with_infinities(xs, seed, fraction, math.inf)
    got = func.min_einsum(eq, *pos, **kw)
    assert_same(got, brute("min", eq, *pos), tol, ("min",) + what)

    # viterbi: integer data have exact ties, resolved by the first maximiser in
    # row-major order; float32 normal data might round near-ties differently.
    v, a = func.viterbi_einsum(eq, *neg, block_size=block_size)
    want_v, want_a = brute_viterbi(eq, *neg)
    assert_same(v, want_v, tol, ("viterbi",) + what)
    assert a.dtype == torch.int64
    assert a.shape == want_a.shape, what
    if kind == "int" or dtype == torch.float64:
        assert torch.equal(a, want_a), (what, a, want_a)


@settings(max_examples=GRADIENT_EXAMPLES, **_SETTINGS)
@given(
    problem=problems(max_size=3),
    seed=st.integers(0, 2**20),
    block_size=BLOCK_SIZES,
    optimize=st.sampled_from(["auto", False]),
)
def test_gradients_match_oracle(problem, seed, block_size, optimize):
    """Finite, tie-free data: input gradients equal the oracle's autograd ones."""
    eq, shapes = problem.equation, problem.shapes
    base = values(shapes, seed, "normal")
    kw = {"block_size": block_size, "optimize": optimize}
    for name, fn in [
        ("real", func.einsum),
        ("log", func.log_einsum),
        ("max", func.max_einsum),
        ("min", func.min_einsum),
        ("log", lambda e, *a, **k: func.semiring_einsum(USER_LOG, e, *a, **k)),
    ]:
        xs = [x.clone().requires_grad_() for x in base]
        ys = [x.clone().requires_grad_() for x in base]
        out = fn(eq, *xs, **kw)
        want = brute(name, eq, *ys)
        g = torch.randn(
            want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        if want.numel() == 0 or not torch.isfinite(want).all():
            continue
        got_grads = torch.autograd.grad(out, xs, g, allow_unused=True)
        want_grads = torch.autograd.grad(want, ys, g, allow_unused=True)
        for k, (gg, wg) in enumerate(zip(got_grads, want_grads)):
            gg = torch.zeros_like(base[k]) if gg is None else gg
            wg = torch.zeros_like(base[k]) if wg is None else wg
            assert gg.shape == base[k].shape
            torch.testing.assert_close(
                gg, wg, rtol=1e-8, atol=1e-8, msg=lambda m, k=k, n=name: f"{n} {eq} op{k}\n{m}"
            )


@settings(max_examples=NEG_INF_GRADIENT_EXAMPLES, **_SETTINGS)
@given(
    problem=problems(max_size=3),
    seed=st.integers(0, 2**20),
    fraction=st.sampled_from([0.0, 0.3, 0.6, 1.0]),
    policy=st.sampled_from([math.nan, 0.0, 1.0, -0.5, 2, "uniform"]),
    block_size=BLOCK_SIZES,
    optimize=st.sampled_from(["auto", False]),
)
def test_log_grad_of_neg_inf_matches_oracle(problem, seed, fraction, policy, block_size, optimize):
    """log_einsum's input gradients follow DESIGN §3.1 for every policy.

    The policy is about the cells of the whole contraction: with a pairwise
    plan (NaN policy), an all -inf intermediate cell feeding a finite final
    cell must not produce a NaN.
    """
    eq, shapes = problem.equation, problem.shapes
    xs = with_infinities(values(shapes, seed, "normal"), seed, fraction, -math.inf)
    ins = [x.clone().requires_grad_() for x in xs]
    out = func.log_einsum(
        eq, *ins, grad_of_neg_inf=policy, block_size=block_size, optimize=optimize
    )
    assert not torch.isnan(out).any()
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad(out, ins, cot, allow_unused=True)
    want = log_vjp(eq, xs, cot, policy)
    for k, (gg, wg) in enumerate(zip(got, want)):
        gg = torch.zeros_like(xs[k]) if gg is None else gg
        assert gg.shape == xs[k].shape
        torch.testing.assert_close(
            gg,
            wg,
            rtol=1e-8,
            atol=1e-8,
            equal_nan=True,
            msg=lambda m, k=k: f"{eq} {shapes} {policy} op{k}\n{m}",
        )
