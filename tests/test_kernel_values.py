"""Kernels are values: plans hold :class:`func.Kernel` objects, which pickle as themselves,
are chosen by their family in order, and take device implementations through one call."""

from __future__ import annotations

import ast
import itertools
import pickle
from pathlib import Path

import pytest
import torch

from oracle import brute
from semiring_einsum import func
from semiring_einsum.func import _boolean
from semiring_einsum.func import _plan as P
from semiring_einsum.func import _rules as R

SRC = Path(__file__).resolve().parents[1] / "src" / "semiring_einsum"

CASES = [
    ("ab,bc->ac", [(4, 30), (30, 5)], {}),
    ("bij,bjk->bik", [(3, 7, 40), (3, 40, 5)], {}),
    ("ab,bc,cd->ad", [(5, 6), (6, 7), (7, 8)], {"optimize": False}),
    ("ab,bc,cd->ad", [(5, 6), (6, 7), (7, 8)], {}),
    ("ij,ij->ij", [(4, 5), (4, 5)], {}),
    ("ij->", [(0, 3)], {}),
    ("aij,ajk->aik", [(2, 300, 2), (2, 2, 300)], {}),
]
SEMIRINGS = [func.REAL, func.LOG, func.MAX_PLUS, func.MIN_PLUS, func.kbest_semiring(2)]


@pytest.mark.parametrize("case, semiring", list(itertools.product(CASES, SEMIRINGS)))
def test_every_planned_step_names_a_kernel_of_its_family(case: tuple, semiring: object) -> None:
    equation, shapes, options = case
    if semiring is SEMIRINGS[-1]:
        shapes = [(*s, 2) for s in shapes]  # element-shaped semiring: a trailing k
    plan = func.plan(equation, *shapes, semiring=semiring, **options)
    family = R.family_of(semiring)  # type: ignore[arg-type]
    for step in plan.steps:
        assert isinstance(step.kernel, func.Kernel)
        assert func.kernels()[step.kernel.qualname] is step.kernel
        assert step.kernel in family.kernels + family.assigned
        if step.kernel in family.assigned:  # (a route's, not chosen by applies)
            continue
        # The family's first kernel that applies: the plan and the rule agree.
        choice = P.KernelChoice(torch.float32, "cpu")
        first = next(k for k in family.kernels if k.applies is None or k.applies(step, choice))
        assert first is step.kernel


def test_kernels_pickle_as_themselves_and_plans_with_them() -> None:
    for kernel in func.kernels().values():
        assert pickle.loads(pickle.dumps(kernel)) is kernel
    plan = func.plan("ab,bc,cd->ad", (5, 6), (6, 7), (7, 8), semiring=func.LOG)
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan
    assert all(a.kernel is b.kernel for a, b in zip(again.steps, plan.steps))


def test_a_step_key_round_trips_its_kernel() -> None:
    step = func.plan("bij,bjk->bik", (3, 7, 40), (3, 40, 5), semiring=func.LOG).steps[0]
    budget = P.Budget(None, 1 << 20)
    assert P.decode(step.key(budget, 4, "cpu")).step.kernel is step.kernel


def test_qualified_names_are_unique_and_errors_name_the_problem() -> None:
    names = [k.qualname for k in func.kernels().values()]
    assert len(names) == len(set(names))
    assert {"max_plus.tropical", "log.log_blas", "boolean.tables"} <= set(names)
    with pytest.raises(ValueError, match="no kernel named 'max_plus.nope'.*max_plus.rows"):
        P.kernel_named("max_plus.nope")
    with pytest.raises(ValueError, match="already registered"):
        P.Kernel("max_plus", "rows", "a second one")
    with pytest.raises(ValueError, match="real.windows has no operator"):
        func.register_kernel("real.windows", "cuda", lambda step, xs: xs[0])
    with pytest.raises(ValueError, match="max_plus.rows has no backward operator"):
        func.register_kernel("max_plus.rows", "cuda", lambda *a: a, vjp=lambda *a: a)
    with pytest.raises(TypeError, match="device type"):
        func.register_kernel(R.MAX_ROWS, "", lambda *a: a)


def test_the_boolean_kernels_are_values_too() -> None:
    for kernel in (_boolean.WORDS, _boolean.TABLES, _boolean.TABLES_SWAPPED):
        assert func.kernels()[kernel.qualname] is kernel and kernel.family == "boolean"


def test_a_registered_device_implementation_runs_until_removed() -> None:
    """Registered for ``cpu`` (the device these tests have), the implementation gets the
    step as a :class:`func.Step` and its result is the call's; removed, the built-in runs."""
    equation = "ab,bc,cd->ad"
    xs = [torch.randn(5, 6), torch.randn(6, 7), torch.randn(7, 8)]
    assert func.plan(equation, *xs, semiring=func.MAX_PLUS, optimize=False).steps[0].kernel is (
        R.MAX_ROWS
    )
    builtin = R.MAX_ROWS.operator.impl
    seen: list[func.Step] = []

    def mine(step: func.Step, argmax: bool, operands: list[torch.Tensor]) -> tuple:
        seen.append(step)
        values, index = builtin(step, argmax, operands)
        return values.contiguous() + 1, index.contiguous()  # (+1: visibly ours)

    want = brute("max", equation, *xs).to(torch.float32)
    with func.register_kernel("max_plus.rows", "cpu", mine) as registration:
        assert R.MAX_ROWS.devices == {"cpu"}
        with pytest.raises(ValueError, match="already has a kernel for 'cpu'"):
            func.register_kernel(R.MAX_ROWS, "cpu", mine)
        got = func.max_einsum(equation, *xs, optimize=False)
        torch.testing.assert_close(got, want + 1)
        assert len(seen) == 1 and isinstance(seen[0], func.Step)
        assert seen[0].kernel is R.MAX_ROWS and seen[0].inputs == ("ab", "bc", "cd")
    assert "removed" in repr(registration) and R.MAX_ROWS.devices == frozenset()
    torch.testing.assert_close(func.max_einsum(equation, *xs, optimize=False), want)
    assert len(seen) == 1


def test_no_code_compares_a_kernel_with_a_string() -> None:
    """Kernels are compared by identity: no ``kernel == "..."`` (or ``!=``, ``in``) remains."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            names = [
                s.attr if isinstance(s, ast.Attribute) else getattr(s, "id", "") for s in sides
            ]
            strings = [
                s
                for s in sides
                if isinstance(s, ast.Constant)
                and isinstance(s.value, str)
                or isinstance(s, (ast.Tuple, ast.Set, ast.List))
                and any(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts)
            ]
            if "kernel" in names and strings:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, f"kernel compared with a string at {offenders}"


def test_a_semiring_runs_on_one_family() -> None:
    from semiring_einsum.func import _autograd

    with pytest.raises(ValueError, match="'max_plus' already runs on the max_plus family"):
        _autograd.register_family(func.MAX_PLUS, R.LOG_FAMILY)
    _autograd.register_family(func.MAX_PLUS, R.MAX_FAMILY)  # (the same pair again: nothing)
    assert R.family_of(func.MAX_PLUS) is R.MAX_FAMILY
