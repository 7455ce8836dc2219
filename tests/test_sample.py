"""``sample_einsum``: exact samples from the log-semiring distribution of every output cell.

For each output cell the assignments of the summed indices have probability ∝ exp(term),
the terms ``log_einsum`` adds up.  Checked against the brute-force float64 oracle
(:mod:`oracle`, which enumerates every assignment):

* chi-square goodness of fit (10^4 samples per cell, seeded, p > 0.01, categories with an
  expected count under 5 merged) on a chain with an intermediate, per-cell outputs, a star,
  a batch index, ``...``, a diagonal, a CKY-like rule, -inf entries, float32, pairwise plans
  and ``optimize=False``, and budgets small enough that rows and windows are chunked (the
  window tensors are checked to stay within the budget);
* impossible assignments (a -inf term) are never drawn, exactly;
* reproducibility from a generator; shapes; all -inf and empty cells give zeros; bad
  ``num_samples``; NaN / +inf refused; inputs untouched; operands that require grad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from oracle import joint
from semiring_einsum.func import AutomaticBlockSize
from semiring_einsum.func import _native as N
from semiring_einsum.func import _sample as S
from semiring_einsum.func._sample import sample_einsum

Tensor = torch.Tensor
NINF = -math.inf
SAMPLES = 10_000


def exact(equation: str, *operands: Tensor) -> tuple[Tensor, list[int]]:
    """Probabilities of every assignment, shape (cells, N) (rows of an all -inf cell: NaN),
    and the sizes of the summed indices (row-major order of first appearance)."""
    tensors, output, summed, size = joint(equation, *operands)
    full = [size[c] for c in output + summed]
    terms = tensors[0].expand(full)
    for t in tensors[1:]:
        terms = terms + t
    terms = terms.expand(full)
    cells = math.prod(size[c] for c in output)
    n = math.prod(size[c] for c in summed)
    return torch.softmax(terms.reshape(cells, n), dim=-1), [size[c] for c in summed]


def counts_of(draws: Tensor, sizes: Sequence[int]) -> Tensor:
    """Per cell, how often each assignment was drawn: shape (cells, N)."""
    k = len(sizes)
    flat = draws.reshape(-1, draws.shape[-2], k)
    linear = torch.zeros(flat.shape[:2], dtype=torch.int64)
    for d, n in enumerate(sizes):
        assert int(flat[..., d].min()) >= 0 and int(flat[..., d].max()) < n
        linear = linear * n + flat[..., d]
    total = math.prod(sizes)
    return torch.stack([torch.bincount(row, minlength=total) for row in linear])


def chi_square(probs: Tensor, counts: Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom over all cells (merging small categories).

    Asserts that zero-probability assignments were never drawn.
    """
    stat, df = 0.0, 0
    for p, c in zip(probs, counts):
        n = int(c.sum())
        assert int(c[p == 0].sum()) == 0, "an impossible assignment was drawn"
        keep = p > 0
        expected, observed = (p[keep] * n).tolist(), c[keep].double().tolist()
        pairs = sorted(zip(expected, observed))
        merged: list[list[float]] = []
        pool = [0.0, 0.0]
        for e, o in pairs:
            if pool[0] < 5:
                pool = [pool[0] + e, pool[1] + o]
            else:
                merged.append([e, o])
        if merged and pool[0] < 5:  # the pooled small ones: join the smallest big one
            merged[0] = [merged[0][0] + pool[0], merged[0][1] + pool[1]]
        else:
            merged.append(pool)
        stat += sum((o - e) ** 2 / e for e, o in merged if e > 0)
        df += len(merged) - 1
    return stat, df


def p_value(stat: float, df: int) -> float:
    if df == 0:
        return 1.0
    a = torch.tensor(df / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(stat / 2, dtype=torch.float64)))


def operands(shapes: Sequence[Sequence[int]], seed: int, masked: float = 0.0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = []
    for shape in shapes:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if masked:
            x = x.masked_fill(torch.rand(*shape, generator=g) < masked, NINF)
        xs.append(x)
    return xs


def check_fit(
    equation: str, xs: Sequence[Tensor], seed: int = 0, samples: int = SAMPLES, **options: object
) -> float:
    probs, sizes = exact(equation, *[x.double() for x in xs])
    g = torch.Generator().manual_seed(seed)
    draws = sample_einsum(equation, *xs, num_samples=samples, generator=g, **options)  # type: ignore[arg-type]
    assert draws.dtype == torch.int64
    assert draws.shape[-2:] == (samples, len(sizes))
    live = ~torch.isnan(probs).any(-1)  # all -inf cells: checked elsewhere
    stat, df = chi_square(probs[live], counts_of(draws, sizes)[live])
    p = p_value(stat, df)
    assert p > 0.01, f"chi-square {stat:.1f} on {df} df: p = {p:.2e}"
    return p


CASES = {
    "chain": ("ab,bc,cd->", [(3, 4), (4, 3), (3, 2)]),
    "chain-per-cell": ("ab,bc,cd->a", [(2, 3), (3, 4), (4, 2)]),
    "star": ("ab,ac,ad->a", [(2, 3), (2, 4), (2, 2)]),
    "batched": ("zab,zbc->z", [(2, 3, 4), (2, 4, 3)]),
    "ellipsis": ("...ab,...b->a", [(2, 3, 4), (2, 4)]),
    "diagonal": ("ii,ij->j", [(3, 3), (3, 4)]),
    "cky": ("bsxk,bsyk,xyz->bsz", [(1, 2, 3, 2), (1, 2, 3, 2), (3, 3, 3)]),
    "broadcast": ("zab,zbc->z", [(1, 3, 4), (2, 4, 3)]),
}


@pytest.fixture(params=["joint", "marginals", "blocks", "blocks-torch"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Steps summing several indices draw them jointly, or one by one from marginal tables;
    matrix-product steps by blocks of exponentials (the default where they apply), each
    row's draw in the native kernel or in torch."""
    monkeypatch.setattr(S, "_MARGINALS_FROM", 1 << 62 if request.param == "joint" else 0)
    if not str(request.param).startswith("blocks"):
        monkeypatch.setattr(S, "_draw_blocks", lambda *args: None)
    if request.param == "blocks-torch":
        monkeypatch.setattr(N, "draw_blocks", lambda *args: None)
    return str(request.param)


@pytest.mark.parametrize("optimize", ["auto", False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fits_the_exact_distribution(case: str, optimize: object, route: str) -> None:
    equation, shapes = CASES[case]
    check_fit(equation, operands(shapes, seed=len(case)), optimize=optimize)


@pytest.mark.parametrize("optimize", ["auto", False])
@pytest.mark.parametrize("case", ["chain", "chain-per-cell", "star", "cky"])
def test_minus_inf_entries_are_never_drawn(case: str, optimize: object, route: str) -> None:
    equation, shapes = CASES[case]
    xs = operands(shapes, seed=3, masked=0.3)
    probs, _ = exact(equation, *xs)
    assert (probs == 0).any()  # the masks make some assignments impossible
    check_fit(equation, xs, optimize=optimize)


def test_float32_and_an_explicit_path() -> None:
    xs = [x.float() for x in operands([(3, 4), (4, 3), (3, 2)], seed=5, masked=0.2)]
    check_fit("ab,bc,cd->", xs)
    check_fit("ab,bc,cd->", xs, optimize=[(1, 2), (0, 1)])


def test_low_precision_runs_in_float32() -> None:
    for dtype in (torch.float16, torch.bfloat16):
        xs = [x.to(dtype) for x in operands([(2, 3), (3, 4)], seed=1)]
        draws = sample_einsum("ab,bc->a", *xs, num_samples=7)
        assert draws.shape == (2, 7, 2) and draws.dtype == torch.int64
        assert int(draws[..., 0].max()) < 3 and int(draws[..., 1].max()) < 4


@pytest.mark.parametrize(
    "block_size",
    [1, 2, AutomaticBlockSize(max_cpu_bytes=4096), AutomaticBlockSize(max_cpu_bytes=200)],
    ids=["extent-1", "extent-2", "4096-bytes", "200-bytes"],
)
@pytest.mark.parametrize("optimize", ["auto", False])
def test_chunked_windows_keep_the_distribution(
    block_size: object, optimize: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small budgets chunk the rows and window the summed indices; the fit is unchanged and
    every window of candidates (one ``torch.rand`` each) stays within the budget."""
    shapes = [(3, 4), (4, 3), (3, 2)]  # 72 assignments: split unless the budget is large
    xs = operands(shapes, seed=11, masked=0.1)
    windows: list[int] = []
    rand = torch.rand

    def spy(*args: object, **kwargs: object) -> Tensor:
        out = rand(*args, **kwargs)  # type: ignore[call-overload]
        windows.append(out.numel())
        return out

    monkeypatch.setattr(torch, "rand", spy)
    tiny = isinstance(block_size, AutomaticBlockSize) and block_size.max_cpu_bytes < 1000
    samples = 2_000 if tiny else SAMPLES  # a few rows per chunk: many Python-level chunks
    check_fit("ab,bc,cd->", xs, block_size=block_size, optimize=optimize, samples=samples)
    monkeypatch.undo()
    assert len(windows) > 3  # really chunked (more windows than steps)
    if isinstance(block_size, AutomaticBlockSize):
        assert max(windows) * 8 <= block_size.max_cpu_bytes  # float64 candidates
    else:  # every row at once, each summed index cut at the extent
        assert max(windows) <= SAMPLES * block_size**4


def test_the_marginal_route_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step summing several indices over many rows draws from marginal tables (one per
    index but the last); with a budget too small for the tables it draws jointly."""
    calls: list[str] = []
    real = S.run

    def spy(semiring: object, equation: str, *args: object) -> Tensor:
        calls.append(equation)
        return real(semiring, equation, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(S, "run", spy)
    xs = operands([(3, 4), (4, 3), (3, 2)], seed=1)
    check_fit("ab,bc,cd->", xs, optimize=False)
    assert len(calls) == 3  # a, b, c, d summed in one step: tables for three of them
    calls.clear()
    monkeypatch.setattr(S, "_MARGINALS_FROM", 0)  # many rows or not
    small = AutomaticBlockSize(max_cpu_bytes=128)  # tables d, da, dac: 26 float64 (208 B)
    sample_einsum("ab,bc,cd->", *xs, optimize=False, num_samples=20, block_size=small)
    assert not calls
    sample_einsum("ab,bc,cd->", *xs, optimize=False, num_samples=20)
    assert len(calls) == 3


@pytest.mark.parametrize("case", sorted(CASES))
def test_strided_reads_match_contiguous_ones(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Operands read through strided views (no copy) give the very same samples as
    contiguous copies; transposed inputs too."""
    equation, shapes = CASES[case]
    xs = operands(shapes, seed=9)
    # Transposed storage (same values): every operand non-contiguous.
    xs = [x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() > 1 else x for x in xs]
    for optimize in ("auto", False):
        copied = sample_einsum(
            equation,
            *xs,
            num_samples=30,
            optimize=optimize,
            generator=torch.Generator().manual_seed(1),
        )
        monkeypatch.setattr(S, "_COPY_UP_TO", 0.0)
        strided = sample_einsum(
            equation,
            *xs,
            num_samples=30,
            optimize=optimize,
            generator=torch.Generator().manual_seed(1),
        )
        monkeypatch.undo()
        assert torch.equal(copied, strided)


def test_same_generator_state_same_samples() -> None:
    xs = operands([(2, 3), (3, 4), (4, 2)], seed=2)
    one = sample_einsum(
        "ab,bc,cd->a", *xs, num_samples=50, generator=torch.Generator().manual_seed(7)
    )
    two = sample_einsum(
        "ab,bc,cd->a", *xs, num_samples=50, generator=torch.Generator().manual_seed(7)
    )
    other = sample_einsum(
        "ab,bc,cd->a", *xs, num_samples=50, generator=torch.Generator().manual_seed(8)
    )
    assert torch.equal(one, two)
    assert not torch.equal(one, other)
    torch.manual_seed(3)
    default = sample_einsum("ab,bc,cd->a", *xs, num_samples=50)
    torch.manual_seed(3)
    assert torch.equal(default, sample_einsum("ab,bc,cd->a", *xs, num_samples=50))


def test_all_minus_inf_cells_give_zeros() -> None:
    a, b, c = operands([(3, 4), (4, 3), (3, 2)], seed=4)
    a[0] = NINF  # cell 0: every term -inf
    c[:, :] = torch.tensor([[NINF, 0.0], [NINF, 0.0], [NINF, 0.0]])
    b[:, 1] = NINF
    for optimize in ("auto", False):
        draws = sample_einsum("ab,bc,cd->a", a, b, c, num_samples=200, optimize=optimize)
        assert draws.shape == (3, 200, 3)
        assert not draws[0].any()
        assert (draws[1:, :, 2] == 1).all() and (draws[1:, :, 1] != 1).all()
    # A cell that is -inf only through an intermediate (b's column meets c's -inf row).
    draws = sample_einsum("ab,bc->a", torch.zeros(2, 2), torch.tensor([[NINF], [NINF]]))
    assert not draws.any()


def test_shapes() -> None:
    a, b = operands([(2, 3), (3, 4)], seed=0)
    assert sample_einsum("ab,bc->a", a, b).shape == (2, 1, 2)
    assert sample_einsum("ab,bc->ac", a, b, num_samples=5).shape == (2, 4, 5, 1)
    assert sample_einsum("ab,bc->", a, b, num_samples=3).shape == (3, 3)
    # No summed index.
    none = sample_einsum("ab,bc->abc", a, b, num_samples=3)
    assert none.shape == (2, 3, 4, 3, 0) and none.dtype == torch.int64
    # A size-0 output dim, and a size-0 summed index (every cell an empty sum: zeros).
    assert sample_einsum("ab,bc->a", a[:0], b, num_samples=2).shape == (0, 2, 2)
    empty = sample_einsum("ab,bc->a", a[:, :0], b[:0], num_samples=2)
    assert empty.shape == (2, 2, 2) and not empty.any()


@pytest.mark.parametrize("bad", [0, -3])
def test_num_samples_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        sample_einsum("ab->", torch.zeros(2, 2), num_samples=bad)


@pytest.mark.parametrize("bad", [1.5, True, "3", None])
def test_num_samples_must_be_an_int(bad: object) -> None:
    with pytest.raises(TypeError, match="num_samples"):
        sample_einsum("ab->", torch.zeros(2, 2), num_samples=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_and_plus_inf_are_refused(value: float) -> None:
    x = torch.zeros(2, 3)
    x[1, 2] = value
    with pytest.raises(ValueError, match="operand 1"):
        sample_einsum("ab,bc->a", torch.zeros(4, 2), x)


def test_bad_equations_and_operands() -> None:
    with pytest.raises(ValueError, match="ab,bc->ad"):
        sample_einsum("ab,bc->ad", torch.zeros(2, 3), torch.zeros(3, 4))
    with pytest.raises(TypeError):
        sample_einsum("ab->", torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError):
        sample_einsum("ab->", [[0.0]])  # type: ignore[arg-type]


def test_inputs_untouched_and_grad_operands() -> None:
    xs = [x.float().requires_grad_() for x in operands([(2, 3), (3, 4), (4, 2)], seed=6)]
    before = [x.detach().clone() for x in xs]
    draws = sample_einsum("ab,bc,cd->a", *xs, num_samples=20)
    assert not draws.requires_grad
    for x, old in zip(xs, before):
        assert torch.equal(x.detach(), old) and x.grad is None
    # Broadcast and diagonal views in the clean operands are not written to either.
    d = torch.randn(3, 3)
    kept = d.clone()
    sample_einsum("ii,ij->j", d, torch.randn(1, 4), num_samples=5)
    assert torch.equal(d, kept)


def test_module_helpers() -> None:
    """A row's window extents (the kernels' sizing with no output dims: room for ``cap``
    float64 candidates): innermost whole first, never below 1; coordinates unravel."""
    from semiring_einsum.func._budget import Budget
    from semiring_einsum.func._plan import window_extents

    sizes = (("a", 5), ("b", 4), ("c", 3))

    def extents(budget: Budget) -> list[int]:
        return [w for _, w in window_extents(("abc",), "", sizes, budget, 8, "cpu")]

    assert extents(Budget(bytes=20 * 8)) == [1, 4, 3]
    assert extents(Budget(bytes=50 * 8)) == [4, 4, 3]
    assert extents(Budget(bytes=1 * 8)) == [1, 1, 1]
    assert extents(Budget(extent=2)) == [2, 2, 2]
    flat = torch.arange(12)
    got = S._unravel(flat, [3, 4], [10, 0])
    assert torch.equal(got[0], flat // 4 + 10) and torch.equal(got[1], flat % 4)


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_the_block_route_is_taken_and_falls_back_where_weights_underflow(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Matrix-product steps draw by blocks; rows whose shifted weights underflow (the
    maxima of the two operands far apart) are drawn exactly, and both fit."""
    if kernel == "torch":
        monkeypatch.setattr(N, "draw_blocks", lambda *args: None)
    taken: list[bool] = []
    real = S._draw_blocks

    def spy(*args: object) -> object:
        out = real(*args)  # type: ignore[arg-type]
        taken.append(out is not None)
        return out

    monkeypatch.setattr(S, "_draw_blocks", spy)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 20, generator=g, dtype=torch.float64)
    b = torch.randn(20, 4, generator=g, dtype=torch.float64)
    check_fit("ij,jk->ik", [a, b])
    assert taken == [True]
    # Row 0 of a peaks at j = 0 and column 0 of b at j = 19, 600 nats apart: every
    # weight of cell (0, 0) underflows in the shifted exponentials.
    a[0, 0], b[19, 0] = 600.0, 600.0
    calls: list[int] = []
    exact_draw = S._draw_any

    def count(*args: object) -> object:
        calls.append(int(args[3]))  # type: ignore[call-overload]
        return exact_draw(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(S, "_draw_any", count)
    check_fit("ij,jk->ik", [a, b])
    assert calls == [SAMPLES]  # the rows of cell (0, 0), and only those
