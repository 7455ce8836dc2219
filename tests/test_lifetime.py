"""A semiring lives as long as anything that uses it, and travels as a value.

Everything that needs a user semiring after a call returns (the autograd graph,
a ``vjp`` closure, a compiled graph) holds the :class:`Semiring` itself; a copy
(pickle, deepcopy) is an equal, working semiring of its own, in this process or
another; and a semiring built anew by the same code on every call is equal to
the last one, so ``torch.compile`` reuses its graph.  Every test builds its
semirings inline, the way users do, and collects garbage before the result is
used.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import multiprocessing
import pickle
import weakref
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

from semiring_einsum import func
from semiring_einsum.func import _prepare

Tensor = torch.Tensor
EQ = "ij,jk->ik"


def _sum(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return x.sum(dims) if dims else x


def _amax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return x.amax(dims) if dims else x


def inline_real() -> func.Semiring:
    """The real semiring as a user writes it inline: a lambda, made anew on every call."""
    return func.Semiring(
        "myreal", add=torch.add, mul=torch.mul, sum=lambda x, d: x.sum(d) if d else x, zero=0, one=1
    )


def picklable_real() -> func.Semiring:
    """The real semiring from module-level functions (pickles by reference)."""
    return func.Semiring("myreal", add=torch.add, mul=torch.mul, sum=_sum, zero=0.0, one=1.0)


def scaled(c: float) -> func.Semiring:
    """⊗ = c·a·b: one closure, a different semiring for each ``c``."""
    return func.Semiring(
        "scaled", add=torch.add, mul=lambda a, b: c * a * b, sum=_sum, zero=0.0, one=1.0 / c
    )


def operands(requires_grad: bool = True) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=requires_grad)
    b = torch.randn(4, 2, dtype=torch.float64, generator=g)
    return a, b


def expected_grad_a(b: Tensor, scale: float = 1.0) -> Tensor:
    """d/dA of sum(scale · A @ B): every row is scale · B's row sums."""
    return scale * b.sum(1).expand(3, 4)


# ---------------------------------------------------------------- autograd
def test_inline_semiring_survives_until_backward() -> None:
    a, b = operands()
    out = func.semiring_einsum(inline_real(), EQ, a, b)
    gc.collect()
    out.sum().backward()
    torch.testing.assert_close(out, a.detach() @ b)
    torch.testing.assert_close(a.grad, expected_grad_a(b))


def test_inline_semiring_survives_double_backward() -> None:
    a, b = operands()
    out = func.semiring_einsum(scaled(2.0), EQ, a, b, block_size=2)
    (g,) = torch.autograd.grad((out**2).sum(), a, create_graph=True)
    gc.collect()
    (gg,) = torch.autograd.grad(g.sum(), a)
    # out = 2 A B, so d/dA sum(out²) = 8 (A B) Bᵀ, and d/dA of that's sum = 8 · 1 (B Bᵀ).
    torch.testing.assert_close(g, 8 * (a.detach() @ b) @ b.T)
    torch.testing.assert_close(gg, 8 * torch.ones(3, 4, dtype=b.dtype) @ (b @ b.T))


def test_the_semiring_dies_with_the_graph() -> None:
    """No cache of ours keeps a user semiring alive once nothing uses it."""
    a, b = operands()
    semiring = inline_real()
    alive = weakref.ref(semiring)
    out = func.semiring_einsum(semiring, EQ, a, b, block_size=2)
    del semiring
    gc.collect()
    assert alive() is not None  # the autograd graph holds it
    out.sum().backward()
    del out
    gc.collect()
    assert alive() is None


# ---------------------------------------------------------------- torch.func
def _loss(a: Tensor, b: Tensor) -> Tensor:
    return func.semiring_einsum(inline_real(), EQ, a, b, block_size=2).sum()


def test_grad_with_the_semiring_built_inside() -> None:
    a, b = operands(requires_grad=False)
    got = torch.func.grad(_loss)(a, b)
    torch.testing.assert_close(got, expected_grad_a(b))


def test_vjp_fn_called_later() -> None:
    a, b = operands(requires_grad=False)
    out, vjp_fn = torch.func.vjp(
        lambda a, b: func.semiring_einsum(scaled(3.0), EQ, a, b, block_size=2), a, b
    )
    gc.collect()
    cotangent = torch.ones_like(out)
    grad_a, grad_b = vjp_fn(cotangent)
    torch.testing.assert_close(out, 3 * a @ b)
    torch.testing.assert_close(grad_a, expected_grad_a(b, 3.0))
    torch.testing.assert_close(grad_b, 3 * a.T @ cotangent)
    again_a, _ = vjp_fn(2 * cotangent)  # a vjp_fn may be called again
    torch.testing.assert_close(again_a, 2 * grad_a)


def test_jvp_and_vmap_with_the_semiring_built_inside() -> None:
    a, b = operands(requires_grad=False)
    t = torch.ones_like(a)

    def f(a: Tensor) -> Tensor:
        return func.semiring_einsum(inline_real(), EQ, a, b, block_size=2)

    _, tangent = torch.func.jvp(f, (a,), (t,))
    torch.testing.assert_close(tangent, t @ b)
    batched = torch.func.vmap(f)(torch.stack([a, 2 * a]))
    torch.testing.assert_close(batched, torch.stack([a @ b, 2 * a @ b]))


# ---------------------------------------------------------------- copies
def test_pickle_round_trip_in_process() -> None:
    original = picklable_real()
    copied = pickle.loads(pickle.dumps(original))
    assert copied == original and copied is not original
    assert hash(copied) == hash(original)
    del original
    gc.collect()
    a, b = operands()
    out = func.semiring_einsum(copied, EQ, a, b, block_size=2)
    out.sum().backward()
    torch.testing.assert_close(out, a.detach() @ b)
    torch.testing.assert_close(a.grad, expected_grad_a(b))


def test_pickle_of_a_lambda_semiring_refuses_clearly() -> None:
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        pickle.dumps(inline_real())


def test_builtins_pickle_to_equal_semirings() -> None:
    for builtin in (func.REAL, func.LOG, func.MAX_PLUS, func.MIN_PLUS):
        assert pickle.loads(pickle.dumps(builtin)) == builtin


@pytest.mark.parametrize("copier", [copy.deepcopy, copy.copy], ids=["deepcopy", "copy"])
def test_copies_are_equal_working_semirings(copier: Callable[[object], object]) -> None:
    original = scaled(2.0)
    copied = copier(original)
    assert isinstance(copied, func.Semiring)
    assert copied == original and copied is not original
    a, b = operands()
    out = func.semiring_einsum(copied, EQ, a, b, block_size=2)
    out.sum().backward()
    torch.testing.assert_close(out, 2 * a.detach() @ b)
    torch.testing.assert_close(a.grad, expected_grad_a(b, 2.0))


def _in_a_child(payload: bytes) -> tuple[list[list[float]], list[list[float]]]:
    """Runs in a fresh process where other user semirings are live first."""
    live = [
        func.Semiring(f"max{i}", torch.maximum, torch.add, _amax, -math.inf, 0.0) for i in range(3)
    ]
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    for semiring in live:  # used, so that they are known to every cache
        func.semiring_einsum(semiring, EQ, x, x).sum().backward()
    x.grad = None
    semiring = pickle.loads(payload)
    out = func.semiring_einsum(semiring, EQ, x, x)
    out.sum().backward()
    assert x.grad is not None
    return out.tolist(), x.grad.tolist()


def test_pickled_semiring_in_a_spawned_process() -> None:
    payload = pickle.dumps(picklable_real())
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        values, grad = pool.apply(_in_a_child, (payload,))
    assert values == [[7.0, 10.0], [15.0, 22.0]]
    # d/dx sum(x @ x) = 1 xᵀ + xᵀ 1
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ones = torch.ones(2, 2)
    assert grad == (ones @ x.T + x.T @ ones).tolist()


# ---------------------------------------------------------------- value semantics
def test_equal_when_built_by_the_same_code() -> None:
    assert inline_real() == inline_real()
    assert hash(inline_real()) == hash(inline_real())
    assert scaled(2.0) != scaled(3.0)
    assert inline_real() != picklable_real()  # a different sum function
    assert dataclasses.replace(func.LOG) == func.LOG
    assert dataclasses.replace(func.LOG, name="other") != func.LOG
    assert func.REAL != func.LOG


def test_semirings_are_immutable() -> None:
    semiring = inline_real()
    with pytest.raises(dataclasses.FrozenInstanceError, match="immutable"):
        semiring.zero = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError, match="immutable"):
        del semiring.add


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name=3), "name must be a str"),
        (dict(add="max"), "add must be callable"),
        (dict(sum=None), "sum must be callable"),
        (dict(zero="0"), "zero must be a Python int or float"),
        (dict(one=True), "one must be a Python int or float"),
    ],
)
def test_bad_fields_are_named(kwargs: dict[str, object], message: str) -> None:
    fields = dict(name="s", add=torch.add, mul=torch.mul, sum=_sum, zero=0.0, one=1.0)
    fields.update(kwargs)
    with pytest.raises(TypeError, match=message):
        func.Semiring(**fields)  # type: ignore[arg-type]


def test_fresh_semirings_do_not_grow_our_caches() -> None:
    func.clear_caches()
    a, b = operands(requires_grad=False)
    for _ in range(20):
        func.semiring_einsum(inline_real(), EQ, a, b, block_size=2)
    assert len(_prepare._SEEN) == 1


# ---------------------------------------------------------------- torch.compile
@pytest.fixture
def fresh_dynamo():  # type: ignore[no-untyped-def]
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def compiled_contraction(backend: str) -> Callable[[func.Semiring, Tensor, Tensor], Tensor]:
    """A compiled function that takes the semiring as an argument."""
    return torch.compile(
        lambda s, a, b: func.semiring_einsum(s, EQ, a, b, block_size=2),
        backend=backend,
        fullgraph=True,
    )


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_with_a_new_semiring_per_call(backend: str) -> None:
    compiled = compiled_contraction(backend)
    calls = []
    for _ in range(12):  # more than Dynamo's recompile limit (8)
        a, b = operands()
        calls.append((compiled(inline_real(), a, b), a, b))
    gc.collect()  # every semiring passed in is gone but for what the graphs hold
    for out, a, b in calls:
        out.sum().backward()
        torch.testing.assert_close(out, a.detach() @ b)
        torch.testing.assert_close(a.grad, expected_grad_a(b))
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_tells_different_semirings_apart() -> None:
    """Semirings that differ only in a closure's contents get graphs of their own."""
    compiled = compiled_contraction("aot_eager")
    a, b = operands(requires_grad=False)
    for c in (2.0, 3.0, 2.0):
        torch.testing.assert_close(compiled(scaled(c), a, b), c * a @ b)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_graph_holds_its_semiring() -> None:
    """A semiring given once to a compiled function stays usable by its graph."""
    compiled = compiled_contraction("eager")
    a, b = operands()
    compiled(scaled(2.0), a, b)
    gc.collect()
    out = compiled(scaled(2.0), a, b)  # an equal semiring: the cached graph runs
    gc.collect()
    out.sum().backward()
    torch.testing.assert_close(a.grad, expected_grad_a(b, 2.0))
