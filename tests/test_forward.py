"""Forward values of the functional core against the brute-force oracle.

Every public contraction (real, log, max-plus, min-plus, a user-defined
semiring that takes the generic blocked path, and Viterbi) is checked on a
table of equations covering the whole ``torch.einsum`` string syntax, for
several block sizes, both plan kinds (pairwise ``'auto'`` and joint
``False``) and three dtypes.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from oracle import brute, brute_viterbi
from semiring_einsum import func

Tensor = torch.Tensor

# A semiring equal to LOG field by field, but not the LOG object: it takes the
# generic blocked path (semiring_einsum dispatches on identity).
USER_LOG = dataclasses.replace(func.LOG)

SEMIRINGS = {
    "real": (func.einsum, "real"),
    "log": (func.log_einsum, "log"),
    "max": (func.max_einsum, "max"),
    "min": (func.min_einsum, "min"),
    "user_log": (lambda eq, *xs, **kw: func.semiring_einsum(USER_LOG, eq, *xs, **kw), "log"),
}

# (equation, shapes)
EQUATIONS = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]),
    ("abce,abde,abdf->acd", [(2, 3, 4, 2), (2, 3, 3, 2), (2, 3, 3, 2)]),
    ("ii->i", [(4, 4)]),
    ("iij,jk", [(3, 3, 4), (4, 2)]),
    ("ij->", [(3, 4)]),
    ("i,j->ij", [(3,), (4,)]),
    ("ij->ji", [(3, 4)]),
    ("...ij,...jk->...ik", [(2, 3, 4), (4, 5)]),
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (3, 4, 5)]),
    ("...ij,...jk->...ik", [(3, 4), (4, 2)]),
    ("...i,...i->", [(3,), (2, 3)]),
    ("i...,...i", [(2, 3, 4), (4, 2)]),
    ("i,i->", [(5,), (5,)]),
    ("ij,jk", [(3, 4), (4, 2)]),
    ("ij,jk->ik", [(3, 1), (4, 5)]),
    (" ij , jk -> ik ", [(3, 4), (4, 2)]),
    ("ab,bc,cd,de,ef->af", [(2, 3), (3, 2), (2, 4), (4, 2), (2, 3)]),
    ("ijk,jkl,lm->im", [(2, 3, 2), (3, 2, 4), (4, 3)]),
    ("ij,ij->ij", [(3, 4), (3, 4)]),
    ("ii", [(3, 3)]),
    ("ba,Ab", [(3, 2), (4, 3)]),
    ("ijk->kji", [(2, 3, 4)]),
]
EQ_IDS = [f"{eq.strip()}|{'x'.join(''.join(map(str, s)) for s in sh)}" for eq, sh in EQUATIONS]

BLOCK_SIZES = {
    "bs1": 1,
    "bs3": 3,
    "bs1000": 1000,
    "auto64B": func.AutomaticBlockSize(max_cpu_bytes=64),
    "None": None,
}
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make(shapes, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def integers(shapes, dtype, seed, low=-2, high=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, s, generator=g).to(dtype) for s in shapes]


def scale_of(semiring: str, equation: str, xs) -> Tensor:
    """An elementwise magnitude bound for the result, for tolerances."""
    ab = [x.double().abs() for x in xs]
    if semiring == "real":
        return brute("real", equation, *ab)
    bound = brute("max", equation, *ab)
    return torch.where(torch.isfinite(bound), bound, 0.0) + 3.0


def assert_matches(got: Tensor, want: Tensor, scale, dtype, what="") -> None:
    """Same shape; same NaN and ±inf pattern; finite values within tolerance."""
    assert tuple(got.shape) == tuple(want.shape), (what, got.shape, want.shape)
    got = got.detach().double()
    want = want.double()
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_g, nan_w), (what, got, want)
    for sign in (math.inf, -math.inf):
        assert torch.equal(got == sign, want == sign), (what, got, want)
    fin = torch.isfinite(want)
    tol = TOL[dtype] * (1.0 + torch.as_tensor(scale, dtype=torch.float64))
    tol = torch.broadcast_to(tol, want.shape)
    err = (got - want).abs()
    bad = fin & (err > tol)
    assert not bad.any(), (what, got[bad], want[bad], tol[bad])


def _seed(*parts) -> int:
    return sum((i + 1) * 7919 * sum(map(ord, str(p))) for i, p in enumerate(parts)) % (2**31)


# --------------------------------------------------------------------- table
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
@pytest.mark.parametrize("block_size", list(BLOCK_SIZES.values()), ids=list(BLOCK_SIZES))
@pytest.mark.parametrize("semiring", list(SEMIRINGS))
@pytest.mark.parametrize(("equation", "shapes"), EQUATIONS, ids=EQ_IDS)
def test_matches_oracle(equation, shapes, semiring, block_size, optimize, dtype):
    fn, name = SEMIRINGS[semiring]
    xs = make(shapes, dtype, _seed(equation, shapes), scale=1.0 if name == "real" else 2.0)
    before = [x.clone() for x in xs]
    got = fn(equation, *xs, block_size=block_size, optimize=optimize)
    assert got.dtype == dtype
    want = brute(name, equation, *xs)
    assert_matches(got, want, scale_of(name, equation, xs), dtype, (equation, semiring))
    for x, b in zip(xs, before):  # inputs are never modified
        assert torch.equal(x, b)
    if name == "real" and dtype != torch.bfloat16:
        ref = torch.einsum(equation, *xs)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("semiring", list(SEMIRINGS))
@pytest.mark.parametrize("equation", ["ij->ij", "ij->ji", "ii->i", "i->i"])
def test_output_is_fresh(equation, semiring):
    fn, _ = SEMIRINGS[semiring]
    x = torch.randn(3, 3) if equation != "i->i" else torch.randn(3)
    before = x.clone()
    out = fn(equation, x)
    assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    out.add_(1.0)  # writing to the result never changes the input
    assert torch.equal(x, before)


# ------------------------------------------------------------- non-finite
NEG_INF_EQUATIONS = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 3)]),
    ("ij,jk,kl->il", [(3, 3), (3, 4), (4, 2)]),
    ("ij->", [(3, 4)]),
    ("ij->i", [(3, 4)]),
    ("abce,abde,abdf->acd", [(2, 3, 4, 2), (2, 3, 3, 2), (2, 3, 3, 2)]),
    ("...ij,...jk->...ik", [(2, 3, 4), (4, 5)]),
    ("iij,jk", [(3, 3, 4), (4, 2)]),
]


@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
@pytest.mark.parametrize("block_size", [1, 3, None], ids=["bs1", "bs3", "None"])
@pytest.mark.parametrize("semiring", ["log", "max", "min", "user_log"])
@pytest.mark.parametrize(("equation", "shapes"), NEG_INF_EQUATIONS)
def test_infinities(equation, shapes, semiring, block_size, optimize):
    """-inf (log, max) / +inf (min) entries; a whole first row of operand 0 infinite."""
    fn, name = SEMIRINGS[semiring]
    inf = math.inf if name == "min" else -math.inf
    g = torch.Generator().manual_seed(_seed(equation, semiring))
    xs = []
    for s in shapes:
        x = torch.randn(*s, generator=g, dtype=torch.float64) * 3
        x = torch.where(torch.rand(*s, generator=g, dtype=torch.float64) < 0.3, inf, x)
        xs.append(x)
    xs[0][0] = inf  # a whole slice along the first dim
    got = fn(equation, *xs, block_size=block_size, optimize=optimize)
    want = brute(name, equation, *xs)
    assert not torch.isnan(got).any()
    assert_matches(got, want, scale_of(name, equation, xs), torch.float64, equation)


@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize("semiring", ["log", "max", "user_log"])
def test_all_neg_inf_rows_give_neg_inf(semiring, block_size, optimize):
    fn, _ = SEMIRINGS[semiring]
    a = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(4, 5, dtype=torch.float64)
    c = torch.randn(5, 2, dtype=torch.float64)
    a[1] = -math.inf
    b[:, 3] = -math.inf
    out = fn("ij,jk->ik", a, b, block_size=block_size, optimize=optimize)
    assert not torch.isnan(out).any()
    assert (out[1] == -math.inf).all()
    assert (out[:, 3] == -math.inf).all()
    assert torch.isfinite(out[[0, 2]][:, [0, 1, 2, 4]]).all()
    out3 = fn("ij,jk,kl->il", a, b, c, block_size=block_size, optimize=optimize)
    assert not torch.isnan(out3).any()
    assert (out3[1] == -math.inf).all()
    # Everything -inf.
    full = torch.full((3, 4), -math.inf, dtype=torch.float64)
    out = fn("ij,jk->ik", full, b, block_size=block_size, optimize=optimize)
    assert (out == -math.inf).all()


@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize("semiring", list(SEMIRINGS))
def test_nan_propagates(semiring, block_size):
    fn, name = SEMIRINGS[semiring]
    a = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(4, 5, dtype=torch.float64)
    a[1, 2] = math.nan
    out = fn("ij,jk->ik", a, b, block_size=block_size)
    assert torch.isnan(out[1]).all()
    assert not torch.isnan(out[[0, 2]]).any()
    want = brute(name, "ij,jk->ik", a, b)
    assert_matches(out, want, scale_of(name, "ij,jk->ik", [a, b]), torch.float64)


@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("semiring", ["log", "user_log"])
def test_log_is_stable_for_large_magnitudes(semiring, dtype, block_size, optimize):
    fn, _ = SEMIRINGS[semiring]
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 500).to(dtype)
    b = (torch.randn(4, 2, generator=g, dtype=torch.float64) * 500 - 1000).to(dtype)
    c = (torch.randn(2, 3, generator=g, dtype=torch.float64) * 500 + 1000).to(dtype)
    for eq, xs in [("ij,jk->ik", [a, b]), ("ij,jk,kl->il", [a, b, c])]:
        got = fn(eq, *xs, block_size=block_size, optimize=optimize)
        want = brute("log", eq, *xs)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype] * 10, atol=1e-3)


# --------------------------------------------------------- empty reductions
EMPTY = [
    ("ij,jk->ik", [(3, 0), (0, 4)]),
    ("i->", [(0,)]),
    ("ij->i", [(3, 0)]),
    ("ij,jk,kl->il", [(2, 3), (3, 0), (0, 4)]),
    ("ij,jk", [(2, 0), (0, 3)]),
    ("ii->", [(0, 0)]),
    ("...i,i->...", [(2, 0), (0,)]),
]
ZERO = {"real": 0.0, "log": -math.inf, "max": -math.inf, "min": math.inf}


@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
@pytest.mark.parametrize("block_size", [1, 3, None], ids=["bs1", "bs3", "None"])
@pytest.mark.parametrize("semiring", list(SEMIRINGS))
@pytest.mark.parametrize(("equation", "shapes"), EMPTY)
def test_empty_sum_is_semiring_zero(equation, shapes, semiring, block_size, optimize):
    fn, name = SEMIRINGS[semiring]
    xs = make(shapes, torch.float32, 0)
    got = fn(equation, *xs, block_size=block_size, optimize=optimize)
    want = brute(name, equation, *xs)
    assert got.shape == want.shape
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), want)
    assert (want == ZERO[name]).all()


@pytest.mark.parametrize("block_size", [1, 3, None], ids=["bs1", "bs3", "None"])
@pytest.mark.parametrize(("equation", "shapes"), EMPTY)
def test_viterbi_empty_sum(equation, shapes, block_size):
    xs = make(shapes, torch.float32, 0)
    values, argmax = func.viterbi_einsum(equation, *xs, block_size=block_size)
    want_v, want_a = brute_viterbi(equation, *xs)
    assert values.dtype == torch.float32
    assert torch.equal(values.double(), want_v)
    assert torch.equal(argmax, want_a)


@pytest.mark.parametrize("semiring", list(SEMIRINGS) + ["viterbi"])
def test_empty_output(semiring):
    """A size-0 output dimension (with a non-empty summed index)."""
    a, b = torch.randn(0, 3), torch.randn(3, 4)
    if semiring == "viterbi":
        values, argmax = func.viterbi_einsum("ij,jk->ik", a, b)
        assert values.shape == (0, 4) and argmax.shape == (0, 4, 1)
        return
    fn, _ = SEMIRINGS[semiring]
    out = fn("ij,jk->ik", a, b)
    assert out.shape == (0, 4)
    out = fn("ij->", torch.randn(0, 3))
    assert out.shape == ()


# -------------------------------------------------------------- dtypes
@pytest.mark.parametrize("semiring", list(SEMIRINGS))
@pytest.mark.parametrize(
    ("d0", "d1"),
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float64),
        (torch.bfloat16, torch.float16),
    ],
)
@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
def test_mixed_dtypes_promote(semiring, d0, d1, optimize):
    fn, name = SEMIRINGS[semiring]
    a = make([(3, 4)], d0, 1)[0]
    b = make([(4, 5)], d1, 2)[0]
    c = make([(5, 2)], d0, 3)[0]
    expected = torch.result_type(a, b)
    got = fn("ij,jk->ik", a, b, optimize=optimize)
    assert got.dtype == expected
    assert_matches(
        got, brute(name, "ij,jk->ik", a, b), scale_of(name, "ij,jk->ik", [a, b]), expected
    )
    got = fn("ij,jk,kl->il", a, b, c, optimize=optimize)
    assert got.dtype == expected
    want = brute(name, "ij,jk,kl->il", a, b, c)
    assert_matches(got, want, scale_of(name, "ij,jk,kl->il", [a, b, c]), expected)


@pytest.mark.parametrize("semiring", list(SEMIRINGS))
@pytest.mark.parametrize("block_size", [2, None], ids=["bs2", "None"])
def test_float16(semiring, block_size):
    fn, name = SEMIRINGS[semiring]
    xs = make([(3, 4), (4, 5), (5, 2)], torch.float16, 9)
    got = fn("ij,jk,kl->il", *xs, block_size=block_size)
    assert got.dtype == torch.float16
    want = brute(name, "ij,jk,kl->il", *xs)
    assert_matches(got, want, scale_of(name, "ij,jk,kl->il", xs), torch.float16)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.complex128])
@pytest.mark.parametrize("optimize", ["auto", False], ids=["auto", "joint"])
@pytest.mark.parametrize(
    ("equation", "shapes"),
    [
        ("ij,jk->ik", [(3, 4), (4, 5)]),
        ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]),
        ("ii->i", [(3, 3)]),
    ],
)
def test_real_other_dtypes_match_torch(equation, shapes, dtype, optimize):
    g = torch.Generator().manual_seed(3)
    if dtype.is_complex:
        xs = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    else:
        xs = [torch.randint(-5, 6, s, generator=g, dtype=dtype) for s in shapes]
    got = func.einsum(equation, *xs, optimize=optimize, block_size=2)
    want = torch.einsum(equation, *xs)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ viterbi
VITERBI_EQUATIONS = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]),
    ("abce,abde,abdf->acd", [(2, 3, 4, 2), (2, 3, 3, 2), (2, 3, 3, 2)]),
    ("ij->", [(3, 4)]),
    ("ij->j", [(5, 4)]),
    ("ii->i", [(3, 3)]),
    ("iij,jk", [(3, 3, 4), (4, 2)]),
    ("i,j->ij", [(3,), (4,)]),
    ("...ij,...jk->...ik", [(2, 3, 4), (4, 5)]),
    ("...i,...i->", [(3,), (2, 3)]),
    ("i...,...i", [(2, 3, 4), (4, 2)]),
    ("ab,bc,cd,de,ef->af", [(2, 3), (3, 2), (2, 4), (4, 2), (2, 3)]),
    ("kij,jk->i", [(3, 2, 4), (4, 3)]),
]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("block_size", list(BLOCK_SIZES.values()), ids=list(BLOCK_SIZES))
@pytest.mark.parametrize(("equation", "shapes"), VITERBI_EQUATIONS)
def test_viterbi_matches_oracle_with_ties(equation, shapes, block_size, dtype):
    """Integer data: ties everywhere; they go to the first maximiser, row-major."""
    xs = integers(shapes, dtype, _seed(equation))
    values, argmax = func.viterbi_einsum(equation, *xs, block_size=block_size)
    want_v, want_a = brute_viterbi(equation, *xs)
    assert values.dtype == dtype
    assert argmax.dtype == torch.int64
    assert torch.equal(values.double(), want_v)
    assert argmax.shape == want_a.shape
    assert torch.equal(argmax, want_a)
    assert torch.equal(values, func.max_einsum(equation, *xs, block_size=block_size))


@pytest.mark.parametrize("block_size", [1, 3, None], ids=["bs1", "bs3", "None"])
@pytest.mark.parametrize(("equation", "shapes"), VITERBI_EQUATIONS)
def test_viterbi_tie_free(equation, shapes, block_size):
    xs = make(shapes, torch.float64, _seed(equation, "tf"))
    values, argmax = func.viterbi_einsum(equation, *xs, block_size=block_size)
    want_v, want_a = brute_viterbi(equation, *xs)
    torch.testing.assert_close(values, want_v)
    assert torch.equal(argmax, want_a)


@pytest.mark.parametrize("block_size", [1, 2, 3, None], ids=["bs1", "bs2", "bs3", "None"])
def test_viterbi_all_neg_inf_and_nan(block_size):
    g = torch.Generator().manual_seed(11)
    a = torch.randint(-2, 3, (4, 5), generator=g).double()
    b = torch.randint(-2, 3, (5, 6), generator=g).double()
    a[0] = -math.inf  # row 0: every term -inf -> value -inf, argmax 0
    b[:, 2] = -math.inf  # column 2 likewise
    a[2, 1] = math.nan  # row 2: every cell NaN, argmax j=1 (the only NaN)
    a[3, 3] = math.nan
    b[1, 4] = math.nan  # cell (3, 4): NaN at j=1 and j=3 -> the first, j=1
    values, argmax = func.viterbi_einsum("ij,jk->ik", a, b, block_size=block_size)
    want_v, want_a = brute_viterbi("ij,jk->ik", a, b)
    assert torch.equal(torch.isnan(values), torch.isnan(want_v))
    assert torch.equal(values.nan_to_num(), want_v.nan_to_num())
    assert torch.equal(argmax, want_a)
    finite_cols = [0, 1, 2, 3, 5]  # column 4 has a NaN at j=1 in every row
    assert (values[0, finite_cols] == -math.inf).all() and (argmax[0, finite_cols] == 0).all()
    assert values[1, 2] == -math.inf and argmax[1, 2, 0] == 0
    assert torch.isnan(values[2]).all() and (argmax[2, :, 0] == 1).all()
    assert torch.isnan(values[3]).all() and (argmax[3, finite_cols, 0] == 3).all()
    assert argmax[3, 4, 0] == 1  # NaN at j=1 and j=3: the first


@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
def test_viterbi_ties_first_row_major_multi_index(block_size):
    """All terms equal: the argmax is (0, 0, ...) whatever the windows; one late
    strict maximum wins wherever it is."""
    a = torch.zeros(2, 3, 4)
    b = torch.zeros(4, 3)
    values, argmax = func.viterbi_einsum("ijk,kj->i", a, b, block_size=block_size)
    assert torch.equal(values, torch.zeros(2))
    assert torch.equal(argmax, torch.zeros(2, 2, dtype=torch.int64))
    a[1, 2, 3] = 1.0  # (j, k) = (2, 3)
    a[1, 1, 3] = 1.0  # a tie at (1, 3), which comes first in row-major (j, k) order
    values, argmax = func.viterbi_einsum("ijk,kj->i", a, b, block_size=block_size)
    assert values.tolist() == [0.0, 1.0]
    assert argmax.tolist() == [[0, 0], [1, 3]]  # summed order: j then k


@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize("equation", ["aab->", "aba,ba->"])
def test_viterbi_ties_use_first_appearance_order_with_diagonals(equation, block_size):
    """The summed variables of 'aab->' are (a, b) in order of first appearance,
    although the diagonal 'aa' is taken after b.  Tie between (a, b) = (0, 1)
    and (1, 0): row-major (a, b) order puts (0, 1) first."""
    x = torch.zeros(2, 2, 2)
    if equation == "aab->":
        x[0, 0, 1] = 1.0  # (a, b) = (0, 1)
        x[1, 1, 0] = 1.0  # (a, b) = (1, 0)
        xs = [x]
    else:  # terms x[a, b, a] + y[b, a]
        y = torch.zeros(2, 2)
        y[1, 0] = 1.0  # (a, b) = (0, 1)
        y[0, 1] = 1.0  # (a, b) = (1, 0)
        xs = [x, y]
    values, argmax = func.viterbi_einsum(equation, *xs, block_size=block_size)
    want_v, want_a = brute_viterbi(equation, *xs)
    assert want_a.tolist() == [0, 1]
    assert values.item() == 1.0
    assert argmax.tolist() == [0, 1]


@pytest.mark.parametrize("block_size", [1, 2, None], ids=["bs1", "bs2", "None"])
@pytest.mark.parametrize("semiring", list(SEMIRINGS) + ["viterbi"])
def test_no_summed_index_is_product(semiring, block_size):
    """No contracted index: the ⊗-product of the broadcast operands."""
    a = torch.randn(3, 1, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    if semiring == "viterbi":
        values, argmax = func.viterbi_einsum("ij,j->ij", a, b, block_size=block_size)
        assert torch.equal(values, a + b)
        assert argmax.shape == (3, 4, 0)
        return
    fn, name = SEMIRINGS[semiring]
    got = fn("ij,j->ij", a, b, block_size=block_size)
    want = a * b if name == "real" else a + b
    torch.testing.assert_close(got, want)
