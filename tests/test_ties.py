"""The global tie rule of max-plus contractions on pairwise plans, against the oracle.

Max-plus contractions of three or more operands run pairwise, in opt_einsum's order (or an
explicit path).  The tie rule of :func:`func.viterbi_einsum` must hold on every plan exactly
as on one joint step (``optimize=False``): for each output cell the argmax is the *first*
maximising term in row-major order of all summed indices (in order of first appearance), a
NaN term wins (the first NaN), and a cell whose terms are all -inf has argmax zeros.  The
gradients of :func:`func.max_einsum` and :func:`func.min_einsum` go to that same single term
(for cells whose value is finite).

Checked here, against the brute-force float64 oracle (:mod:`oracle`):

* tie-heavy integer data (values in {0, 1, 2}) on 3-, 4- and 5-operand equations, for every
  opt_einsum strategy, ``optimize=False`` and two explicit paths per equation, block sizes
  ``None`` and 1, float32 and float64: values and argmax exactly (and the data really ties);
* the gradients of max_einsum / min_einsum on those inputs: one-hot counts of the first
  maximiser (minimiser) of every output cell;
* -inf, +inf, NaN (and mixed +-inf) entries in the data: values and argmax;
* a hand-derived gradient of a small example with -inf, +inf and NaN output cells (pairwise
  semantics: each step's winner, ties by smallest partial rank);
* independence of the block size.

Integer data keeps every sum exact in float32 as in float64, so results must equal the
float64 oracle exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import pytest
import torch

from oracle import brute, brute_viterbi, joint, parse
from semiring_einsum import func
from semiring_einsum.func import _engine, _kernels, _plan
from semiring_einsum.func._parse import Contraction

Tensor = torch.Tensor
F32, F64 = torch.float32, torch.float64

# Each equation with its index sizes and two explicit (valid) contraction paths.
EQUATIONS: dict[str, tuple[dict[str, int], list[list[tuple[int, ...]]]]] = {
    "ab,bc,cd->ad": ({"a": 3, "b": 3, "c": 3, "d": 3}, [[(0, 1), (0, 1)], [(1, 2), (0, 1)]]),
    "ab,bc,cd,de->ae": (
        {"a": 3, "b": 3, "c": 3, "d": 3, "e": 3},
        [[(0, 1), (0, 1), (0, 1)], [(2, 3), (0, 1), (0, 1)]],
    ),
    "bsxk,bsyk,xyz->bsz": (
        {"b": 2, "s": 2, "x": 3, "y": 3, "k": 2, "z": 3},
        [[(0, 1), (0, 1)], [(1, 2), (0, 1)]],
    ),
    "ij,jk,kl,lm,mn->in": (
        {"i": 3, "j": 3, "k": 3, "l": 3, "m": 3, "n": 3},
        [[(0, 1), (0, 1), (0, 1), (0, 1)], [(3, 4), (1, 2), (0, 2), (0, 1)]],
    ),
    # b, c, d each in two operands; the output index a in one.
    "abc,cd,db->a": ({"a": 3, "b": 3, "c": 3, "d": 3}, [[(0, 1), (0, 1)], [(0, 2), (0, 1)]]),
    # x and y are summed and each appears in only one operand.
    "xab,bc,cdy->ad": (
        {"x": 2, "a": 3, "b": 3, "c": 3, "d": 2, "y": 2},
        [[(1, 2), (0, 1)], [(0, 2), (0, 1)]],
    ),
    # A scalar output: one cell, every index summed.
    "ab,bc,ca->": ({"a": 3, "b": 3, "c": 3}, [[(0, 1), (0, 1)], [(0, 2), (0, 1)]]),
    # A batch index z shared by all operands.
    "zab,zbc,zcd->zad": (
        {"z": 2, "a": 3, "b": 3, "c": 3, "d": 3},
        [[(0, 1), (0, 1)], [(1, 2), (0, 1)]],
    ),
}

# Every opt_einsum 3.4 strategy the tests run (each is accepted by `func.plan`, see below).
STRATEGIES: list[str] = [
    "auto",
    "auto-hq",
    "greedy",
    "optimal",
    "dp",
    "branch-2",
    "branch-all",
    "random-greedy",
]
# The optimize options of a case: the strategies, one joint step, the equation's two paths.
OPTIMIZE: list[str] = [*STRATEGIES, "joint", "path0", "path1"]
BLOCK_SIZES: list[int | None] = [None, 1]


# ------------------------------------------------------------------ helpers
def _shapes(eq: str) -> list[tuple[int, ...]]:
    size, _ = EQUATIONS[eq]
    lhs = eq.split("->")[0]
    return [tuple(size[c] for c in term) for term in lhs.split(",")]


def _optimize(eq: str, name: str) -> str | bool | list[tuple[int, ...]]:
    """The ``optimize`` argument named ``name`` for ``eq``."""
    if name == "joint":
        return False
    if name.startswith("path"):
        return EQUATIONS[eq][1][int(name[4:])]
    return name


def _check_path(path: Sequence[tuple[int, ...]], n: int) -> None:
    """``path`` contracts ``n`` operands to one (opt_einsum convention: the result goes last)."""
    live = n
    for pair in path:
        assert len(pair) == 2 and len(set(pair)) == 2, pair
        assert all(0 <= i < live for i in pair), (pair, live)
        live -= 1
    assert live == 1


def _ties(eq: str, dtype: torch.dtype, seed: int | None = None) -> list[Tensor]:
    """Operands of ``eq`` with values in {0, 1, 2}: most output cells have several maximisers.

    The default seed is the first one whose data ties in at least half of the output cells,
    for the max and for the min alike (see :func:`test_inputs_tie`).
    """
    g = torch.Generator().manual_seed(_tie_seed(eq) if seed is None else seed)
    return [torch.randint(0, 3, s, generator=g).to(dtype) for s in _shapes(eq)]


@functools.cache
def _tie_seed(eq: str) -> int:
    for seed in range(100):
        xs = _ties(eq, F64, seed)
        maxes = (_maximisers(eq, xs) > 1).double().mean()
        mins = (_maximisers(eq, [-x for x in xs]) > 1).double().mean()
        if maxes >= 0.5 and mins >= 0.5:
            return seed
    raise AssertionError(f"no tie-heavy seed for {eq}")


def _maximisers(eq: str, xs: Sequence[Tensor]) -> Tensor:
    """How many terms of each output cell reach its maximum (the oracle's joint space)."""
    tensors, output, summed, size = joint(eq, *xs)
    terms = sum(tensors, torch.zeros((), dtype=F64))
    assert isinstance(terms, Tensor)
    terms = terms.expand([size[c] for c in output + summed])
    terms = terms.reshape([size[c] for c in output] + [-1])
    return (terms == terms.amax(-1, keepdim=True)).sum(-1)


def _assert_values(got: Tensor, want: Tensor) -> None:
    """Exactly equal (float64), NaN where NaN, infinities of the same sign."""
    torch.testing.assert_close(got.to(F64), want, rtol=0, atol=0, equal_nan=True)


def _one_hot_grads(eq: str, xs: Sequence[Tensor], argmax: Tensor) -> list[Tensor]:
    """For each output cell, +1 on every operand entry that its ``argmax`` term uses."""
    inputs, output = parse(eq, [x.dim() for x in xs])
    _, _, summed, size = joint(eq, *xs)
    grads = [torch.zeros(x.shape, dtype=F64) for x in xs]
    out_shape = [size[c] for c in output]
    for cell in (
        torch.cartesian_prod(*[torch.arange(n) for n in out_shape]).reshape(-1, len(out_shape))
        if out_shape
        else torch.zeros(1, 0, dtype=torch.int64)
    ).tolist():
        at = dict(zip(output, cell))
        at.update(zip(summed, argmax[tuple(cell)].tolist()))
        for g, term in zip(grads, inputs):
            g[tuple(at[c] for c in term)] += 1
    return grads


def test_strategies_and_paths_are_accepted() -> None:
    """Every strategy and explicit path used here plans, and each path is valid."""
    for eq, (_, paths) in EQUATIONS.items():
        n = len(eq.split("->")[0].split(","))
        assert len(paths) == 2 and paths[0] != paths[1]
        for path in paths:
            _check_path(path, n)
            p = func.plan(eq, *_shapes(eq), semiring=func.MAX_PLUS, optimize=path)
            assert [tuple(s) for s in p.path] == path
        for name in STRATEGIES:
            p = func.plan(eq, *_shapes(eq), semiring=func.MAX_PLUS, optimize=name)
            assert len(p.steps) >= n - 1  # pairwise (single-operand reductions may come first)
        assert len(func.plan(eq, *_shapes(eq), semiring=func.MAX_PLUS, optimize=False).steps) == 1


# --------------------------------------------------------- the data does tie
@pytest.mark.parametrize("eq", list(EQUATIONS))
def test_inputs_tie(eq: str) -> None:
    """Not vacuous: in most output cells of the tie-heavy data several terms reach the max."""
    xs = _ties(eq, F64)
    many = _maximisers(eq, xs) > 1
    assert many.float().mean() >= 0.5, many
    mins = _maximisers(eq, [-x for x in xs]) > 1  # and several reach the min
    assert mins.float().mean() >= 0.5, mins


# ------------------------------------------------------- values and argmax
@pytest.mark.parametrize("opt", OPTIMIZE)
@pytest.mark.parametrize("eq", list(EQUATIONS))
def test_viterbi_ties(eq: str, opt: str) -> None:
    """Values and the first-maximiser argmax on every plan, block size and dtype."""
    want_values, want_argmax = brute_viterbi(eq, *_ties(eq, F64))
    for dtype in (F32, F64):
        xs = _ties(eq, dtype)
        for block in BLOCK_SIZES:
            values, argmax = func.viterbi_einsum(
                eq, *xs, block_size=block, optimize=_optimize(eq, opt)
            )
            assert values.dtype == dtype and argmax.dtype == torch.int64
            _assert_values(values, want_values)
            assert torch.equal(argmax, want_argmax), (dtype, block, argmax, want_argmax)


def test_viterbi_default_is_pairwise() -> None:
    """The default (``optimize='auto'``) is a pairwise plan and follows the rule as well,
    past the size below which a contraction with an argmax runs as one joint step."""
    eq = "ab,bc,cd,de->ae"
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 3, (10, 10), generator=g).to(F32) for _ in range(4)]
    assert 10**5 > _kernels.JOINT_TERMS
    assert len(func.plan(eq, *xs, semiring=func.MAX_PLUS).steps) == 3
    values, argmax = func.viterbi_einsum(eq, *xs)
    want_values, want_argmax = brute_viterbi(eq, *xs)
    _assert_values(values, want_values)
    assert torch.equal(argmax, want_argmax)


# Paths that sum from the last index out (so no step needs ranks) and paths that do not.
OUTER_FIRST: dict[str, dict[tuple[tuple[int, int], ...], bool]] = {
    "ab,bc,cd->ad": {((1, 2), (0, 1)): True, ((0, 1), (0, 1)): False},
    "ab,bc,cd,de->ae": {
        ((2, 3), (1, 2), (0, 1)): True,  # d, then c, then b
        ((2, 3), (0, 1), (0, 1)): False,  # d, b, then c after both
        ((0, 1), (0, 1), (0, 1)): False,
    },
}


@pytest.mark.parametrize("eq", list(OUTER_FIRST))
def test_outer_first_paths_are_told_apart(eq: str) -> None:
    lhs, out = eq.split("->")
    inputs = tuple(lhs.split(","))
    sizes = tuple((c, 4) for c in dict.fromkeys(lhs.replace(",", "")))
    contraction = Contraction(inputs, out, sizes)
    order = contraction.summed
    n = len(inputs)
    paths = list(_plan._pairwise_paths(n))
    assert len(paths) == {3: 3, 4: 18}[n]
    assert len({tuple(p) for p in paths}) == len(paths)
    for path in paths:
        _check_path(path, n)
    for path, outer in OUTER_FIRST[eq].items():
        assert _plan.outer_first_path(contraction, list(path), order) is outer, path
    assert sum(_plan.outer_first_path(contraction, p, order) for p in paths) >= 1


@pytest.mark.parametrize("eq", list(OUTER_FIRST))
def test_argmax_default_prefers_an_outer_first_path(
    eq: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At equal cost, the default strategy with an argmax takes a path that needs no
    ranks, and its argmax still follows the rule (tie-heavy data, past the joint step)."""
    g = torch.Generator().manual_seed(3)
    n = len(eq.split(","))
    xs = [torch.randint(0, 3, (16, 16), generator=g).to(F32) for _ in range(n)]
    ranked: list[int] = []
    original = _engine.max_ranked
    monkeypatch.setattr(_engine, "max_ranked", lambda *a: ranked.append(1) or original(*a))
    values, argmax = func.viterbi_einsum(eq, *xs, block_size=10)
    assert not ranked, "an outer-first path sums without ranks"
    want_values, want_argmax = brute_viterbi(eq, *xs)
    _assert_values(values, want_values)
    assert torch.equal(argmax, want_argmax)
    # The path opt_einsum gives first (inner first) runs ranked, with the same answer.
    values, argmax = func.viterbi_einsum(eq, *xs, optimize=[(0, 1)] * (n - 1))
    assert ranked
    _assert_values(values, want_values)
    assert torch.equal(argmax, want_argmax)


@pytest.mark.parametrize("kind", ["ties", "-inf", "nan"])
def test_small_default_runs_one_joint_step(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``JOINT_TERMS`` joint terms, the default strategy with an argmax runs one joint
    step (one torch.max over the rows), with the same answers as the oracle."""
    eq = "bsxk,bsyk,xyz->bsz"
    xs = _ties(eq, F64)
    if kind != "ties":
        xs[2] = xs[2].masked_fill(xs[2] == 0, -math.inf if kind == "-inf" else math.nan)
    seen: list[int] = []
    small = _kernels.max_small

    def spy(step, ops, argmax=True):  # type: ignore[no-untyped-def]
        seen.append(len(step.inputs))
        return small(step, ops, argmax)

    monkeypatch.setattr(_kernels, "max_small", spy)
    values, argmax = func.viterbi_einsum(eq, *xs)
    assert seen == [3], "one joint step over the three operands"
    want_values, want_argmax = brute_viterbi(eq, *xs)
    _assert_values(values, want_values)
    assert torch.equal(argmax, want_argmax)


# --------------------------------------------------------------- gradients
@pytest.mark.parametrize("opt", OPTIMIZE)
@pytest.mark.parametrize("eq", list(EQUATIONS))
def test_gradients_at_ties(eq: str, opt: str) -> None:
    """max_einsum / min_einsum gradients: one-hot on the first maximiser / minimiser."""
    xs64 = _ties(eq, F64)
    _, first_max = brute_viterbi(eq, *xs64)
    _, first_min = brute_viterbi(eq, *[-x for x in xs64])  # min(x) = -max(-x)
    expected = {
        "max": _one_hot_grads(eq, xs64, first_max),
        "min": _one_hot_grads(eq, xs64, first_min),
    }
    fns = {"max": func.max_einsum, "min": func.min_einsum}
    for name, fn in fns.items():
        for dtype, block in ((F64, None), (F32, 1)):
            xs = [x.detach().to(dtype).clone().requires_grad_() for x in xs64]
            out = fn(eq, *xs, block_size=block, optimize=_optimize(eq, opt))
            assert torch.isfinite(out).all()
            _assert_values(out.detach(), brute(name, eq, *xs64))
            out.sum().backward()
            for k, (x, want) in enumerate(zip(xs, expected[name])):
                assert x.grad is not None
                assert torch.equal(x.grad.to(F64), want), (name, dtype, block, k, x.grad, want)


# ---------------------------------------------------- infinities and NaN
def _special(eq: str, kind: str) -> list[Tensor]:
    """Tie-heavy data with some entries -inf, +inf, NaN, or -inf and +inf ('mixed').

    -inf: about 40 % of the entries, and the whole first slice of the first operand (so that
    some cells have only -inf terms); +inf: two entries of the last operand; NaN: two entries
    of the first operand (so that some cells stay finite).
    """
    g = torch.Generator().manual_seed(7)
    xs = [x.clone() for x in _ties(eq, F64, seed=3)]

    def some(x: Tensor, n: int, value: float) -> None:
        x.view(-1)[torch.randperm(x.numel(), generator=g)[:n]] = value

    if kind in ("-inf", "mixed"):
        for x in xs:
            x[torch.rand(x.shape, generator=g) < 0.4] = -math.inf
        xs[0][0] = -math.inf
    if kind in ("+inf", "mixed"):
        some(xs[-1], 2, math.inf)
    if kind == "nan":
        some(xs[0], 2, math.nan)
    return xs


@pytest.mark.parametrize("kind", ["-inf", "+inf", "nan", "mixed"])
@pytest.mark.parametrize("eq", list(EQUATIONS))
def test_viterbi_non_finite(eq: str, kind: str) -> None:
    """-inf / +inf / NaN entries: the argmax follows the joint rule on every plan."""
    xs = _special(eq, kind)
    want_values, want_argmax = brute_viterbi(eq, *xs)
    for opt in OPTIMIZE:
        for block in BLOCK_SIZES:
            values, argmax = func.viterbi_einsum(
                eq, *xs, block_size=block, optimize=_optimize(eq, opt)
            )
            where = (opt, block, kind)
            dead = values == -math.inf  # all terms -inf: argmax zeros
            assert (argmax[dead] == 0).all(), where
            if kind == "mixed":
                # A pairwise plan may drop a -inf term before it meets +inf (joint: a NaN
                # term); where the values agree, the argmax must.
                agree = (values == want_values) | (values.isnan() & want_values.isnan())
                assert torch.equal(argmax[agree], want_argmax[agree]), where
            else:
                _assert_values(values, want_values)
                assert torch.equal(argmax, want_argmax), (where, argmax, want_argmax)


def test_non_finite_data_is_not_vacuous() -> None:
    """Each kind of special data gives its kind of output cells, and finite ones too."""
    wanted = {"-inf": ["-inf", "finite"], "+inf": ["+inf", "finite"], "nan": ["nan", "finite"]}
    wanted["mixed"] = ["-inf", "+inf", "nan", "finite"]
    for kind, classes in wanted.items():
        seen = dict.fromkeys(classes, 0)
        for eq in EQUATIONS:
            values = brute("max", eq, *_special(eq, kind))
            counts = {
                "-inf": (values == -math.inf).sum(),
                "+inf": (values == math.inf).sum(),
                "nan": values.isnan().sum(),
                "finite": values.isfinite().sum(),
            }
            for c in classes:
                seen[c] += int(counts[c])
        assert all(n >= 2 for n in seen.values()), (kind, seen)


# ----------------------------------------- pinned gradients, non-finite cells
_PINNED_EQ = "ab,bc,cd->ad"


def _pinned() -> list[Tensor]:
    """The operands of the pinned examples (see the derivations below)."""
    inf, nan = math.inf, math.nan
    return [
        torch.tensor([[0.0, 1.0], [2.0, nan]], dtype=F64),
        torch.tensor([[0.0, 5.0], [0.0, 3.0]], dtype=F64),
        torch.tensor([[-inf, inf, 0.0], [-inf, 5.0, 0.0]], dtype=F64),
    ]


def _assert_pinned(path: list[tuple[int, int]], *want: list[list[int]]) -> None:
    """max_einsum on the pinned operands along ``path``: its values and these gradients."""
    inf, nan = math.inf, math.nan
    xs = [x.clone().requires_grad_() for x in _pinned()]
    out = func.max_einsum(_PINNED_EQ, *xs, optimize=path)
    _assert_values(out.detach(), torch.tensor([[-inf, inf, 5.0], [nan, nan, nan]], dtype=F64))
    out.sum().backward()
    for name, x, w in zip("ABC", xs, want):
        assert x.grad is not None
        assert torch.equal(x.grad, torch.tensor(w, dtype=F64)), (name, x.grad, w)


def test_pinned_gradient_non_finite_cells() -> None:
    """max_einsum's gradient on -inf, +inf and NaN cells, derived by hand (path [(0,1),(0,1)]).

    ``ab,bc,cd->ad`` with A, B 2x2 and C 2x3.  The summed indices are b, c (first
    appearance), so the row-major rank of a term is ``2 b + c``.

    Step 1 (A, B over b): T[a, c] = max_b A[a, b] + B[b, c], ties to the smallest b (its
    rank, 2 b, is the partial rank T carries); a NaN term wins.

        A = [[0, 1], [2, nan]]      B = [[0, 5], [0, 3]]
        T[0, 0] = max(0 + 0, 1 + 0) = 1    at b = 1   rank 2
        T[0, 1] = max(0 + 5, 1 + 3) = 5    at b = 0   rank 0
        T[1, 0] = max(2 + 0, nan)   = nan  at b = 1   rank 2
        T[1, 1] = max(2 + 5, nan)   = nan  at b = 1   rank 2

    Step 2 (T, C over c): out[a, d] = max_c T[a, c] + C[c, d]; a term's rank is
    rank(T[a, c]) + c; ties (including all -inf, and several NaN) go to the smallest rank.

        C = [[-inf, +inf, 0], [-inf, 5, 0]]
        out[0, 0]: c=0: 1 - inf = -inf (rank 2), c=1: 5 - inf = -inf (rank 0 + 1 = 1)
                   -> -inf, all terms tie: c = 1 (smaller rank), whose T came from b = 0.
                   (The joint rule would take (b, c) = (0, 0): the pairwise pick differs.)
        out[0, 1]: c=0: 1 + inf = +inf, c=1: 5 + 5 = 10   -> +inf at c = 0, b = 1.
                   (Joint: (b, c) = (0, 0) is already +inf: the pairwise pick differs.)
        out[0, 2]: c=0: 1 + 0 = 1, c=1: 5 + 0 = 5        -> 5 at c = 1, b = 0 (finite).
        out[1, d]: c=0: nan (rank 2), c=1: nan (rank 3)  -> nan at c = 0, b = 1, every d.

    The gradient of each output cell (``.sum()``: cotangent 1) goes to C[c, d] of its step-2
    winner and, through T[a, c], to A[a, b] and B[b, c] of that T's step-1 winner:

        (0,0): A[0,0] B[0,1] C[1,0]      (0,1): A[0,1] B[1,0] C[0,1]
        (0,2): A[0,0] B[0,1] C[1,2]      (1,d): A[1,1] B[1,0] C[0,d]  for d = 0, 1, 2

    Counting: gA = [[2, 1], [0, 3]], gB = [[0, 2], [4, 0]], gC = [[1, 2, 1], [1, 0, 1]].
    """
    path = [(0, 1), (0, 1)]
    eq, (a, b, c) = _PINNED_EQ, _pinned()
    steps = func.plan(eq, a, b, c, semiring=func.MAX_PLUS, optimize=path).steps
    assert [s.inputs for s in steps] == [("ab", "bc"), ("cd", "ac")]  # over b, then over c

    _assert_pinned(path, [[2, 1], [0, 3]], [[0, 2], [4, 0]], [[1, 2, 1], [1, 0, 1]])

    # The Viterbi argmax of the same plan follows the joint rule (not the steps' picks):
    # -inf cell -> zeros; +inf cell (0,1) -> the first +inf term (0, 0); finite (0,2) ->
    # (0, 1); NaN cells -> the first NaN term, (b, c) = (1, 0).
    values, argmax = func.viterbi_einsum(eq, a, b, c, optimize=path)
    want_argmax = torch.tensor([[[0, 0], [0, 0], [0, 1]], [[1, 0], [1, 0], [1, 0]]])
    assert torch.equal(argmax, want_argmax), argmax
    ref_values, ref_argmax = brute_viterbi(eq, a, b, c)
    _assert_values(values, ref_values)
    assert torch.equal(ref_argmax, want_argmax)


def test_pinned_gradient_non_finite_cells_other_path() -> None:
    """The same operands along the path [(1, 2), (0, 1)], derived by hand.

    Step 1 (B, C over c): U[b, d] = max_c B[b, c] + C[c, d] -- its c is the first summed
    index of the step and of rank stride 1, so ties go to the smallest c (all -inf: c = 0);
    U carries the partial rank c.

        U[0, 0] = max(0 - inf, 5 - inf) = -inf  c = 0   rank 0
        U[0, 1] = max(0 + inf, 5 + 5)   = +inf  c = 0   rank 0
        U[0, 2] = max(0 + 0, 5 + 0)     = 5     c = 1   rank 1
        U[1, 0] = max(0 - inf, 3 - inf) = -inf  c = 0   rank 0
        U[1, 1] = max(0 + inf, 3 + 5)   = +inf  c = 0   rank 0
        U[1, 2] = max(0 + 0, 3 + 0)     = 3     c = 1   rank 1

    Step 2 (A, U over b): out[a, d] = max_b A[a, b] + U[b, d]; rank 2 b + rank(U[b, d]).

        out[0, 0]: b=0: -inf (rank 0), b=1: -inf (rank 2)  -> b = 0, c = 0
        out[0, 1]: b=0: +inf (rank 0), b=1: +inf (rank 2)  -> b = 0, c = 0
        out[0, 2]: b=0: 0 + 5 = 5,     b=1: 1 + 3 = 4      -> b = 0, c = 1
        out[1, 0]: b=0: 2 - inf = -inf, b=1: nan - inf = nan -> b = 1, c = 0
        out[1, 1]: b=0: 2 + inf = +inf, b=1: nan           -> b = 1, c = 0
        out[1, 2]: b=0: 2 + 5 = 7,      b=1: nan           -> b = 1, c = 1
                   (the joint rule's first NaN term is (1, 0): the pairwise pick differs)

    Gradient entries: (0,0): A[0,0] B[0,0] C[0,0]; (0,1): A[0,0] B[0,0] C[0,1];
    (0,2): A[0,0] B[0,1] C[1,2]; (1,0): A[1,1] B[1,0] C[0,0]; (1,1): A[1,1] B[1,0] C[0,1];
    (1,2): A[1,1] B[1,1] C[1,2].  So gA = [[3, 0], [0, 3]], gB = [[2, 1], [2, 1]],
    gC = [[2, 2, 0], [0, 0, 2]].
    """
    path = [(1, 2), (0, 1)]
    steps = func.plan(_PINNED_EQ, *_pinned(), semiring=func.MAX_PLUS, optimize=path).steps
    assert [s.inputs for s in steps] == [("bc", "cd"), ("ab", "bd")]  # over c, then over b
    _assert_pinned(path, [[3, 0], [0, 3]], [[2, 1], [2, 1]], [[2, 2, 0], [0, 0, 2]])
    # The Viterbi argmax still follows the joint rule.
    values, argmax = func.viterbi_einsum(_PINNED_EQ, *_pinned(), optimize=path)
    ref_values, ref_argmax = brute_viterbi(_PINNED_EQ, *_pinned())
    _assert_values(values, ref_values)
    assert torch.equal(argmax, ref_argmax)


# ----------------------------------------------------- block-size independence
@pytest.mark.parametrize("opt", ["auto", "greedy", "joint", "path0", "path1"])
@pytest.mark.parametrize("eq", ["bsxk,bsyk,xyz->bsz", "ij,jk,kl,lm,mn->in"])
def test_block_size_independence(eq: str, opt: str) -> None:
    """The same tie-heavy case under block sizes 1, 2, 3 and None: identical argmax."""
    xs = _ties(eq, F32)
    assert (_maximisers(eq, xs) > 1).float().mean() >= 0.5
    results = [
        func.viterbi_einsum(eq, *xs, block_size=block, optimize=_optimize(eq, opt))
        for block in (1, 2, 3, None)
    ]
    _, want_argmax = brute_viterbi(eq, *xs)
    for values, argmax in results:
        assert torch.equal(values, results[0][0])
        assert torch.equal(argmax, results[0][1])
    assert torch.equal(results[0][1], want_argmax)


def test_compiled_pairwise_plans_keep_the_rule() -> None:
    # Under torch.compile the ranked steps run the traced torch kernel: the same argmax and
    # gradients as eager, no graph break.
    from torch._dynamo.utils import counters

    eq = "bsxk,bsyk,xyz->bsz"
    g = torch.Generator().manual_seed(3)
    xs = [
        torch.randint(0, 3, s, generator=g).float() for s in [(2, 3, 4, 2), (2, 3, 4, 2), (4, 4, 3)]
    ]
    torch._dynamo.reset()
    counters.clear()
    viterbi = torch.compile(lambda *a: func.viterbi_einsum(eq, *a), fullgraph=True)
    values, argmax = viterbi(*xs)
    want_values, want_argmax = brute_viterbi(eq, *[x.double() for x in xs])
    assert torch.equal(values.double(), want_values) and torch.equal(argmax, want_argmax)
    compiled = [x.clone().requires_grad_() for x in xs]
    torch.compile(lambda *a: func.max_einsum(eq, *a), fullgraph=True)(*compiled).sum().backward()
    eager = [x.clone().requires_grad_() for x in xs]
    func.max_einsum(eq, *eager).sum().backward()
    for c, e in zip(compiled, eager):
        assert c.grad is not None and e.grad is not None and torch.equal(c.grad, e.grad)
    assert not counters["graph_break"]
