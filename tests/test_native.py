"""The native max-plus kernel (:mod:`semiring_einsum.func._native`) against independent oracles.

Every check compares the native kernel's values and first argmax with the brute-force float64
oracle (:mod:`oracle`), with the pure-torch kernels (``SEMIRING_EINSUM_NATIVE=0``), or with
torch's own broadcast-and-reduce: operand layouts (batch broadcast, swapped operands, permuted
outputs, several summed indices, non-contiguous views, sizes that are not multiples of the
kernel's 4 x 128 tiles), ties, NaN and infinities, half-precision inputs, gradients, vmap,
torch.compile, purity of inputs and outputs, and the multi-threaded split.  Each native test
also asserts that the plan names the ``tropical`` kernel and that the kernel really took the
call (a spy on :func:`_native.max_plus`: it may return ``None`` and leave the step to the
pure-torch kernels).

The native tests are skipped, with :func:`func.native_status` as the reason, where the kernel
is not available; the fallback tests (no compiler, a failing compiler, the kernel disabled)
run everywhere.

Test inputs are dyadic rationals (``randint / 2**k``) wherever values are compared: every sum
of two of them is exact in float32 as in float64, so float32 results must equal the float64
oracle exactly, argmax included.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from oracle import brute, brute_viterbi, joint
from semiring_einsum import func
from semiring_einsum.func import _kernels as K
from semiring_einsum.func import _native as N
from semiring_einsum.func._rules import MAX_TROPICAL

Tensor = torch.Tensor
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = [F32, F64]
IDS = ["f32", "f64"]

STATUS = func.native_status()
native = pytest.mark.skipif(not STATUS.startswith("native"), reason=STATUS)
LINUX = sys.platform.startswith("linux")


# ------------------------------------------------------------------ helpers
def _exact(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> Tensor:
    """Random values in [-512, 512) on a grid of 2**-10: sums of two are exact in float32."""
    return (torch.randint(-(2**19), 2**19, shape, generator=g) / 2**10).to(dtype)


def _ties(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> Tensor:
    """Values in {0, 1, 2}: most output cells have several maximisers."""
    return torch.randint(0, 3, shape, generator=g).to(dtype)


def _maximisers(eq: str, xs: list[Tensor]) -> Tensor:
    """How many terms of each output cell reach its maximum (the oracle's joint space)."""
    tensors, output, summed, size = joint(eq, *xs)
    terms = sum(tensors, torch.zeros(()))
    terms = terms.expand([size[c] for c in output + summed])
    terms = terms.reshape([size[c] for c in output] + [-1])
    return (terms == terms.amax(-1, keepdim=True)).sum(-1)


def _kernels(eq: str, *xs: Tensor) -> list[str]:
    return [s.kernel.name for s in func.plan(eq, *xs, semiring=func.MAX_PLUS).steps]


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each call of the native kernel, whether it took the step (``None``: it did not)."""
    calls: list[bool] = []
    original = N.max_plus

    def spy(*args: object, **kwargs: object) -> object:
        found = original(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(found is not None)
        return found

    monkeypatch.setattr(N, "max_plus", spy)
    return calls


@pytest.fixture
def vjp_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often the native backward ran (``[]`` where the module has none)."""
    if not hasattr(N, "max_plus_vjp"):
        return []
    calls = [0]
    original = N.max_plus_vjp

    def spy(*args: object) -> object:
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(N, "max_plus_vjp", spy)
    return calls


@pytest.fixture
def fresh() -> Iterator[None]:
    """Caches cleared before and after (the library is loaded anew with the test's setup)."""
    func.clear_caches()
    yield
    func.clear_caches()


def _pure_torch(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], object]) -> object:
    """``fn()`` on the pure-torch kernels; the native kernel is back afterwards."""
    with monkeypatch.context() as m:
        m.setenv("SEMIRING_EINSUM_NATIVE", "0")
        func.clear_caches()
        try:
            assert func.native_status().startswith("pure torch:")
            return fn()
        finally:
            func.clear_caches()


def _assert_same(got: Tensor, want: Tensor) -> None:
    """Bitwise-equal values (NaN where NaN), after casting ``got`` to ``want``'s dtype."""
    assert got.shape == want.shape
    torch.testing.assert_close(got.to(want.dtype), want, rtol=0, atol=0, equal_nan=True)


def _check_against_oracle(eq: str, xs: list[Tensor]) -> None:
    """Viterbi (values and argmax), max_einsum and min_einsum against the oracle."""
    dtype = xs[0].dtype
    x64 = [x.double() for x in xs]
    values, argmax = func.viterbi_einsum(eq, *xs)
    want_values, want_argmax = brute_viterbi(eq, *x64)
    assert values.dtype == dtype and argmax.dtype == torch.int64
    _assert_same(values, want_values)
    assert torch.equal(argmax, want_argmax)
    got = func.max_einsum(eq, *xs)
    assert got.dtype == dtype
    _assert_same(got, brute("max", eq, *x64))
    got = func.min_einsum(eq, *xs)
    assert got.dtype == dtype
    _assert_same(got, brute("min", eq, *x64))


# ----------------------------------------------------------------- layouts
CASES = {
    "matmul": ("ij,jk->ik", [(5, 7), (7, 130)]),
    "batched": ("bij,bjk->bik", [(3, 5, 6), (3, 6, 65)]),
    "right_broadcast": ("bij,jk->bik", [(3, 5, 6), (6, 3)]),
    "transposed_out": ("ik,kj->ji", [(5, 9), (9, 67)]),
    "swapped": ("bkj,bik->bij", [(2, 9, 66), (2, 5, 9)]),
    "permuted_out": ("bij,bjk->kib", [(2, 5, 6), (2, 6, 3)]),
    "two_summed": ("ijkl,klm->ijm", [(2, 3, 4, 5), (4, 5, 70)]),
    "two_summed_reversed": ("ijlk,klm->ijm", [(2, 3, 4, 5), (5, 4, 7)]),
    "batch1_left": ("bij,bjk->bik", [(1, 3, 4), (5, 4, 2)]),
    "batch1_right": ("bij,bjk->bik", [(5, 3, 4), (1, 4, 66)]),
    "no_rows": ("j,jk->k", [(7,), (7, 65)]),
    "no_cols": ("ij,j->i", [(5, 7), (7,)]),
    "dot": ("ij,ij->", [(3, 5), (3, 5)]),
    "batch_only": ("bij,bij->b", [(4, 3, 5), (4, 3, 5)]),
    "one_term": ("bij,bjk->bik", [(2, 5, 1), (2, 1, 65)]),
}


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_layouts_match_the_oracle(case: str, dtype: torch.dtype, taken: list[bool]) -> None:
    eq, shapes = CASES[case]
    g = torch.Generator().manual_seed(10)
    xs = [_exact(s, dtype, g) for s in shapes]
    assert _kernels(eq, *xs) == ["tropical"]
    _check_against_oracle(eq, xs)
    assert taken and all(taken)


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_sizes_around_the_tiles(dtype: torch.dtype, taken: list[bool]) -> None:
    # Tiles are 4 rows x 128 columns: partial tiles on both sides, one and several, and
    # exact multiples (the full tiles run loops with constant bounds).
    g = torch.Generator().manual_seed(11)
    for rows in (1, 3, 5, 8):
        for cols in (1, 3, 5, 65, 128, 130, 256):
            for k in (1, 9):
                a, b = _exact((2, rows, k), dtype, g), _exact((2, k, cols), dtype, g)
                assert _kernels("bij,bjk->bik", a, b) == ["tropical"]
                _check_against_oracle("bij,bjk->bik", [a, b])
    assert len(taken) == 4 * 7 * 2 * 3 and all(taken)


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_non_contiguous_inputs(dtype: torch.dtype, taken: list[bool]) -> None:
    g = torch.Generator().manual_seed(12)
    # a slice with step 2 (strided summed index) times a transposed view (strided columns)
    a = _exact((5, 14), dtype, g)[:, ::2]
    b = _exact((130, 7), dtype, g).t()
    # batched: a transposed view times a slice with step 2 along the columns
    c = _exact((3, 6, 5), dtype, g).transpose(1, 2)
    d = _exact((3, 6, 140), dtype, g)[..., ::2]
    # the swapped layout (columns from the left operand) with a strided batch
    e = _exact((4, 9, 66), dtype, g)[::2]
    f = _exact((2, 5, 18), dtype, g)[..., 1::2]
    for x in (a, b, c, d, e, f):
        assert not x.is_contiguous()
    for eq, xs in (("ij,jk->ik", [a, b]), ("bij,bjk->bik", [c, d]), ("bkj,bik->bij", [e, f])):
        clones = [x.clone() for x in xs]
        assert _kernels(eq, *xs) == ["tropical"]
        _check_against_oracle(eq, xs)
        # the same answer as on contiguous copies, and against torch's own reduction
        values = func.max_einsum(eq, *xs)
        _assert_same(values, func.max_einsum(eq, *[x.contiguous() for x in xs]))
        for x, x0 in zip(xs, clones):
            assert torch.equal(x, x0)
    ab = (a[:, :, None] + b[None, :, :]).amax(1)
    _assert_same(func.max_einsum("ij,jk->ik", a, b), ab)
    cd = (c[..., :, :, None] + d[..., None, :, :]).amax(-2)
    _assert_same(func.max_einsum("bij,bjk->bik", c, d), cd)
    assert all(taken)


def _sliced_permuted(g: torch.Generator) -> Tensor:
    """The stack RNN's POP operand: a corner of a 7-d tensor whose groups interleave."""
    return torch.randn((3, 6, 6, 2, 3, 2, 3), generator=g)[:, :-1, :-1]


def _base(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> Tensor:
    """Random values; floats also hold a NaN with a payload, -0.0 and -inf (moved as bits)."""
    x = (torch.randn(shape, generator=g) * 1000).to(dtype)
    if dtype.is_floating_point and x.numel() >= 3:
        bits = {F32: (torch.int32, 0x7FC01234), F64: (torch.int64, 0x7FF8000000001234)}
        kind, nan = bits[dtype]
        flat = x.view(-1)
        flat.view(kind)[0] = nan
        flat[1], flat[2] = -0.0, -math.inf
    return x


# Views the native copy loop must copy exactly: dims merged, a table of inner offsets,
# one long strided dim, broadcast (stride 0), size-1 dims.  (An empty tensor is contiguous:
# never copied.)
COPY_VIEWS: dict[str, Callable[[torch.dtype, torch.Generator], Tensor]] = {
    "pop_operand": lambda t, g: _base((3, 6, 6, 2, 3, 2, 3), t, g)[:, :-1, :-1].permute(
        0, 6, 2, 5, 1, 3, 4
    ),
    "transposed": lambda t, g: _base((70, 90), t, g).t(),
    "long_strided": lambda t, g: _base((30000,), t, g)[::3],
    "column_slices": lambda t, g: _base((300, 300), t, g)[:, 1::2],
    "broadcast": lambda t, g: _base((40, 1, 50), t, g).expand(40, 30, 50).permute(2, 1, 0),
    "size_one": lambda t, g: _base((20, 1, 300), t, g).permute(2, 1, 0),
    "five_dims": lambda t, g: _base((4, 5, 6, 7, 8), t, g).permute(4, 2, 0, 3, 1),
}


@native
@pytest.mark.parametrize(
    "dtype", [F32, F64, torch.int32, torch.int64], ids=["f32", "f64", "i32", "i64"]
)
@pytest.mark.parametrize("view", list(COPY_VIEWS))
def test_native_copy_equals_contiguous_bitwise(view: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    x = COPY_VIEWS[view](dtype, g)
    assert not x.is_contiguous()
    bits = {4: torch.int32, 8: torch.int64}[x.element_size()]
    memory = x._base.clone() if x._base is not None else None
    threads = torch.get_num_threads()
    lib = N.library()
    assert lib is not None
    want = x.contiguous()
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            # The loop itself, and dense(), which takes it or torch's copy by the view
            for got in (N._copy(lib, x), N.dense(x)):
                assert got.is_contiguous() and got.shape == x.shape and got.dtype == dtype
                assert torch.equal(got.view(bits), want.view(bits))
        finally:
            torch.set_num_threads(threads)
    if memory is not None:  # the input untouched
        assert torch.equal(x._base.view(bits), memory.view(bits))
    contiguous = torch.arange(10000).to(dtype)
    assert N.dense(contiguous) is contiguous


def test_dense_takes_the_loop_for_short_innermost_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native loop for short innermost runs (the POP operand), torch's copy for long
    ones (a transpose); both exact."""
    calls: list[tuple[int, ...]] = []
    copy = N._copy
    monkeypatch.setattr(N, "_copy", lambda lib, x: calls.append(tuple(x.shape)) or copy(lib, x))
    g = torch.Generator().manual_seed(2)
    pop = _base((6, 16, 16, 2, 3, 2, 3), F32, g)[:, :-1, :-1].permute(0, 6, 2, 5, 1, 3, 4)
    assert pop.numel() >= N._COPY_MIN
    transposed = torch.randn((300, 200), generator=g).t()
    assert N._innermost(pop.shape, pop.stride()) == 6
    assert N._innermost(transposed.shape, transposed.stride()) == 300
    for x in (pop, transposed):  # (bits: the POP operand holds a NaN)
        assert torch.equal(N.dense(x).view(torch.int32), x.contiguous().view(torch.int32))
    if N.library() is not None:
        assert calls == [tuple(pop.shape)]


# Steps whose argmax unravels by a table, with a linear argmax laid out as the native
# kernel leaves it (its output's permute undone as a view) or not.
UNRAVEL_CASES = {
    # (2 summed indices, the argmax a permuted view: the REPL step's layout)
    "two_permuted": ("bsz", (4, 7, 3, 5, 2, 3), lambda x: x.permute(0, 3, 4, 5, 1, 2)),
    "three_contiguous": ("abc", (6, 40, 3), lambda x: x),
    "sliced": ("ab", (9, 8, 70), lambda x: x[:, ::2, 1:-1]),
    "one_cell": ("ab", (), lambda x: x.reshape(1)),
    "empty": ("ab", (0, 3), lambda x: x),
}


@native
@pytest.mark.parametrize("case", list(UNRAVEL_CASES))
def test_native_unravel_equals_coordinates(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native loop's coordinates of every linear argmax, in any layout, are the
    row-major coordinates over the step's summed indices (integer division, in Python)."""
    summed, shape, view = UNRAVEL_CASES[case]
    sizes = {"a": 3, "b": 4, "c": 2, "s": 3, "z": 5}
    # A step summing ``summed`` of an operand that also has the output index o.
    eq = f"o{summed},{summed}->o"
    own = [sizes[c] for c in summed]
    step = func.plan(eq, torch.zeros([2, *own]), torch.zeros(own)).steps[0]
    terms = math.prod(sizes[c] for c in summed)
    assert K.small_terms(step) and step.terms == terms
    g = torch.Generator().manual_seed(3)
    linear = view(torch.randint(0, terms, shape, generator=g))
    want = torch.empty((*linear.shape, len(summed)), dtype=torch.int64)
    for cell, v in zip(itertools.product(*map(range, linear.shape)), linear.flatten().tolist()):
        for d, c in reversed(list(enumerate(summed))):
            want[cell + (d,)] = v % sizes[c]
            v //= sizes[c]
    memory = linear.clone()
    threads = torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            with monkeypatch.context() as m:  # the native loop itself, not its fallback
                m.setattr(K, "unravel", lambda *args: pytest.fail("fell back to torch"))
                got = N.unravel(step, linear)
        finally:
            torch.set_num_threads(threads)
        assert got.is_contiguous()
        assert got.shape == want.shape and torch.equal(got, want)
        assert torch.equal(K.unravel(step, linear.contiguous()), want)
    assert torch.equal(linear, memory)


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_all_finite_matches_isfinite(dtype: torch.dtype) -> None:
    """The native finiteness check against torch.isfinite: each special value alone, at
    every position of a vector longer than a vector register, and non-contiguous views
    (torch's fallback)."""
    info = torch.finfo(dtype)
    plain = [0.0, -0.0, 1.5, info.max, -info.max, info.tiny, info.tiny / 4, -info.tiny / 8]
    specials = [math.inf, -math.inf, math.nan]
    for n in (1, 7, 37):
        for at in range(n):
            for value in plain + specials:
                x = torch.full((n,), 0.25, dtype=dtype)
                x[at] = value
                assert N.all_finite(x) == bool(torch.isfinite(x).all()), (n, at, value)
    empty = torch.empty(0, dtype=dtype)
    assert N.all_finite(empty)
    base = torch.zeros(6, 8, dtype=dtype)
    base[1, 0] = math.nan
    view = base[:, 1:].t()  # (the NaN outside the view)
    assert not view.is_contiguous() and N.all_finite(view)
    assert not N.all_finite(base.t())


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_certified_dead_matches_the_torch_test(dtype: torch.dtype) -> None:
    """The log BLAS route's native certificate (every cell of log S above the bound or
    dead) against the same test in torch, on random cells below the bound, NaN, -inf,
    row maxima of -inf, +inf and NaN, a permuted log S and broadcast maxima."""
    g = torch.Generator().manual_seed(9)
    bound = -40.0
    special = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)

    def sprinkle(x: Tensor, count: int, values: Tensor) -> Tensor:
        flat = x.reshape(-1).clone()
        at = torch.randint(0, flat.numel(), (count,), generator=g)
        flat[at] = values[torch.randint(0, len(values), (count,), generator=g)]
        return flat.view(x.shape)

    verdicts = set()
    for trial in range(200):
        ma = sprinkle(torch.randn(3, 5, 1, 4, generator=g, dtype=dtype), trial % 4, special)
        mb = sprinkle(torch.randn(3, 1, 6, 1, generator=g, dtype=dtype), trial % 3, special)
        ls = torch.rand(3, 5, 6, 4, generator=g, dtype=dtype) * 10 - 5
        dead = torch.isneginf(ma + mb)
        ls = torch.where(dead, -math.inf, ls)  # what a dead cell holds
        low = torch.tensor([bound * 2, math.nan, -math.inf], dtype=dtype)
        ls = sprinkle(ls, trial % 3, low)
        if trial % 2:  # log S in a permuted layout
            ls = ls.permute(3, 0, 2, 1).contiguous().permute(1, 3, 2, 0)
        want = bool(torch.where(torch.isneginf(ma + mb), math.inf, ls).amin() >= bound)
        assert N.certified_dead(ls, ma, mb, bound) == want, trial
        verdicts.add(want)
    assert verdicts == {True, False}
    zeros = torch.zeros(1, 1, dtype=dtype)
    assert N.certified_dead(torch.empty(0, 3, dtype=dtype), zeros, zeros, bound)
    assert (
        N.certified_dead(
            torch.empty(0, 3, dtype=dtype), zeros.float().double(), zeros.half(), bound
        )
        is None
    )


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_regrouped_operand_matches_the_oracle(dtype: torch.dtype, taken: list[bool]) -> None:
    """The POP step on its sliced operand: every group of the regrouping copy is several
    indices, with the output permuted back (the native copy loop on both)."""
    g = torch.Generator().manual_seed(13)
    gamma = (_sliced_permuted(g) * 2**10).round().to(dtype) / 2**10
    gamma[:, :, :, 0] = -math.inf  # a dead half, as the stack's triangle has
    popped = _exact((3, 5, 2, 3, 2), dtype, g)
    assert _kernels("bikqxty,bktyr->biqxry", gamma, popped) == ["tropical"]
    _check_against_oracle("bikqxty,bktyr->biqxry", [gamma, popped])
    assert all(taken)


# --------------------------------------------------------------------- ties
TIE_CASES = {
    "one_summed": ("bij,bjk->bik", [(3, 5, 20), (3, 20, 70)]),
    "two_summed": ("ijkl,klm->ijm", [(3, 5, 3, 4), (3, 4, 66)]),
    "swapped": ("ik,kj->ji", [(6, 12), (12, 5)]),
}


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", list(TIE_CASES))
def test_ties_go_to_the_first_maximiser(
    case: str, dtype: torch.dtype, taken: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    eq, shapes = TIE_CASES[case]
    g = torch.Generator().manual_seed(13)
    xs = [_ties(s, dtype, g) for s in shapes]
    assert _kernels(eq, *xs) == ["tropical"]
    values, argmax = func.viterbi_einsum(eq, *xs)
    want_values, want_argmax = brute_viterbi(eq, *[x.double() for x in xs])
    _assert_same(values, want_values)
    assert torch.equal(argmax, want_argmax)
    assert (_maximisers(eq, xs) > 1).float().mean() > 0.2  # the inputs do have many ties
    pure = _pure_torch(monkeypatch, lambda: func.viterbi_einsum(eq, *xs))
    assert isinstance(pure, tuple)
    _assert_same(values, pure[0])
    assert torch.equal(argmax, pure[1])
    assert taken and all(taken)


# ----------------------------------------------------------- NaN and infinities
def _special(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``bij,bjk->bik`` operands (2, 5, 8) and (2, 8, 70) with NaN, -inf and +inf."""
    g = torch.Generator().manual_seed(14)
    a, b = _exact((2, 5, 8), dtype, g), _exact((2, 8, 70), dtype, g)
    a[0, 1, 3] = a[0, 1, 6] = math.nan  # a row of NaN cells: the first NaN term (3)
    b[0, 2, 10] = math.nan  # a NaN column: term 2 (before row 1's NaN at 3)
    a[1, 2, 0] = 2048.0  # a larger finite value, then a NaN (4), then another (6)
    a[1, 2, 4] = math.nan
    b[1, 6, 5] = math.nan
    b[1, 3, 66] = math.nan  # a NaN in the second column tile
    a[1, 0, :] = -math.inf  # a whole row of -inf: -inf cells, argmax 0
    b[0, :, 20] = -math.inf  # a whole column of -inf (NaN where row 1's NaN meets it)
    a[0, 3, 5] = a[0, 3, 7] = math.inf  # +inf terms: the first one (5) ...
    b[0, 5, 30] = -math.inf  # ... but +inf + -inf is a NaN term, which wins over term 7
    a[1, 4, :5] = -math.inf  # a partly -inf row
    return a, b


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_nan_and_infinities(
    dtype: torch.dtype, taken: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    eq = "bij,bjk->bik"
    a, b = _special(dtype)
    assert _kernels(eq, a, b) == ["tropical"]
    values, argmax = func.viterbi_einsum(eq, a, b)
    maxed, mined = func.max_einsum(eq, a, b), func.min_einsum(eq, -a, -b)
    want_values, want_argmax = brute_viterbi(eq, a.double(), b.double())
    _assert_same(values, want_values)
    assert torch.equal(argmax, want_argmax)
    _assert_same(maxed, want_values)
    _assert_same(mined, brute("min", eq, -a.double(), -b.double()))
    # the cases the inputs were built for, spelled out
    j = argmax[..., 0]
    assert values[0, 1].isnan().all() and (j[0, 1, :10] == 3).all() and j[0, 1, 10] == 2
    assert values[:, :, 10][0].isnan().all() and (j[0, [0, 2, 3, 4], 10] == 2).all()
    assert values[1, 2].isnan().all() and (j[1, 2, :66] == 4).all() and j[1, 2, 66] == 3
    assert values[1, :, 66].isnan().all() and j[1, 1, 66] == 3
    keep = [c for c in range(70) if c not in (5, 66)]  # (batch 1's NaN columns)
    assert torch.isneginf(values[1, 0, keep]).all() and (j[1, 0, keep] == 0).all()
    assert torch.isneginf(values[0, [0, 2, 4], 20]).all() and (j[0, [0, 2, 4], 20] == 0).all()
    assert values[0, 3, 30].isnan() and j[0, 3, 30] == 5
    assert torch.isposinf(values[0, 3, 31]) and j[0, 3, 31] == 5
    # the pure-torch kernels agree bitwise
    pure = _pure_torch(
        monkeypatch,
        lambda: (
            func.viterbi_einsum(eq, a, b),
            func.max_einsum(eq, a, b),
            func.min_einsum(eq, -a, -b),
        ),
    )
    assert isinstance(pure, tuple)
    (pure_values, pure_argmax), pure_max, pure_min = pure
    _assert_same(values, pure_values)
    assert torch.equal(argmax, pure_argmax)
    _assert_same(maxed, pure_max)
    _assert_same(mined, pure_min)
    assert len(taken) == 3 and all(taken)


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_gradients_with_nan_and_infinities(
    dtype: torch.dtype, taken: list[bool], vjp_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each cell's cotangent goes to its argmax term: the first NaN, the first +inf, term 0
    # of an all -inf cell.
    eq = "bij,bjk->bik"
    a, b = _special(dtype)

    def grads() -> tuple[Tensor, ...]:
        leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
        func.max_einsum(eq, *leaves).sum().backward()
        return tuple(leaf.grad for leaf in leaves)  # type: ignore[misc]

    got = grads()
    want = _one_hot(a, b, "max")
    for gr, w in zip(got, want):
        _assert_same(gr, w)
    pure = _pure_torch(monkeypatch, grads)
    assert isinstance(pure, tuple)
    for gr, pg in zip(got, pure):
        _assert_same(gr, pg)
    assert taken and all(taken)
    assert vjp_calls == [] or vjp_calls[0] >= 1


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_nan_and_infinities_with_two_summed_indices(dtype: torch.dtype, taken: list[bool]) -> None:
    # Linear argmax over (k, l) in row-major order; NaN and -inf rows
    g = torch.Generator().manual_seed(15)
    a, b = _exact((3, 4, 3, 5), dtype, g), _exact((3, 5, 66), dtype, g)
    a[0, 1, 2, 1] = a[0, 1, 0, 4] = math.nan  # first NaN in row-major order: (0, 4)
    a[1, 2] = -math.inf
    a[2, 3, 1, 2] = math.inf
    b[1, 2, 65] = -math.inf
    eq = "ijkl,klm->ijm"
    assert _kernels(eq, a, b) == ["tropical"]
    values, argmax = func.viterbi_einsum(eq, a, b)
    want_values, want_argmax = brute_viterbi(eq, a.double(), b.double())
    _assert_same(values, want_values)
    assert torch.equal(argmax, want_argmax)
    assert argmax[0, 1, 0].tolist() == [0, 4]
    assert torch.isneginf(values[1, 2]).all() and not argmax[1, 2].any()
    assert values[2, 3, 65].isnan() and argmax[2, 3, 65].tolist() == [1, 2]
    assert all(taken)


# ---------------------------------------------------------- half precision
@native
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype, taken: list[bool]) -> None:
    g = torch.Generator().manual_seed(16)
    # values exact in both half formats (8 significant bits at most), sums too
    a = (torch.randint(-64, 64, (2, 5, 9), generator=g) / 4).to(dtype)
    b = (torch.randint(-64, 64, (2, 9, 70), generator=g) / 4).to(dtype)
    a[0, 1, 2] = math.nan
    b[1, :, 3] = -math.inf
    eq = "bij,bjk->bik"
    values, argmax = func.viterbi_einsum(eq, a, b)
    maxed, mined = func.max_einsum(eq, a, b), func.min_einsum(eq, a, b)
    assert values.dtype == maxed.dtype == mined.dtype == dtype
    up = [a.float(), b.float()]
    assert _kernels(eq, *up) == ["tropical"]
    want_values, want_argmax = func.viterbi_einsum(eq, *up)
    _assert_same(values, want_values.to(dtype))
    assert torch.equal(argmax, want_argmax)
    _assert_same(maxed, func.max_einsum(eq, *up).to(dtype))
    _assert_same(mined, func.min_einsum(eq, *up).to(dtype))
    oracle_values, oracle_argmax = brute_viterbi(eq, a.double(), b.double())
    _assert_same(values, oracle_values)
    assert torch.equal(argmax, oracle_argmax)
    _assert_same(mined, brute("min", eq, a.double(), b.double()))
    assert taken and all(taken)


# --------------------------------------------------------------- gradients
def _one_hot(a: Tensor, b: Tensor, semiring: str) -> tuple[Tensor, Tensor]:
    """Gradients of ``max/min_k a[b, i, k] + b[b, k, j]`` summed: one per cell, to its argmax."""
    sign = 1.0 if semiring == "max" else -1.0
    _, arg = brute_viterbi("bij,bjk->bik", sign * a.double(), sign * b.double())
    k = arg[..., 0]
    bi, ii, jj = torch.meshgrid(*[torch.arange(n) for n in k.shape], indexing="ij")
    ones = torch.ones(k.shape, dtype=F64)
    ga = torch.zeros(a.shape, dtype=F64).index_put_((bi, ii, k), ones, accumulate=True)
    gb = torch.zeros(b.shape, dtype=F64).index_put_((bi, k, jj), ones, accumulate=True)
    return ga, gb


def _tie_free(a: Tensor, b: Tensor) -> bool:
    terms = a.double()[..., :, :, None] + b.double()[..., None, :, :]
    for top in (terms.amax(-2, keepdim=True), terms.amin(-2, keepdim=True)):
        if ((terms == top).sum(-2) != 1).any():
            return False
    return True


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("semiring", ["max", "min"])
@pytest.mark.parametrize("case", ["batched", "matmul", "swapped"])
def test_gradients_go_to_the_argmax(
    case: str,
    semiring: str,
    dtype: torch.dtype,
    taken: list[bool],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = torch.Generator().manual_seed(17)
    a, b = _exact((3, 5, 9), dtype, g), _exact((3, 9, 66), dtype, g)
    assert _tie_free(a, b)
    want = _one_hot(a, b, semiring)
    fn = func.max_einsum if semiring == "max" else func.min_einsum
    if case == "batched":
        eq, xs, order = "bij,bjk->bik", [a, b], [0, 1]
    elif case == "matmul":
        eq, xs, order = "ij,jk->ik", [a[1], b[1]], [0, 1]
        want = (want[0][1], want[1][1])
    else:  # the operands the other way round: columns from the left one
        eq, xs, order = "bkj,bik->bij", [b, a], [1, 0]
    assert _kernels(eq, *xs) == ["tropical"]

    def grads() -> tuple[Tensor, ...]:
        leaves = [x.clone().requires_grad_() for x in xs]
        out = fn(eq, *leaves)
        out.sum().backward()
        return (out.detach(), *[leaf.grad for leaf in leaves])  # type: ignore[misc]

    out, *got = grads()
    _assert_same(out, brute(semiring, eq, *[x.double() for x in xs]))
    for gr, i in zip(got, order):
        assert gr.dtype == dtype
        _assert_same(gr, want[i])
    pure = _pure_torch(monkeypatch, grads)
    assert isinstance(pure, tuple)
    for gr, pg in zip(got, pure[1:]):
        _assert_same(gr, pg)
    assert taken and all(taken)


GRAD_CASES = {
    "batch1_left": ("bij,bjk->bik", [(1, 3, 9), (5, 9, 66)]),
    "batch1_right": ("bij,bjk->bik", [(5, 3, 9), (1, 9, 66)]),
    "right_broadcast": ("bij,jk->bik", [(3, 5, 6), (6, 3)]),
    "transposed_out": ("ik,kj->ji", [(5, 9), (9, 67)]),
    "permuted_out": ("bij,bjk->kib", [(2, 5, 6), (2, 6, 3)]),
    "two_summed": ("ijkl,klm->ijm", [(2, 3, 4, 5), (4, 5, 70)]),
    "two_summed_reversed": ("ijlk,klm->ijm", [(2, 3, 4, 5), (5, 4, 7)]),
    "dot": ("ij,ij->", [(3, 5), (3, 5)]),
    "threads": ("bij,bjk->bik", [(4, 64, 64), (4, 64, 66)]),
}


def _oracle_grads(semiring: str, eq: str, xs: list[Tensor], cot: Tensor) -> list[Tensor]:
    """The oracle's gradients (float64): one-hot on tie-free inputs."""
    leaves = [x.detach().double().requires_grad_() for x in xs]
    return list(torch.autograd.grad(brute(semiring, eq, *leaves), leaves, cot.double()))


@native
@pytest.mark.parametrize("semiring", ["max", "min"])
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_over_layouts(
    case: str,
    semiring: str,
    taken: list[bool],
    vjp_calls: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eq, shapes = GRAD_CASES[case]
    g = torch.Generator().manual_seed(24)
    dtype = F64 if semiring == "max" else F32
    xs = [_exact(s, dtype, g) for s in shapes]
    sign = 1.0 if semiring == "max" else -1.0
    assert (_maximisers(eq, [sign * x for x in xs]) == 1).all()  # tie-free
    assert _kernels(eq, *xs) == ["tropical"]
    fn = func.max_einsum if semiring == "max" else func.min_einsum
    shape = brute(semiring, eq, *[x.double() for x in xs]).shape
    cot = (torch.randint(1, 8, shape, generator=g) / 4).to(dtype)  # a cotangent, not all ones

    def grads() -> list[Tensor]:
        leaves = [x.clone().requires_grad_() for x in xs]
        out = fn(eq, *leaves)
        return list(torch.autograd.grad(out, leaves, cot))

    got = grads()
    for gr, want, x in zip(got, _oracle_grads(semiring, eq, xs, cot), xs):
        assert gr.dtype == dtype and gr.shape == x.shape
        _assert_same(gr, want)
    pure = _pure_torch(monkeypatch, grads)
    assert isinstance(pure, list)
    for gr, pg in zip(got, pure):
        _assert_same(gr, pg)
    assert taken and all(taken)
    assert vjp_calls == [] or vjp_calls[0] >= 1


@native
def test_gradients_of_non_contiguous_inputs(taken: list[bool], vjp_calls: list[int]) -> None:
    g = torch.Generator().manual_seed(25)
    a = _exact((3, 10, 5), F32, g).transpose(1, 2)[:, ::2]  # (3, 3, 10)
    b = _exact((3, 140, 10), F32, g).transpose(1, 2)[..., 1::2]  # (3, 10, 70)
    a.requires_grad_()
    b.requires_grad_()
    eq = "bij,bjk->bik"
    assert (_maximisers(eq, [a.detach(), b.detach()]) == 1).all()
    out = func.max_einsum(eq, a, b)
    out.sum().backward()
    want = _one_hot(a.detach(), b.detach(), "max")
    _assert_same(a.grad, want[0])  # type: ignore[arg-type]
    _assert_same(b.grad, want[1])  # type: ignore[arg-type]
    assert taken and all(taken)
    assert vjp_calls == [] or vjp_calls[0] >= 1


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_threads_split_the_backward_exactly(dtype: torch.dtype, taken: list[bool]) -> None:
    # Ties: the gradient must go to the first maximiser whichever thread does the work.
    g = torch.Generator().manual_seed(26)
    a, b = _ties((4, 64, 64), dtype, g), _ties((4, 64, 70), dtype, g)
    cot = (torch.randint(1, 8, (4, 64, 70), generator=g) / 4).to(dtype)
    eq = "bij,bjk->bik"
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
            out = func.max_einsum(eq, *leaves)
            results.append(torch.autograd.grad(out, leaves, cot))
    finally:
        torch.set_num_threads(old)
    _, arg = brute_viterbi(eq, a.double(), b.double())
    k = arg[..., 0]
    bi, ii, jj = torch.meshgrid(*[torch.arange(n) for n in k.shape], indexing="ij")
    c64 = cot.double()
    ga = torch.zeros(a.shape, dtype=F64).index_put_((bi, ii, k), c64, accumulate=True)
    gb = torch.zeros(b.shape, dtype=F64).index_put_((bi, k, jj), c64, accumulate=True)
    for got_a, got_b in results:
        _assert_same(got_a, ga)
        _assert_same(got_b, gb)
    assert all(taken)


@native
def test_vmap_equals_a_loop(taken: list[bool]) -> None:
    g = torch.Generator().manual_seed(18)
    a, b = _exact((4, 5, 9), F32, g), _exact((4, 9, 66), F32, g)
    a[1, 2, 3] = math.nan
    b[2, :, 7] = -math.inf
    eq = "ij,jk->ik"
    got = torch.func.vmap(lambda x, y: func.max_einsum(eq, x, y))(a, b)
    loop = torch.stack([func.max_einsum(eq, x, y) for x, y in zip(a, b)])
    _assert_same(got, loop)
    _assert_same(got, brute("max", "bij,bjk->bik", a.double(), b.double()))
    values, argmax = torch.func.vmap(lambda x, y: func.viterbi_einsum(eq, x, y))(a, b)
    want_values, want_argmax = brute_viterbi("bij,bjk->bik", a.double(), b.double())
    _assert_same(values, want_values)
    assert torch.equal(argmax, want_argmax)
    # one operand batched, the other shared
    got = torch.func.vmap(lambda x: func.max_einsum(eq, x, b[0]))(a)
    _assert_same(got, torch.stack([func.max_einsum(eq, x, b[0]) for x in a]))
    _assert_same(got, brute("max", "bij,jk->bik", a.double(), b[0].double()))
    # gradients under vmap (per-sample gradients), tie-free inputs
    c, d = _exact((4, 5, 9), F32, g), _exact((9, 66), F32, g)
    assert _tie_free(c, d.expand(4, 9, 66))
    grads = torch.func.vmap(
        torch.func.grad(lambda x: func.max_einsum(eq, x, d).sum()),
    )(c)
    want, _ = _one_hot(c, d.expand(4, 9, 66), "max")
    _assert_same(grads, want)
    assert taken and all(taken)


@native
def test_compiled_viterbi_equals_eager(taken: list[bool]) -> None:
    g = torch.Generator().manual_seed(19)
    a, b = _ties((2, 5, 9), F32, g), _ties((2, 9, 66), F32, g)
    a[0, 1, 4] = math.nan
    b[1, :, 3] = -math.inf

    def fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return func.viterbi_einsum("bij,bjk->bik", x, y)

    torch._dynamo.reset()
    try:
        values, argmax = torch.compile(fn, fullgraph=True)(a, b)
    finally:
        torch._dynamo.reset()
    compiled_calls = len(taken)
    eager_values, eager_argmax = fn(a, b)
    _assert_same(values, eager_values)
    assert torch.equal(argmax, eager_argmax)
    want_values, want_argmax = brute_viterbi("bij,bjk->bik", a.double(), b.double())
    _assert_same(values, want_values)
    assert torch.equal(argmax, want_argmax)
    assert compiled_calls >= 1 and all(taken)


# ----------------------------------------------------------------- purity
@native
@pytest.mark.parametrize(
    "eq,shapes",
    [
        ("bij,bjk->bik", [(2, 5, 9), (2, 9, 6)]),
        ("bkj,bik->bij", [(2, 9, 6), (2, 5, 9)]),
        ("bij,bjk->kib", [(2, 5, 9), (2, 9, 6)]),
    ],
    ids=["plain", "swapped", "permuted"],
)
def test_inputs_untouched_and_outputs_fresh(
    eq: str, shapes: list[tuple[int, ...]], taken: list[bool]
) -> None:
    g = torch.Generator().manual_seed(20)
    a, b = (_exact(s, F32, g) for s in shapes)
    a0, b0 = a.clone(), b.clone()
    xs = [a.requires_grad_(), b.requires_grad_()]
    assert _kernels(eq, *xs) == ["tropical"]
    want = brute("max", eq, a0.double(), b0.double())
    out = func.max_einsum(eq, *xs)
    values, argmax = func.viterbi_einsum(eq, *xs)
    plain = func.max_einsum(eq, a0, b0)  # values only, no gradient
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)
    storages = {x.untyped_storage().data_ptr() for x in (a, b)}
    for t in (out, values, argmax, plain):
        assert t.untyped_storage().data_ptr() not in storages
    _assert_same(out, want)
    out.add_(1)  # an output of a differentiable call, changed in place
    values.add_(1)
    argmax.add_(1)
    plain.add_(1)
    _assert_same(out, want + 1)
    _assert_same(plain, want + 1)
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)
    again = func.max_einsum(eq, a0, b0)
    _assert_same(again, want)
    assert taken and all(taken)


# ----------------------------------------------------------------- threads
@native
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_threads_split_the_work_exactly(dtype: torch.dtype, taken: list[bool]) -> None:
    g = torch.Generator().manual_seed(21)
    a, b = _ties((8, 64, 64), dtype, g), _exact((8, 64, 130), dtype, g)
    b[..., ::3] = b[..., ::3].round()  # ties among some columns' terms too
    a[2, 5, 7] = math.nan
    assert 4 * 64 * 64 * 70 >= N.PARALLEL_MIN_TERMS
    eq = "bij,bjk->bik"
    assert _kernels(eq, a, b) == ["tropical"]
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, max(old, 4)) * 3:  # a few times: races show only now and then
            torch.set_num_threads(n)
            results.append((func.viterbi_einsum(eq, a, b), func.max_einsum(eq, a, b)))
    finally:
        torch.set_num_threads(old)
    (one_values, one_argmax), _ = results[0]
    for (values, argmax), maxed in results:
        _assert_same(values, one_values)
        assert torch.equal(argmax, one_argmax)
        _assert_same(maxed, one_values)
    want_values, want_argmax = brute_viterbi(eq, a.double(), b.double())
    _assert_same(one_values, want_values)
    assert torch.equal(one_argmax, want_argmax)
    assert all(taken)


# ------------------------------------------------- fallback (run everywhere)
def _oracle_check(eq: str = "bij,bjk->bik") -> None:
    g = torch.Generator().manual_seed(22)
    a, b = _ties((2, 5, 9), F32, g), _exact((2, 9, 66), F32, g)
    a[0, 1, 2] = math.nan
    assert _kernels(eq, a, b) != ["tropical"]
    values, argmax = func.viterbi_einsum(eq, a, b)
    want_values, want_argmax = brute_viterbi(eq, a.double(), b.double())
    _assert_same(values, want_values)
    assert torch.equal(argmax, want_argmax)
    _assert_same(func.max_einsum(eq, a, b), want_values)
    _assert_same(func.min_einsum(eq, a, b), brute("min", eq, a.double(), b.double()))


def test_disabled_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, fresh: None, taken: list[bool]
) -> None:
    monkeypatch.setenv("SEMIRING_EINSUM_NATIVE", "0")
    func.clear_caches()
    assert func.native_status() == "pure torch: disabled by SEMIRING_EINSUM_NATIVE=0"
    _oracle_check()
    assert not any(taken)


def test_no_compiler_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh: None, taken: list[bool]
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.delenv("SEMIRING_EINSUM_REQUIRE_NATIVE", raising=False)  # (CI sets it)
    monkeypatch.delenv("SEMIRING_EINSUM_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SEMIRING_EINSUM_CACHE", str(cache))
    monkeypatch.setenv("PATH", str(empty))
    func.clear_caches()
    status = func.native_status()
    assert status.startswith("pure torch:")
    if LINUX:
        assert status == "pure torch: no C compiler found (cc, gcc, clang or $CC)"
    assert not cache.exists()
    _oracle_check()
    assert not any(taken)


def _failing_cc(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cc = bin_dir / "cc"
    cc.write_text("#!/bin/sh\nexit 1\n")
    cc.chmod(cc.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return cc


def test_failing_compiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh: None, taken: list[bool]
) -> None:
    cc = _failing_cc(tmp_path)
    bin_dir = cc.parent
    cache = tmp_path / "cache"
    monkeypatch.delenv("SEMIRING_EINSUM_REQUIRE_NATIVE", raising=False)  # (CI sets it)
    monkeypatch.delenv("SEMIRING_EINSUM_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("SEMIRING_EINSUM_CACHE", str(cache))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    func.clear_caches()
    status = func.native_status()
    assert status.startswith("pure torch:")
    if LINUX:
        assert status.startswith("pure torch: build or load failed")
        # no library, no temporary left behind (only the build's lock)
        assert [p.suffix for p in cache.rglob("*")] == [".lock"]
    _oracle_check()
    assert not any(taken)


@native
def test_a_fresh_build_lands_one_library(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh: None, taken: list[bool]
) -> None:
    monkeypatch.setenv("SEMIRING_EINSUM_CACHE", str(tmp_path))
    func.clear_caches()
    status = func.native_status()
    assert status.startswith(f"native: loaded {tmp_path}{os.sep}tropical-")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("tropical-") and files[0].endswith(".so")
    assert files[1] == files[0] + ".lock"  # (the build's lock, kept for the next process)
    built = tmp_path / files[0]
    mtime = built.stat().st_mtime_ns
    g = torch.Generator().manual_seed(23)
    a, b = _ties((2, 5, 9), F64, g), _exact((2, 9, 66), F64, g)
    eq = "bij,bjk->bik"
    assert _kernels(eq, a, b) == ["tropical"]
    _check_against_oracle(eq, [a, b])
    # loaded again from the cache, not rebuilt
    func.clear_caches()
    assert func.native_status() == status
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    assert built.stat().st_mtime_ns == mtime
    _check_against_oracle(eq, [a, b])
    assert taken and all(taken)


@native
def test_a_compiler_that_refuses_the_cpu_flags_builds_with_portable_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh: None, taken: list[bool]
) -> None:
    real = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    assert real is not None  # the kernel is native here, so some compiler exists
    picky = tmp_path / "picky-cc"
    log = tmp_path / "calls.log"
    picky.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'for a in "$@"; do case "$a" in -march=native|-mprefer-vector-width=512)\n'
        '  echo "unsupported: $a" >&2; exit 1;; esac; done\n'
        f'exec {real} "$@"\n'
    )
    picky.chmod(picky.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(picky))
    monkeypatch.setenv("SEMIRING_EINSUM_CACHE", str(tmp_path / "cache"))
    func.clear_caches()
    assert func.native_status().startswith("native: loaded")
    builds = [line for line in log.read_text().splitlines() if "-shared" in line]
    assert len(builds) == 3  # refused twice, then built without the CPU-specific flags
    assert "-march" not in builds[-1] and "-fopenmp" in builds[-1]
    g = torch.Generator().manual_seed(29)
    a, b = _ties((2, 5, 9), F32, g), _exact((2, 9, 130), F32, g)
    _check_against_oracle("bij,bjk->bik", [a, b])
    assert taken and all(taken)


# ------------------------------------------------- where the library is built, and trusted
@native
def test_the_key_holds_what_march_native_resolves_to() -> None:
    """The cache key's compiler part: stable (no temporary file names) and resolved
    (GCC's -march=<cpu>, clang's -target-cpu), not the word "native"."""
    cc = N._compiler()
    assert cc is not None
    target = N._target(cc)
    assert target == N._target(cc)
    words = target.split()
    assert "-march=native" not in words
    assert any(w.startswith("-march=") for w in words) or "-target-cpu" in target


def test_the_cpu_key_reads_arm_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """On ARM, /proc/cpuinfo has no "model name" or "flags": the implementer, part and
    features tell two CPUs apart (their libraries differ under -march=native)."""
    arm = (
        "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd {}\n"
        "CPU implementer\t: 0x41\nCPU part\t: {}\n"
    )
    read = Path.read_text
    keys = []
    for features, part in (("sve", "0xd40"), ("sve sve2", "0xd4f"), ("sve", "0xd4f")):

        def fake(self: Path, *args: object, text: str = arm.format(features, part)) -> str:
            return text if str(self) == "/proc/cpuinfo" else read(self, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(Path, "read_text", fake)
        keys.append(N._cpu())
    assert len(set(keys)) == 3 and all("CPU part" in k and "Features" in k for k in keys)


def _loaded_elsewhere(cache: Path) -> None:
    """The library loaded from a private temporary directory, not from ``cache``, with one
    warning naming why; its results still the oracle's."""
    with pytest.warns(RuntimeWarning, match="private temporary directory") as caught:
        status = func.native_status()
    assert len(caught) == 1
    assert status.startswith("native: loaded ") and not status.startswith(f"native: loaded {cache}")
    assert Path(status.removeprefix("native: loaded ")).parent.name.startswith("semiring_einsum-")
    assert not list(cache.glob("tropical-*.so")) if cache.is_dir() else True
    g = torch.Generator().manual_seed(31)
    a, b = _ties((2, 5, 9), F32, g), _exact((2, 9, 66), F32, g)
    _check_against_oracle("bij,bjk->bik", [a, b])


def _shared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)
    return cache


def _theirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    cache = tmp_path / "theirs"
    cache.mkdir(mode=0o700)
    lstat = os.lstat

    def owned_by_another(path: object, **kwargs: object) -> os.stat_result:
        found = lstat(path, **kwargs)  # type: ignore[arg-type]
        if Path(str(path)) != cache:
            return found
        fields = list(found)
        fields[stat.ST_UID] = os.getuid() + 1
        return os.stat_result(fields)

    monkeypatch.setattr(N.os, "lstat", owned_by_another)
    return cache


def _unmakeable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    # (As a read-only home: a path under a regular file.  Root writes anywhere, so a
    # mode would not stop a test run as root.)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "cache"


UNSAFE_CACHES: dict[str, Callable[[pytest.MonkeyPatch, Path], Path]] = {
    "others_may_write": _shared,
    "another_users": _theirs,
    "cannot_be_made": _unmakeable,
}


@native
@pytest.mark.parametrize("case", list(UNSAFE_CACHES))
def test_an_unsafe_or_unwritable_cache_is_not_used(
    case: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh: None, taken: list[bool]
) -> None:
    cache = UNSAFE_CACHES[case](monkeypatch, tmp_path)
    monkeypatch.setenv("SEMIRING_EINSUM_CACHE", str(cache))
    func.clear_caches()
    _loaded_elsewhere(cache)
    assert taken and all(taken)


@native
@pytest.mark.full
def test_processes_starting_together_build_once(tmp_path: Path) -> None:
    """Three processes on an empty cache: one builds (under the lock), all load it."""
    script = (
        "from semiring_einsum.func import _native as N\n"
        "assert N.library() is not None, N.status()\n"
        "print(N._STATUS.get('built', '-'))\n"
    )
    env = {**os.environ, "SEMIRING_EINSUM_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    built = [o for o in outs if o != "-"]
    assert len(built) == 1 and built[0].startswith(str(tmp_path)), outs
    assert len(list(tmp_path.glob("tropical-*.so"))) == 1


@native
def test_float32_argmax_past_int32_takes_the_torch_kernels() -> None:
    """The float32 tiles keep the argmax as an int32: a summed extent of 2**31 terms
    (operands expanded from one element: no memory) is declined, values alone are not."""
    k = 2**31
    eq = "ij,jk->ik"
    a = torch.zeros(1, 1).expand(2, k)
    b = torch.zeros(1, 1).expand(k, 3)
    planned = func.plan(eq, a, b, semiring=func.MAX_PLUS).steps[0]
    assert planned.kernel.name != "tropical"  # the plan says so
    step = replace(planned, kernel=MAX_TROPICAL)
    assert N.layout(step) is not None
    assert N.max_plus(step, [a, b], True) is None  # and the kernel declines it anyway
    a64 = torch.zeros(1, 1, dtype=F64).expand(2, k)
    b64 = torch.zeros(1, 1, dtype=F64).expand(k, 3)
    assert func.plan(eq, a64, b64, semiring=func.MAX_PLUS).steps[0].kernel.name == "tropical"


def _logging_compiler(tmp_path: Path, real: str | None) -> tuple[Path, Path]:
    """A ``$CC`` that logs each call, then runs ``real`` (or fails where ``None``)."""
    cc = tmp_path / "logging-cc"
    log = tmp_path / "calls.log"
    run = f'exec {real} "$@"' if real else "exit 1"
    cc.write_text(f'#!/bin/sh\necho "$@" >> {log}\n{run}\n')
    cc.chmod(cc.stat().st_mode | stat.S_IXUSR)
    return cc, log


EQ = "bij,bjk->bik"


def _planned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, real: str | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Path, torch.Generator]:
    """Operands of :data:`EQ`, planned on the native kernel with an empty cache and a
    logging ``$CC`` (running ``real``, or failing), which planning did not call."""
    cc, log = _logging_compiler(tmp_path, real)
    monkeypatch.delenv("SEMIRING_EINSUM_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("SEMIRING_EINSUM_CACHE", str(tmp_path / "cache"))
    func.clear_caches()
    g = torch.Generator().manual_seed(37)
    a, b = _ties((2, 5, 9), dtype, g), _exact((2, 9, 7), dtype, g)
    assert [s.kernel.name for s in func.plan(EQ, a, b, semiring=func.MAX_PLUS).steps] == [
        "tropical"
    ]
    assert not log.exists()  # no compiler call, not even for its version
    return a, b, log, g


@native
def test_planning_starts_no_compiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh: None, taken: list[bool]
) -> None:
    """func.plan names the native kernel without building it; the first run builds."""
    real = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    a, b, log, _ = _planned(monkeypatch, tmp_path, real, F32)
    _check_against_oracle(EQ, [a, b])
    assert any("-shared" in line for line in log.read_text().splitlines())
    assert taken and all(taken)


@pytest.mark.skipif(not LINUX, reason="the native kernel is built on Linux only")
def test_require_native_turns_a_failed_build_into_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh: None
) -> None:
    """``SEMIRING_EINSUM_REQUIRE_NATIVE=1``: the first max-plus step raises, naming why the
    kernel cannot load (a failing compiler; no compiler at all, found while planning)."""
    monkeypatch.setenv("SEMIRING_EINSUM_REQUIRE_NATIVE", "1")
    monkeypatch.delenv("SEMIRING_EINSUM_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(_failing_cc(tmp_path)))
    monkeypatch.setenv("SEMIRING_EINSUM_CACHE", str(tmp_path / "cache"))
    func.clear_caches()
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with pytest.raises(RuntimeError, match=r"REQUIRE_NATIVE=1, but .* cannot load: build or load"):
        func.max_einsum("ij,jk->ik", a, b)
    torch.testing.assert_close(  # other semirings are not concerned
        func.log_einsum("ij,jk->ik", a, b), torch.logsumexp(a[:, :, None] + b, 1)
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(empty))
    func.clear_caches()
    with pytest.raises(RuntimeError, match="cannot load: no C compiler found"):
        func.plan("ij,jk->ik", a, b, semiring=func.MAX_PLUS)


def test_require_native_leaves_a_deliberate_native_0_alone(
    monkeypatch: pytest.MonkeyPatch, fresh: None
) -> None:
    monkeypatch.setenv("SEMIRING_EINSUM_REQUIRE_NATIVE", "1")
    monkeypatch.setenv("SEMIRING_EINSUM_NATIVE", "0")
    func.clear_caches()
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    torch.testing.assert_close(func.max_einsum("ij,jk->ik", a, b), (a[:, :, None] + b).amax(1))
    assert func.native_status() == "pure torch: disabled by SEMIRING_EINSUM_NATIVE=0"


@pytest.mark.skipif(not LINUX, reason="the native kernel is built on Linux only")
def test_a_planned_native_step_whose_build_fails_runs_the_torch_kernels(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh: None
) -> None:
    """Planned before the first build, which then fails: the forward and the backward of
    the step run the torch kernels, with the oracle's values and gradients."""
    monkeypatch.delenv("SEMIRING_EINSUM_REQUIRE_NATIVE", raising=False)  # (CI sets it)
    a, b, _, g = _planned(monkeypatch, tmp_path, None, F64)
    eq = EQ
    _check_against_oracle(eq, [a, b])
    # The backward: each cotangent goes to its cell's argmax term (the oracle's).
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    cot = torch.randn((2, 5, 7), generator=g, dtype=F64)
    gx, gy = torch.autograd.grad(func.max_einsum(eq, x, y), (x, y), cot)
    _, where = brute_viterbi(eq, a, b)
    want_x, want_y = torch.zeros_like(a), torch.zeros_like(b)
    for bb, i, k in itertools.product(range(2), range(5), range(7)):
        j = int(where[bb, i, k, 0])
        want_x[bb, i, j] += cot[bb, i, k]
        want_y[bb, j, k] += cot[bb, i, k]
    assert torch.equal(gx, want_x) and torch.equal(gy, want_y)
    assert func.native_status().startswith("pure torch: build or load failed")


def test_the_c_files_are_installed() -> None:
    """The kernel's C files ship with the package (package data), and the source hashed
    into the cache key is all of them."""
    for name in ("tropical.c", "maxplus.h", "tiles.h", "copy.h"):
        path = N.NATIVE_DIR / name
        assert path.is_file(), path
        assert path.read_text() in N.SOURCE
