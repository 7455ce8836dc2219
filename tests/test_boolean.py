"""``bool_einsum``: the boolean semiring (or / and) on ``torch.bool`` tensors.

The oracle is independent of the package: :func:`torch.einsum` in float64 on
the 0/1 values of the operands, then ``> 0`` (a count of true terms is
positive exactly when their ``or`` is true; float64 counts are exact here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from semiring_einsum import func
from semiring_einsum.func import _boolean
from semiring_einsum.func._boolean import bool_einsum
from semiring_einsum.func._plan import Kernel

Tensor = torch.Tensor


def oracle(equation: str, *operands: Tensor) -> Tensor:
    return torch.einsum(equation, *[x.to(torch.float64) for x in operands]) > 0


def draw(shapes: Sequence[Sequence[int]], density: float, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(tuple(s), generator=g) < density for s in shapes]


CASES: list[tuple[str, list[tuple[int, ...]]]] = [
    ("ij,jk->ik", [(5, 70), (70, 6)]),  # matrix product, two words
    ("bij,bjk->bik", [(3, 4, 65), (3, 65, 5)]),  # batched
    ("ab,bc,cd->ad", [(4, 9), (9, 10), (10, 3)]),  # chain of three
    ("ab,bc,cd,de->ae", [(3, 5), (5, 6), (6, 4), (4, 2)]),  # chain of four
    ("ij,jk,ki->i", [(4, 5), (5, 6), (6, 4)]),  # a cycle: no index in every operand
    ("abc,bcd->ad", [(3, 5, 13), (5, 13, 4)]),  # two summed indices in one axis
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]),  # '...' with broadcasting
    ("...i,...i->i", [(2, 3, 4), (3, 4)]),  # '...' summed
    ("ii->i", [(6, 6)]),  # a diagonal
    ("iij,jk->ik", [(3, 3, 4), (4, 5)]),  # a diagonal inside a product
    ("ii->", [(6, 6)]),
    ("ij,jk", [(3, 4), (4, 5)]),  # implicit output
    ("ba,ac", [(3, 4), (4, 5)]),  # implicit output in alphabetical order
    (" ij , jk -> ik ", [(3, 4), (4, 5)]),  # spaces
    ("ij,jk->ik", [(3, 1), (5, 4)]),  # a size-1 summed index broadcast
    ("ij,jk->ik", [(3, 5), (1, 4)]),
    ("ij,jk->ik", [(3, 0), (0, 4)]),  # a size-0 summed index
    ("ij,jk->ik", [(0, 3), (3, 4)]),  # no output cells
    ("ij,jk->ijk", [(2, 3), (3, 4)]),  # nothing summed
    ("i,j->ij", [(3, 4)[:1], (4,)]),
    ("ij,ij->ij", [(3, 4), (3, 4)]),
    ("ij->ji", [(2, 3)]),
    ("ij->ij", [(2, 3)]),
    ("ij->i", [(3, 70)]),
    ("ij,k->i", [(3, 4), (5,)]),  # an index summed in one operand only
    ("i,i->", [(130,), (130,)]),
    ("ijk,jkl,lm->im", [(2, 3, 4), (3, 4, 5), (5, 2)]),
]
CASE_IDS = [f"{eq.strip()}:{shapes}" for eq, shapes in CASES]

BLOCKS = [
    None,
    1,
    3,
    func.AutomaticBlockSize(max_cpu_bytes=64),
    func.AutomaticBlockSize(max_cpu_bytes=2048),
]
BLOCK_IDS = ["default", "block1", "block3", "bytes64", "bytes2048"]


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "shapes"), CASES, ids=CASE_IDS)
def test_matches_oracle(equation: str, shapes: list[tuple[int, ...]], block: object) -> None:
    for seed, density in enumerate((0.1, 0.4)):
        xs = draw(shapes, density, seed)
        want = oracle(equation, *xs)
        for optimize in ("auto", False):
            got = bool_einsum(equation, *xs, block_size=block, optimize=optimize)  # type: ignore[arg-type]
            assert got.dtype == torch.bool
            assert got.shape == want.shape
            assert torch.equal(got, want), (equation, optimize, density)


@pytest.mark.parametrize("extent", [1, 7, 8, 63, 64, 65, 200])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_densities_and_word_boundaries(density: float, extent: int) -> None:
    xs = draw([(6, extent), (extent, 7)], density, seed=extent)
    want = oracle("ij,jk->ik", *xs)
    for block in (None, 3, func.AutomaticBlockSize(max_cpu_bytes=256)):
        assert torch.equal(bool_einsum("ij,jk->ik", *xs, block_size=block), want)
    # The same summed terms spread over two indices (flattened into one axis).
    a, b = xs[0].reshape(6, 1, extent), xs[1].reshape(1, extent, 7)
    assert torch.equal(bool_einsum("ixj,xjk->ik", a, b), want)


@pytest.mark.parametrize("s", [1, 64, 65, 130, 200])
def test_single_terms_land_on_the_right_bit(s: int) -> None:
    """One true term at position ``j`` of A's row meets position ``k`` of B's column."""
    positions = sorted({0, 7, 8, 63, 64, 65, 127, 128, 129, s - 1} & set(range(s)))
    for j in positions:
        for k in positions:
            a = torch.zeros(1, s, dtype=torch.bool)
            b = torch.zeros(s, 1, dtype=torch.bool)
            a[0, j] = True
            b[k, 0] = True
            got = bool_einsum("ij,jk->ik", a, b)
            assert got.item() == (j == k), (j, k)


def test_pairwise_and_joint_plans_and_explicit_paths() -> None:
    eq = "ab,bc,cd,de->ae"
    xs = draw([(6, 40), (40, 70), (70, 9), (9, 5)], 0.05, seed=3)
    want = oracle(eq, *xs)
    assert len(func.plan(eq, *[x.shape for x in xs]).steps) == 3  # pairwise by default
    for optimize in ("auto", "greedy", "optimal", False, [(2, 3), (0, 1), (0, 1)]):
        assert torch.equal(bool_einsum(eq, *xs, optimize=optimize), want), optimize


def _recording(fn: Callable[[Tensor], Tensor], results: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """``fn``, keeping every result in ``results``."""

    def recorded(x: Tensor) -> Tensor:
        out = fn(x)
        results.append(out)
        return out

    return recorded


class _Sizes(TorchDispatchMode):
    """The ``(bytes, numel, dtype)`` of every tensor that a non-view op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int, torch.dtype, str]] = []

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = op(*args, **(kwargs or {}))
        if not op.is_view:
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    self.seen.append((t.numel() * t.element_size(), t.numel(), t.dtype, str(op)))
        return out


def _over(
    seen: list[tuple[int, int, torch.dtype, str]], budget: int, xs: list[Tensor], out: Tensor
) -> list[tuple[int, int, torch.dtype, str]]:
    """The recorded tensors over the budget and bigger than every input and the output."""
    free = max([out.numel() * out.element_size()] + [x.numel() * x.element_size() for x in xs])
    return [s for s in seen if s[0] > budget and s[0] > free]


@pytest.mark.parametrize(
    ("equation", "shapes", "optimize"),
    [
        ("ij,jk->ik", [(20, 150), (150, 30)], "auto"),
        ("ab,bc,cd->ad", [(4, 30), (30, 30), (30, 5)], False),  # operands broadcast in windows
        ("i,i->", [(3000,), (3000,)], "auto"),  # one cell, many words
    ],
)
def test_a_tiny_byte_budget_bounds_every_temporary(
    equation: str, shapes: list[tuple[int, ...]], optimize: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``AutomaticBlockSize(max_cpu_bytes=B)`` no temporary exceeds ``B`` bytes.

    Tensors no bigger than an input or the output are not counted (DESIGN §3.1); the
    summed indices really are cut into several windows.
    """
    budget = 256
    xs = draw(shapes, 0.05, seed=1)
    want = oracle(equation, *xs)
    packs: list[Tensor] = []
    monkeypatch.setattr(_boolean, "_pack_words", _recording(_boolean._pack_words, packs))
    block = func.AutomaticBlockSize(max_cpu_bytes=budget)
    with _Sizes() as sizes:
        got = bool_einsum(equation, *xs, block_size=block, optimize=optimize)  # type: ignore[arg-type]
    assert torch.equal(got, want)
    assert len(packs) > 2 * len(xs)  # several windows
    allowed = {want.numel()} | {x.numel() for x in xs}  # boolean tensors of these sizes
    over = [s for s in sizes.seen if s[0] > budget and not (s[2] == torch.bool and s[1] in allowed)]
    assert not over, over


@pytest.mark.parametrize(("equation", "shapes"), CASES, ids=CASE_IDS)
def test_table_kernel_matches_oracle(
    equation: str, shapes: list[tuple[int, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two-operand steps forced onto the table kernel, either operand giving the rows."""
    xs = draw(shapes, 0.3, seed=8)
    want = oracle(equation, *xs)
    for kernel in ("tables", "tables_swapped"):
        monkeypatch.setattr(_boolean, "_choose_kernel", lambda *args, k=kernel: k)
        for block in (None, func.AutomaticBlockSize(max_cpu_bytes=4096)):
            for optimize in ("auto", False):
                got = bool_einsum(equation, *xs, block_size=block, optimize=optimize)
                assert torch.equal(got, want), (kernel, block, optimize)


@pytest.mark.parametrize(("equation", "shapes"), CASES, ids=CASE_IDS)
def test_small_cache_chunks(
    equation: str, shapes: list[tuple[int, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the default budget, loops cut by tiny cache caps: several word groups per chunk."""
    monkeypatch.setattr(_boolean, "CPU_CHUNK_BYTES", 64)
    monkeypatch.setattr(_boolean, "CPU_TABLE_BYTES", 2048)
    xs = draw(shapes, 0.2, seed=11)
    want = oracle(equation, *xs)
    for kernel in ("words", "tables", "tables_swapped"):
        monkeypatch.setattr(_boolean, "_choose_kernel", lambda *args, k=kernel: k)
        assert torch.equal(bool_einsum(equation, *xs), want), kernel
        assert torch.equal(bool_einsum(equation, *xs, block_size=1000), want), kernel


def test_the_table_kernel_is_chosen_for_large_products_and_is_right() -> None:
    chosen: list[Kernel] = []
    choose = _boolean._choose_kernel

    def spy(*args: object) -> Kernel:
        chosen.append(choose(*args))  # type: ignore[arg-type]
        return chosen[-1]

    a, b = draw([(300, 520), (520, 400)], 0.004, seed=9)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_boolean, "_choose_kernel", spy)
        got = bool_einsum("ij,jk->ik", a, b)
        small = bool_einsum("ij,jk->ik", a[:4, :10], b[:10, :4])
    assert chosen[0] in (_boolean.TABLES, _boolean.TABLES_SWAPPED) and chosen[1] is _boolean.WORDS
    assert torch.equal(got, oracle("ij,jk->ik", a, b))
    assert torch.equal(small, oracle("ij,jk->ik", a[:4, :10], b[:10, :4]))


def test_table_kernel_within_a_small_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables, gathers and unpacking in several windows, each within the budget."""
    budget = 4096
    monkeypatch.setattr(_boolean, "_choose_kernel", lambda *args: "tables")
    tables: list[Tensor] = []
    monkeypatch.setattr(_boolean, "_tables", _recording(_boolean._tables, tables))
    xs = draw([(2, 60, 150), (2, 150, 300)], 0.02, seed=10)
    want = oracle("bij,bjk->bik", *xs)
    with _Sizes() as sizes:
        got = bool_einsum("bij,bjk->bik", *xs, block_size=func.AutomaticBlockSize(budget))
    assert torch.equal(got, want)
    assert len(tables) > 4
    assert not _over(sizes.seen, budget, xs, want)


def test_int_block_size_bounds_the_words_of_a_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """An int ``block_size`` ``e`` packs at most ``ceil(e**r / 64)`` words per window."""
    packed: list[Tensor] = []
    monkeypatch.setattr(_boolean, "_pack_words", _recording(_boolean._pack_words, packed))
    xs = draw([(3, 20, 30), (20, 30, 4)], 0.01, seed=2)
    got = bool_einsum("ijk,jkl->il", *xs, block_size=9)
    assert torch.equal(got, oracle("ijk,jkl->il", *xs))
    assert max(p.shape[-1] for p in packed) == math.ceil(9**2 / 64) == 2
    assert len(packed) == 2 * math.ceil(20 / 9) * math.ceil(30 / 9)


def test_wrong_dtype_names_the_operand() -> None:
    a = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"operand 1 has dtype torch\.float32.*'ij,jk->ik'"):
        bool_einsum("ij,jk->ik", a, torch.ones(3, 2))
    with pytest.raises(TypeError, match=r"operand 0 has dtype torch\.int64"):
        bool_einsum("ij->i", torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="operand 1 must be a torch.Tensor"):
        bool_einsum("ij,jk->ik", a, [[True]])  # type: ignore[arg-type]


def test_bad_equations_and_options() -> None:
    a = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(func.EquationError, match="2 operand"):
        bool_einsum("ij,jk->ik", a)
    with pytest.raises(ValueError, match="3 operand"):
        bool_einsum("ij,jk,kl->il", a, a.T)
    with pytest.raises(func.EquationError, match="'j'"):
        bool_einsum("ij,jk->ik", a, a)
    with pytest.raises(ValueError, match="block_size"):
        bool_einsum("ij,jk->ik", a, a.T, block_size=0)


def test_inputs_are_not_mutated_and_results_are_fresh() -> None:
    for equation, shapes in CASES:
        xs = draw(shapes, 0.3, seed=5)
        before = [x.clone() for x in xs]
        for optimize in ("auto", False):
            out = bool_einsum(equation, *xs, optimize=optimize)
            for x, y in zip(xs, before):
                assert torch.equal(x, y), equation
            if out.numel():
                ptrs = {x.untyped_storage().data_ptr() for x in xs}
                assert out.untyped_storage().data_ptr() not in ptrs, equation


def test_vmap() -> None:
    a, b = draw([(4, 3, 70), (4, 70, 2)], 0.05, seed=6)
    f = torch.func.vmap(lambda a, b: bool_einsum("ij,jk->ik", a, b))
    want = oracle("bij,bjk->bik", a, b)
    assert torch.equal(f(a, b), want)
    # One operand unbatched, the batch along another dim, nested, tiny windows.
    g = torch.func.vmap(
        lambda a, b: bool_einsum("ij,jk->ik", a, b, block_size=3), in_dims=(1, None)
    )
    assert torch.equal(g(a.transpose(0, 1), b[0]), oracle("bij,jk->bik", a, b[0]))
    h = torch.func.vmap(torch.func.vmap(lambda x, y: bool_einsum("j,j->", x, y)))
    assert torch.equal(h(a, a), oracle("bij,bij->bi", a, a))
    empty = torch.func.vmap(lambda x, y: bool_einsum("ij,jk->ik", x, y))
    z = torch.zeros(2, 3, 0, dtype=torch.bool), torch.zeros(2, 0, 4, dtype=torch.bool)
    assert torch.equal(empty(*z), torch.zeros(2, 3, 4, dtype=torch.bool))


@pytest.mark.parametrize("kernel", ["words", "tables", "tables_swapped"])
def test_vmap_of_each_kernel(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_boolean, "_choose_kernel", lambda *args: kernel)
    monkeypatch.setattr(_boolean, "CPU_CHUNK_BYTES", 256)
    a, b = draw([(3, 5, 4, 70), (5, 70, 130)], 0.05, seed=12)
    f = torch.func.vmap(lambda x, y: bool_einsum("bij,bjk->bik", x, y), in_dims=(0, None))
    assert torch.equal(f(a, b), oracle("abij,bjk->abik", a, b))
    g = torch.func.vmap(lambda x, y: bool_einsum("ij,jk->ik", x, y), in_dims=(1, 0))
    assert torch.equal(g(a[0].transpose(0, 1), b), oracle("bij,bjk->bik", a[0], b))


def test_compile() -> None:
    """Under ``torch.compile`` (no ``fullgraph``), mixed with other ops, the result is right."""
    torch._dynamo.reset()

    def f(a: Tensor, b: Tensor, c: Tensor, w: Tensor) -> Tensor:
        return bool_einsum("ab,bc,cd->ad", a, b, c) & (w.sum(0) > 0)

    a, b, c, w = draw([(4, 70), (70, 5), (5, 3), (2, 3)], 0.3, seed=7)
    want = oracle("ab,bc,cd->ad", a, b, c) & w.any(0)
    compiled = torch.compile(f, backend="aot_eager")
    assert torch.equal(compiled(a, b, c, w.float()), want)
    assert torch.equal(compiled(a, b, c, w.float()), want)  # the compiled graph again
    torch._dynamo.reset()
