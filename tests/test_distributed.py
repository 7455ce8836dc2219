"""Contractions over DTensors on 2 and 4 processes (gloo on CPU), against one process.

Each world runs once, in a subprocess that spawns its ranks (``tests/distributed_cases.py``);
every case is then checked here against the same call on the full tensors in this process
(itself checked against the brute-force oracle): values and gradients equal (exactly for
max, min, Viterbi and k-best, argmax included), placements as designed, and the collectives
counted by ``CommDebugMode``: none forward for an output-sharded index, one all-reduce per
sharded summed index for real, max and min, two for log and Viterbi, one all-gather for a
user's semiring.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import distributed_cases as C
import oracle
from semiring_einsum import func

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="torch.distributed with gloo is not available",
    ),
]

EXACT = ("max", "min", "viterbi", "minviterbi", "kbest2")
# Collectives of one combine over one mesh dimension, forward.
COMBINE = {
    "real": {"all_reduce": 1},
    "max": {"all_reduce": 1},
    "min": {"all_reduce": 1},
    "log": {"all_reduce": 2},
    "log:uniform": {"all_reduce": 2},
    "log:0.5": {"all_reduce": 2},
    "log:0.0": {"all_reduce": 2},
    "viterbi": {"all_reduce": 2},
    "minviterbi": {"all_reduce": 2},
    "user": {"all_gather_into_tensor": 1},
    "kbest2": {"all_gather_into_tensor": 1},
}

_RESULTS: dict[int, dict[str, Any]] = {}


def _results(world: int) -> dict[str, Any]:
    if world not in _RESULTS:
        _RESULTS[world] = C.results(world, C.shared_folder())
    return _RESULTS[world]


def _ids(world: int) -> list[str]:
    return [c.name for c in C.cases(world)]


def _single(case: C.Case) -> dict[str, Any]:
    """The same call on the full tensors in this process."""
    xs = [x.requires_grad_(case.grads) for x in C.operands(case)]
    result = C.call(case, xs)
    values, argmax = result if C.is_viterbi(case) else (result, None)
    outputs = list(values) if isinstance(values, tuple) else [values]
    out: dict[str, Any] = {"values": [v.detach() for v in outputs], "argmax": argmax}
    if case.grads:
        ws = [C.cotangent(case, v.detach()) for v in outputs]
        torch.autograd.backward(outputs, ws)
        out["grads"] = [x.grad for x in xs]
    return out


def _close(actual: Tensor, expected: Tensor, exact: bool, what: str) -> None:
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-9, "atol": 1e-11}
    if not exact and expected.dtype in (torch.bfloat16, torch.float32):  # another sum order
        tol = {"rtol": 1.6e-2, "atol": 1e-2} if expected.dtype == torch.bfloat16 else {}
    torch.testing.assert_close(
        actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol
    )


Tensor = torch.Tensor


def _check(case: C.Case, got: dict[str, Any]) -> None:
    assert "error" not in got, got.get("error")
    want = _single(case)
    exact = case.semiring in EXACT
    assert len(got["values"]) == len(want["values"])
    for k, (g, w) in enumerate(zip(got["values"], want["values"])):
        _close(g, w, exact, f"values of output {k}")
    if C.is_viterbi(case):
        assert torch.equal(got["argmax"], want["argmax"]), (got["argmax"], want["argmax"])
        assert got["argmax_placements"] == list(case.layout.output)
    # The single process agrees with the brute-force oracle.
    brute = case.layout.brute and case.data not in ("nan", "posinf", "bfloat16", "float32")
    if case.semiring in ("real", "log", "max", "min") and brute:
        expected = oracle.brute(case.semiring, case.layout.equation, *C.operands(case))
        _close(want["values"][0], expected, False, "single process vs oracle")
    if C.is_viterbi(case) and brute:
        sign = -1 if case.semiring == "minviterbi" else 1  # argmin(x) = argmax(-x)
        xs = [sign * x for x in C.operands(case)]
        values, argmax = oracle.brute_viterbi(case.layout.equation, *xs)
        values = sign * values
        _close(want["values"][0], values, True, "single process vs oracle")
        finite = torch.isfinite(values)
        assert torch.equal(want["argmax"][finite], argmax[finite])
    expected_placements = case.layout.several or (case.layout.output,)
    assert got["placements"] == [list(p) for p in expected_placements]
    layout = case.layout
    if layout.clean:
        expected = {op: n * layout.combines for op, n in COMBINE[case.semiring].items()}
        if layout is C.LONG_CHAIN and case.semiring == "viterbi":
            # Ranks past int64: a MAX, a MIN per summed index (22), a SUM of the argmax.
            expected = {"all_reduce": 1 + 22 + 1}
        assert got["forward"] == {k: v for k, v in expected.items() if v}, got["forward"]
    if not case.grads:
        return
    long_ties = layout is C.LONG_CHAIN and case.data == "int"
    if long_ties:
        # Past int64 ranks one device breaks ties in its plan's order and the ranks in
        # row-major order between them: different terms, so no gradient to compare. What
        # must hold: each cell's gradient reaches exactly one term, and every term of the
        # chain holds each operand once, so each operand's gradient sums to the cotangent's.
        total = sum(C.cotangent(case, v).sum() for v in want["values"])
        for k, (g, w) in enumerate(zip(got["grads"], want["grads"])):
            _close(g.sum(), total, False, f"sum of the gradient of operand {k}")
            _close(w.sum(), total, False, f"sum of one device's gradient of operand {k}")
    if case.semiring.startswith("log") and brute:  # one process's gradients: the oracle's
        policy = case.semiring.partition(":")[2] or math.nan
        weight = policy if policy == "uniform" or isinstance(policy, float) else float(policy)
        xs = C.operands(case)
        expected = oracle.log_vjp(
            case.layout.equation, xs, C.cotangent(case, want["values"][0]), weight
        )
        for k, (w, e) in enumerate(zip(want["grads"], expected)):
            _close(w, e, False, f"single process vs oracle, gradient of operand {k}")
        if case.data == "neginf-nancot":
            assert torch.isneginf(want["values"][0]).any(), "no dead cell to send NaN into"
        if weight == 0.0:  # a NaN cotangent at a dead cell is not used
            assert all(torch.isfinite(g).all() for g in got["grads"])
    # Gradients of a replicated operand add up partial sums over ranks: equal up to rounding.
    for k, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        if not long_ties:
            _close(g, w, False, f"gradient of operand {k}")
    originals = [["R" if p == "P" else p for p in ps] for ps in layout.placements]
    assert got["grad_placements"] == originals
    if layout.clean:
        gathers = layout.gathered
        reduces = layout.reduced
        counted = got["backward"]
        assert counted.get("all_gather_into_tensor", 0) == gathers, counted
        if case.semiring in ("max", "min"):
            # A count of the winners per cell; where ranks tie, the tie-break: one all-reduce,
            # or one per summed index (22) past int64 ranks.
            tie_break = 22 if layout is C.LONG_CHAIN else 1
            assert counted.get("all_reduce", 0) in (
                reduces + layout.combines,
                reduces + (1 + tie_break) * layout.combines,
            ), counted
        else:
            assert counted.get("all_reduce", 0) == reduces, counted
        assert set(counted) <= {"all_reduce", "all_gather_into_tensor"}, counted


@pytest.mark.parametrize("name", _ids(2))
def test_two_processes(name: str) -> None:
    case = {c.name: c for c in C.cases(2)}[name]
    _check(case, _results(2)[name])


@pytest.mark.parametrize("name", _ids(4))
def test_four_processes(name: str) -> None:
    case = {c.name: c for c in C.cases(4)}[name]
    _check(case, _results(4)[name])


# -- in this process: a world of one, for errors and the boundary's bookkeeping ---------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():  # pragma: no cover - a process group from elsewhere
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("world1") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _dt(mesh: Any, x: Tensor, *placements: Any) -> Any:
    from torch.distributed.tensor import Replicate, distribute_tensor

    return distribute_tensor(x, mesh, list(placements) or [Replicate()], src_data_rank=None)


def test_a_plain_tensor_among_dtensors_is_refused(mesh: Any) -> None:
    a = _dt(mesh, torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"operand 1 is a Tensor, not a DTensor.*distribute_tensor"):
        func.einsum("ij,jk->ik", a, torch.randn(3, 4))


def test_operands_on_two_meshes_are_refused(mesh: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    other = init_device_mesh("cpu", (1, 1))
    a, b = _dt(mesh, torch.randn(2, 3)), _dt(other, torch.randn(3, 4), *[_replicate()] * 2)
    with pytest.raises(ValueError, match="different meshes"):
        func.log_einsum("ij,jk->ik", a, b)


def _replicate() -> Any:
    from torch.distributed.tensor import Replicate

    return Replicate()


@pytest.mark.parametrize(
    "call",
    [
        lambda x: func.kbest_einsum("ij,jk->ik", x, x, k=2),
        lambda x: func.entropy_einsum("ij,jk->ik", x, x),
        lambda x: func.expectation_einsum("ij,jk->ik", [x, x], [x, x]),
        lambda x: func.sample_einsum("ij,jk->ik", x, x),
        lambda x: func.bool_einsum("ij,jk->ik", x > 0, x > 0),
        lambda x: func.plan("ij,jk->ik", x, x),
    ],
    ids=["kbest", "entropy", "expectation", "sample", "bool", "plan"],
)
def test_functions_without_a_distributed_route_say_so(mesh: Any, call: Any) -> None:
    x = _dt(mesh, torch.randn(3, 3))
    with pytest.raises(TypeError, match="does not take DTensor operands.*full_tensor"):
        call(x)


def test_a_bad_equation_fails_as_on_one_device(mesh: Any) -> None:
    a, b = _dt(mesh, torch.randn(2, 3)), _dt(mesh, torch.randn(4, 5))
    with pytest.raises(func.EquationError) as on_mesh:
        func.max_einsum("ij,jk->ik", a, b)
    with pytest.raises(func.EquationError) as plain:
        func.max_einsum("ij,jk->ik", torch.randn(2, 3), torch.randn(4, 5))
    assert str(on_mesh.value) == str(plain.value)


@pytest.mark.parametrize("semiring", ["real", "log", "max", "min", "viterbi", "minviterbi", "user"])
def test_world_of_one_equals_one_device_and_leaves_inputs_alone(mesh: Any, semiring: str) -> None:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.debug import CommDebugMode

    layout = C.LAYOUTS_1D[1]  # ij,jk->ik with j sharded
    case = C.Case(f"one-{semiring}", semiring, layout, (1,))
    xs = C.operands(case)
    dts = [_dt(mesh, x.clone(), Shard(int(p[0][1]))) for x, p in zip(xs, layout.placements)]
    before = [d.to_local().clone() for d in dts]
    with CommDebugMode() as comms:
        got = C.call(case, dts)
    assert comms.get_total_counts() == 0  # a mesh dimension of one rank: nothing to combine
    want = C.call(case, xs)
    if semiring in ("viterbi", "minviterbi"):
        assert torch.equal(got[1].full_tensor(), want[1])
        got, want = got[0], want[0]
    _close(got.full_tensor(), want, semiring in EXACT, "values")
    for d, b in zip(dts, before):
        assert torch.equal(d.to_local(), b)  # nothing mutated


def test_viterbi_refuses_several_outputs_as_on_one_device(mesh: Any) -> None:
    a, b = _dt(mesh, torch.randn(2, 3)), _dt(mesh, torch.randn(3, 4))
    with pytest.raises(func.EquationError, match="viterbi_einsum returns one output"):
        func.viterbi_einsum("ij,jk->,ij", a, b)


def test_torch_func_transforms_are_refused_clearly(mesh: Any) -> None:
    from torch.distributed.tensor import Shard

    a = _dt(mesh, torch.randn(3, 4), Shard(1))
    b = _dt(mesh, torch.randn(4, 5), Shard(0))
    with pytest.raises(NotImplementedError, match=r"torch.func transforms .*\.backward\(\)"):
        torch.func.grad(lambda x: func.log_einsum("ij,jk->ik", x, b).sum().full_tensor())(a)


def test_torch_compile_runs_the_distributed_call(mesh: Any) -> None:
    from torch.distributed.tensor import Shard

    a = _dt(mesh, torch.randn(3, 4), Shard(1))
    b = _dt(mesh, torch.randn(4, 5), Shard(0))
    compiled = torch.compile(lambda x, y: func.viterbi_einsum("ij,jk->ik", x, y), fullgraph=False)
    values, argmax = compiled(a, b)
    want_values, want_argmax = func.viterbi_einsum("ij,jk->ik", a.full_tensor(), b.full_tensor())
    assert torch.equal(values.full_tensor(), want_values)
    assert torch.equal(argmax.full_tensor(), want_argmax)


def test_the_drop_in_layer_passes_dtensors_through(mesh: Any) -> None:
    from torch.distributed.tensor import Shard

    import semiring_einsum as se

    a_, b_ = torch.randn(3, 4), torch.randn(4, 5)
    a, b = _dt(mesh, a_, Shard(1)), _dt(mesh, b_, Shard(0))
    eq = se.compile_equation("ij,jk->ik")
    for call in (se.einsum, se.real_einsum_forward, se.log_einsum, se.log_einsum_forward):
        _close(call(eq, a, b).full_tensor(), call(eq, a_, b_), False, call.__name__)
    values, argmax = se.log_viterbi_einsum_forward(eq, a, b)
    want_values, want_argmax = se.log_viterbi_einsum_forward(eq, a_, b_)
    assert torch.equal(values.full_tensor(), want_values)
    assert torch.equal(argmax.full_tensor(), want_argmax)


def test_the_drop_in_helpers_without_a_distributed_route_say_so(mesh: Any) -> None:
    import semiring_einsum as se

    a, b = _dt(mesh, torch.randn(3, 4)), _dt(mesh, torch.randn(4, 5))
    g = _dt(mesh, torch.randn(3, 5))
    eq = se.compile_equation("ij,jk->ik")
    calls = {
        "real_einsum_backward": lambda: se.real_einsum_backward(eq, [a, b], [True, True], g),
        "log_einsum_backward": lambda: se.log_einsum_backward(eq, [a, b], [True, True], g),
        "log_einsum_forward with return_max": lambda: se.log_einsum_forward(
            eq, a, b, return_max=True
        ),
        "semiring_einsum_forward": lambda: se.semiring_einsum_forward(
            eq, [a, b], se.AutomaticBlockSize(), lambda compute_sum: None
        ),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"{name}.* does not take DTensor operands"):
            call()


def test_torch_func_over_wrapped_dtensors_is_refused(mesh: Any) -> None:
    # Every operand under the transform's wrapper: not a DTensor to isinstance, still one.
    a, b = _dt(mesh, torch.randn(3, 4)), _dt(mesh, torch.randn(4, 5))
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        torch.func.vjp(lambda x, y: func.max_einsum("ij,jk->ik", x, y), a, b)
