"""The step kernels as registered operators: ``torch.ops.semiring_einsum.*``.

Each operator's schema and fake implementation agree with its kernel
(``torch.library.opcheck``), its vmap rule equals a loop over the batch, a
compiled log step runs its operator (one opaque node per step), a device
kernel registered for an operator is dispatched to, and plain eager calls
give the same answers as calls through the dispatcher.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from oracle import brute
from semiring_einsum import func
from semiring_einsum.func import _ops
from semiring_einsum.func._context import call_context
from semiring_einsum.func._plan import decode
from semiring_einsum.func._prepare import Prepared, budget_for
from semiring_einsum.func._rules import family_of

Tensor = torch.Tensor
F64 = torch.float64


def _key(semiring: func.Semiring, equation: str, *xs: Tensor, block_size: Any = None) -> str:
    """The key of the (single) step of a contraction."""
    budget = budget_for(block_size, xs, equation)
    p = Prepared(semiring, family_of(semiring), equation, xs, budget, "auto")
    (step,) = p.plan.steps
    return p.spec(step).key


def _data(*shapes: tuple[int, ...], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64) for s in shapes]


def test_every_operator_is_registered_in_the_namespace() -> None:
    names = {op.name for op in _ops.OPERATORS}
    assert names >= {
        "real_blas",
        "log_blas",
        "log_blas_vjp",
        "log_rows",
        "log_windows",
        "max_rows",
        "max_slices",
        "max_windows",
    }
    for op in _ops.OPERATORS:
        assert getattr(torch.ops.semiring_einsum, op.name).default is op.op


# (operator, semiring, equation, shapes, extra leading arguments after the key)
CASES: dict[str, tuple[Any, func.Semiring, str, list[tuple[int, ...]], tuple[Any, ...]]] = {
    "real_blas": (_ops.REAL_BLAS, func.REAL, "bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], ()),
    "log_windows": (_ops.LOG_WINDOWS, func.LOG, "ij,jk->ik", [(3, 4), (4, 5)], (False,)),
    "log_rows": (_ops.LOG_ROWS, func.LOG, "ijk,jl->il", [(3, 4, 10), (4, 5)], ()),
    "max_windows": (_ops.MAX_WINDOWS, func.MAX_PLUS, "ij,jk->ik", [(3, 4), (4, 5)], (True,)),
    "max_rows": (_ops.MAX_ROWS, func.MAX_PLUS, "bij,bjk->bik", [(2, 3, 40), (2, 40, 4)], (True,)),
    "max_slices": (_ops.MAX_SLICES, func.MAX_PLUS, "ij,jk->ik", [(70, 3), (3, 70)], (True,)),
}


def _args(name: str) -> tuple[Any, tuple[Any, ...]]:
    op, semiring, equation, shapes, extra = CASES[name]
    xs = _data(*shapes)
    key = _key(semiring, equation, *xs)
    return op, (key, *extra, xs)


def test_opcheck_the_tropical_operators() -> None:
    a, b = _data((2, 3, 4), (2, 4, 5))
    key = _key(func.MAX_PLUS, "bij,bjk->bik", a, b)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(_ops.MAX_TROPICAL.op, (key, True, [a, b]), test_utils=utils)
    values, index = _ops.MAX_TROPICAL.op(key, True, [a, b])
    g = torch.randn(values.shape, dtype=F64)
    torch.library.opcheck(
        _ops.MAX_TROPICAL_VJP.op, (key, a, b, index, g, True, True), test_utils=utils
    )


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(name: str) -> None:
    op, args = _args(name)
    # No autograd formula: the operators run inside the rules' forward, which
    # autograd never records.
    torch.library.opcheck(op.op, args, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_log_blas_and_its_vjp() -> None:
    a, b = _data((2, 3, 4), (2, 4, 5))
    key = _key(func.LOG, "bij,bjk->bik", a, b)
    torch.library.opcheck(
        _ops.LOG_BLAS.op, (key, a, b), test_utils=("test_schema", "test_faketensor")
    )
    outs = _ops.LOG_BLAS.op(key, a, b)
    g = torch.randn(outs[0].shape, dtype=F64)
    torch.library.opcheck(
        _ops.LOG_BLAS_VJP.op,
        (key, "nan", a, b, *outs, g, True, False),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_operator_equals_its_kernel(name: str) -> None:
    """Through the dispatcher or not, the same answer."""
    op, (key, *rest) = _args(name)
    direct = op.impl(decode(key).step, *rest)
    through = op.op(key, *rest)
    direct = direct if isinstance(direct, tuple) else (direct,)
    through = through if isinstance(through, tuple) else (through,)
    for d, t in zip(direct, through, strict=True):
        torch.testing.assert_close(d, t)


@pytest.mark.parametrize(
    "name", ["real_blas", "log_rows", "log_windows", "max_rows", "max_windows"]
)
def test_vmap_rule_equals_a_loop(name: str) -> None:
    op, semiring, equation, shapes, extra = CASES[name]
    xs = _data(*shapes)
    batch = torch.stack([xs[0], 2 * xs[0], xs[0] - 1])  # the first operand batched
    key = _key(semiring, equation, *xs)

    def call(x: Tensor) -> Any:
        return op.op(key, *extra, [x, *xs[1:]])

    got = torch.vmap(call)(batch)
    got = got if isinstance(got, tuple) else (got,)
    for i in range(batch.shape[0]):
        want = call(batch[i])
        want = want if isinstance(want, tuple) else (want,)
        for gk, wk in zip(got, want, strict=True):
            torch.testing.assert_close(gk[i], wk)


def test_log_blas_vmap_rule() -> None:
    a, b = _data((3, 4), (4, 5))
    key = _key(func.LOG, "ij,jk->ik", a, b)
    batch = torch.stack([a, a * 2])
    out, res_a, res_b, sumexp, certified = torch.vmap(lambda x: _ops.LOG_BLAS.op(key, x, b))(batch)
    for i in range(2):
        want = _ops.LOG_BLAS.op(key, batch[i], b)
        torch.testing.assert_close(out[i], want[0])
        torch.testing.assert_close(sumexp[i], want[3])
    # One certificate for the folded call, broadcast over the batch by vmap.
    assert certified.shape == (2,) and bool(certified.all())


def test_compiled_log_step_runs_its_operator() -> None:
    a, b = _data((2, 5, 6), (2, 6, 3))
    compiled = torch.compile(lambda x, y: func.log_einsum("bij,bjk->bik", x, y), fullgraph=True)
    compiled(a, b)
    with torch.profiler.profile() as prof:
        got = compiled(a, b)
    names = {e.key for e in prof.key_averages()}
    assert "semiring_einsum::log_blas" in names
    torch.testing.assert_close(got, brute("log", "bij,bjk->bik", a, b))
    torch._dynamo.reset()


def test_a_registered_device_kernel_is_dispatched_to() -> None:
    """The hook for per-device kernels: one registered for the operands' device always runs."""
    calls: list[str] = []

    def impl(step: Any, xs: list[Tensor]) -> Tensor:
        return xs[0] * 2

    def fake(key: str, xs: list[Tensor]) -> Tensor:
        return torch.empty_like(xs[0])

    doubled = _ops.Operator(
        "test_only_double", "(str step, Tensor[] xs) -> Tensor", impl, fake, opaque=False
    )
    x = torch.ones(3)
    spec = type("S", (), {"step": None, "key": "k"})()
    ctx = call_context([x])
    torch.testing.assert_close(doubled(ctx, spec, [x]), 2 * x)  # plain eager: the kernel itself

    def cpu_kernel(key: str, xs: list[Tensor]) -> Tensor:
        calls.append(key)
        return xs[0] * 3

    doubled.register_kernel("cpu", cpu_kernel)
    torch.testing.assert_close(doubled(ctx, spec, [x]), 3 * x)
    assert calls == ["k"]


def test_values_only_max_operator_returns_no_index() -> None:
    op, (key, _, xs) = _args("max_rows")
    values, index = op.op(key, False, xs)
    assert index.numel() == 0 and index.dtype == torch.int64
    want = brute("max", "bij,bjk->bik", *xs)
    torch.testing.assert_close(values, want)


def test_max_rows_operator_falls_back_on_nan() -> None:
    op, (key, argmax, xs) = _args("max_rows")
    xs = [x.clone() for x in xs]
    xs[0][1, 2, 7] = math.nan
    xs[0][1, 2, 30] = math.nan
    values, index = op.op(key, argmax, xs)
    assert math.isnan(values[1, 2, 0]) and int(index[1, 2, 0]) == 7  # the first NaN wins
