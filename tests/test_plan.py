"""The plan stage: contraction order, windows, byte estimates and caching."""

from __future__ import annotations

import math

import pytest
import torch

from semiring_einsum import func
from semiring_einsum.func import AutomaticBlockSize


def test_pairwise_path_follows_opt_einsum() -> None:
    import opt_einsum

    shapes = [(8, 9), (9, 10), (10, 11)]
    p = func.plan("ab,bc,cd->ad", *shapes, semiring=func.LOG, requires_grad=True)
    expected, _ = opt_einsum.contract_path("ab,bc,cd->ad", *shapes, shapes=True)
    assert p.path == tuple(tuple(s) for s in expected)
    assert len(p.steps) == 2
    assert p.steps[-1].output == "ad"


def test_optimize_false_is_one_joint_step() -> None:
    p = func.plan("ab,bc,cd->ad", (4, 5), (5, 6), (6, 7), optimize=False, semiring=func.LOG)
    assert p.path == ((0, 1, 2),)
    assert p.block_sizes[0].keys() == {"b", "c"}


def test_explicit_path_is_honoured() -> None:
    p = func.plan("ab,bc,cd->ad", (4, 5), (5, 6), (6, 7), optimize=[(1, 2), (0, 1)])
    assert p.path == ((1, 2), (0, 1))
    assert p.steps[0].inputs == ("bc", "cd")


def test_the_plan_names_each_steps_kernel() -> None:
    shapes = [(4, 5), (5, 6), (6, 7)]
    assert [s.kernel.name for s in func.plan("ab,bc,cd->ad", *shapes).steps] == ["blas", "blas"]
    log = func.plan("ab,bc,cd->ad", *shapes, semiring=func.LOG, requires_grad=True)
    assert [s.kernel.name for s in log.steps] == ["log_blas", "log_blas"]
    # Values alone: this small contraction runs as one joint logsumexp.
    values = func.plan("ab,bc,cd->ad", *shapes, semiring=func.LOG)
    assert [s.kernel.name for s in values.steps] == ["small"]
    joint = func.plan("ab,bc,cd->ad", *shapes, optimize=False)
    assert [s.kernel.name for s in joint.steps] == ["windows"]
    user = func.Semiring("u", torch.add, torch.mul, lambda x, d: x.sum(d) if d else x, 0.0, 1.0)
    assert [s.kernel.name for s in func.plan("ab,bc->ac", *shapes[:2], semiring=user).steps] == [
        "windows"
    ]


@pytest.mark.parametrize(
    ("equation", "shapes", "semiring", "kernels"),
    [
        # 40 terms per cell: rows; 3 terms and a big output: slices; few of both: windows
        ("bij,bjk->bik", [(3, 10, 40), (3, 40, 9)], "max", ["rows"]),
        ("ij,jk->ik", [(100, 3), (3, 100)], "max", ["windows"]),  # values: no slices
        ("ij,jk->ik", [(100, 3), (3, 100)], "max-grad", ["slices"]),
        ("ij,jk->ik", [(3, 3), (3, 3)], "max", ["windows"]),
        ("ij,ij->ij", [(3, 3), (3, 3)], "max", ["unsummed"]),
        ("ij,jk->ik", [(3, 0), (0, 4)], "max", ["empty"]),
        # a summed index that only one operand has: not BLAS; 40 terms: rows
        ("ijk,jl->il", [(3, 4, 10), (4, 5)], "log", ["rows"]),
        ("ijk,jl->il", [(3, 2, 2), (2, 5)], "log", ["windows"]),
        ("ij,jk->ik", [(3, 0), (0, 4)], "log", ["empty"]),
    ],
)
@pytest.mark.usefixtures("pure_torch")
def test_kernel_choice(equation: str, shapes: list, semiring: str, kernels: list[str]) -> None:
    s = {"max": func.MAX_PLUS, "max-grad": func.MAX_PLUS, "log": func.LOG}[semiring]
    grad = semiring == "max-grad"
    p = func.plan(equation, *shapes, semiring=s, requires_grad=grad)
    assert [step.kernel.name for step in p.steps] == kernels


def test_compiled_joint_max_plus_step_with_few_cells_keeps_the_row_kernel() -> None:
    # 768 cells, 4608 terms in several windows: the row kernel beats the fused windows.
    shapes = [(2, 16, 24, 8), (2, 16, 24, 8), (24, 24, 24)]
    compiled = func.plan(
        "bsxk,bsyk,xyz->bsz", *shapes, semiring=func.MAX_PLUS, optimize=False, compiled=True
    )
    assert [s.kernel.name for s in compiled.steps] == ["rows"]


@pytest.mark.usefixtures("pure_torch")
def test_compiled_max_plus_plans_take_the_value_free_kernels() -> None:
    shapes = [(3, 10, 40), (3, 40, 9)]
    eager = func.plan("bij,bjk->bik", *shapes, semiring=func.MAX_PLUS)
    compiled = func.plan("bij,bjk->bik", *shapes, semiring=func.MAX_PLUS, compiled=True)
    assert [s.kernel.name for s in eager.steps] == ["rows"]
    assert [s.kernel.name for s in compiled.steps] == ["windows"]


def test_matrix_shaped_max_plus_steps_take_the_native_kernel_where_it_is_built() -> None:
    shapes = [(3, 10, 40), (3, 40, 9)]
    native = func.native_status().startswith("native")
    for compiled in (False, True):
        p = func.plan("bij,bjk->bik", *shapes, semiring=func.MAX_PLUS, compiled=compiled)
        assert (
            [s.kernel.name for s in p.steps] == ["tropical" if native else "rows"]
            if not compiled
            else (["tropical" if native else "windows"])
        )
    # a summed index only one operand has: not a matrix product
    p = func.plan("ijk,jl->il", (3, 4, 10), (4, 5), semiring=func.MAX_PLUS)
    assert [s.kernel.name for s in p.steps] == ["rows"]


@pytest.mark.usefixtures("pure_torch")
def test_without_the_native_kernel_max_plus_plans_name_the_torch_ones() -> None:
    assert func.native_status() == "pure torch: disabled by SEMIRING_EINSUM_NATIVE=0"
    p = func.plan("bij,bjk->bik", (3, 10, 40), (3, 40, 9), semiring=func.MAX_PLUS)
    assert [s.kernel.name for s in p.steps] == ["rows"]


def test_the_printed_plan_shows_the_kernels() -> None:
    shapes = (4, 5), (5, 6), (6, 7)
    text = str(func.plan("ab,bc,cd->ad", *shapes, semiring=func.LOG, requires_grad=True))
    assert "kernel" in text and text.count("log_blas") == 2


def test_int_block_size_caps_every_window() -> None:
    p = func.plan("abc,cd->ad", (3, 7, 9), (9, 2), block_size=4, semiring=func.LOG)
    assert p.block_sizes == ({"b": 4, "c": 4},)


@pytest.mark.parametrize("budget", [64, 1024, 1 << 14])
def test_automatic_budget_bounds_window_bytes(budget: int) -> None:
    p = func.plan(
        "bij,bjk->bik",
        (4, 16, 32),
        (4, 32, 8),
        semiring=func.LOG,
        block_size=AutomaticBlockSize(max_cpu_bytes=budget),
    )
    out_bytes = 4 * 16 * 8 * 4
    (step,) = p.steps
    window_bytes = 4 * math.prod([4, 16, 8]) * step.windows[0][1]
    # The window tensor carries the output dims; it never exceeds the budget
    # unless the output alone does (then the window is one slice wide).
    assert window_bytes <= max(budget, out_bytes)
    assert p.peak_bytes <= max(budget, out_bytes)


def test_budget_too_small_for_pairwise_intermediate_sums_jointly() -> None:
    # In a triangle every pairwise intermediate has 30*30 elements (3600 bytes);
    # a 1 KiB budget forbids them all, so the three indices are summed jointly.
    shapes = [(30, 30)] * 3
    roomy = func.plan("ab,bc,ca->", *shapes, semiring=func.LOG, requires_grad=True)
    tight = func.plan(
        "ab,bc,ca->", *shapes, semiring=func.LOG, block_size=AutomaticBlockSize(max_cpu_bytes=1024)
    )
    assert len(roomy.steps) == 2
    assert tight.path == ((0, 1, 2),)
    assert 0 < tight.peak_bytes <= 1024


def test_plan_is_immutable_hashable_and_cached() -> None:
    a = func.plan("ij,jk->ik", (3, 4), (4, 5), semiring=func.LOG)
    b = func.plan("ij,jk->ik", (3, 4), (4, 5), semiring=func.LOG)
    assert a == b and hash(a) == hash(b)
    assert a.steps is b.steps  # the cached plan's (each plan() call gives it its runner)
    with pytest.raises(AttributeError):
        a.peak_bytes = 0  # type: ignore[misc]
    func.clear_caches()
    assert func.plan("ij,jk->ik", (3, 4), (4, 5), semiring=func.LOG) == a


def test_plan_accepts_tensors_and_prints_a_table() -> None:
    x = torch.zeros(3, 4, dtype=torch.float64)
    p = func.plan("ij,jk->ik", x, x.T)
    assert p.itemsize == 8
    text = str(p)
    assert "ij,jk->ik" in text and "blas" in text and "Peak temporary" in text


def test_plan_resolves_ellipsis_and_diagonals() -> None:
    p = func.plan("...ii,...i->...", (2, 3, 3), (2, 3), semiring=func.LOG)
    assert len(p.contraction.inputs) == 2
    assert all(len(set(t)) == len(t) for t in p.contraction.inputs)
