"""torch.compile (issue 3): every differentiable op compiles as one graph node.

CPU only, tiny float32 shapes.  Most cases use the ``aot_eager`` backend
(Dynamo + AOTAutograd, which is where our autograd Functions are traced);
a few key ones use the default inductor backend.  Each test starts from a
fresh Dynamo (``torch._dynamo.reset()``, counters cleared) and asserts that
there were no graph breaks.

Known PyTorch 2.13 limitations documented here:

* ``torch.compile(torch.func.grad(f))`` differentiates the traced forward
  instead of calling our backward (pytorch/pytorch#193279): only the values
  are checked.
* ``torch.func.grad(torch.compile(f))``: Dynamo cannot trace a frame entered
  under an eager functorch transform (pytorch/pytorch#128711; even
  ``torch.sin`` raises with ``fullgraph=True``), so this runs without
  ``fullgraph`` and only the values are checked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from torch.func import grad, jacfwd, jvp, vmap

import semiring_einsum
from matrix import pick
from oracle import brute, brute_viterbi, joint
from semiring_einsum import func
from semiring_einsum.func import _engine

Tensor = torch.Tensor
EQ = "ij,jk->ik"
TOL = {"rtol": 1e-5, "atol": 1e-5}  # compiled vs eager, float32
ORACLE_TOL = {"rtol": 1e-4, "atol": 1e-4}  # float32 vs the float64 oracle

USER_LOG = dataclasses.replace(func.LOG)
USER_MAX = func.Semiring(
    "user_max",
    add=torch.maximum,
    mul=torch.add,
    sum=lambda x, dims: x.amax(dims) if dims else x,
    zero=-math.inf,
    one=0.0,
)
_C = torch.linspace(-1.0, 1.0, 4)  # the constant third operand of real_joint

Fn = Callable[[Tensor, Tensor], Any]


def _oracle(semiring: str, equation: str = EQ, *extra: Tensor) -> Fn:
    return lambda a, b: brute(semiring, equation, a, b, *extra).float()


# name: (op of (a, b), oracle of (a, b), in-graph entry point)
VARIANTS: dict[str, tuple[Fn, Fn, Callable[..., Any]]] = {
    "real": (
        lambda a, b: func.einsum(EQ, a, b, block_size=2),
        _oracle("real"),
        _engine.contract,
    ),
    "real_joint": (
        lambda a, b: func.einsum("ij,jk,k->ik", a, b, _C, optimize=False, block_size=2),
        _oracle("real", "ij,jk,k->ik", _C),
        _engine.contract,
    ),
    "log": (
        lambda a, b: func.log_einsum(EQ, a, b, block_size=2),
        _oracle("log"),
        _engine.contract,
    ),
    "log_policy": (
        lambda a, b: func.log_einsum(EQ, a, b, block_size=2, grad_of_neg_inf="uniform"),
        _oracle("log"),
        _engine.contract,
    ),
    "max": (
        lambda a, b: func.max_einsum(EQ, a, b, block_size=2),
        _oracle("max"),
        _engine.contract,
    ),
    "min": (
        lambda a, b: func.min_einsum(EQ, a, b, block_size=2),
        _oracle("min"),
        _engine.contract,
    ),
    "viterbi": (
        lambda a, b: func.viterbi_einsum(EQ, a, b, block_size=2),
        lambda a, b: tuple(
            t.float() if t.is_floating_point() else t for t in brute_viterbi(EQ, a, b)
        ),
        _engine.contract,
    ),
    "user_log": (
        lambda a, b: func.semiring_einsum(USER_LOG, EQ, a, b, block_size=2),
        _oracle("log"),
        _engine.contract,
    ),
    "user_max": (
        lambda a, b: func.semiring_einsum(USER_MAX, EQ, a, b, block_size=2),
        _oracle("max"),
        _engine.contract,
    ),
    "top_real": (
        lambda a, b: semiring_einsum.einsum(EQ, a, b, block_size=2),
        _oracle("real"),
        _engine.contract,
    ),
    "top_log": (
        lambda a, b: semiring_einsum.log_einsum(EQ, a, b, block_size=2),
        _oracle("log"),
        _engine.contract,
    ),
}
ALL = list(VARIANTS)
TROPICAL = {"max", "min", "viterbi", "user_max"}


def values(name: str) -> Fn:
    """The differentiable output only (Viterbi's values)."""
    op = VARIANTS[name][0]
    if name == "viterbi":
        return lambda a, b: op(a, b)[0]
    return op


def _tie_free(equation: str, *xs: Tensor, gap: float = 1e-3) -> bool:
    tensors, output, summed, size = joint(equation, *xs)
    full = [size[c] for c in output + summed]
    terms = sum(t.expand(full) for t in tensors).reshape([size[c] for c in output] + [-1])
    top = terms.sort(dim=-1).values
    return terms.shape[-1] < 2 or bool((top[..., 1:] - top[..., :-1]).min() > gap)


def operands(i: int = 3, j: int = 5, k: int = 4, batch: int = 0) -> tuple[Tensor, Tensor]:
    """Float32 operands whose max-plus terms are tie-free (each example, if batched)."""
    for seed in range(1000):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn((batch, i, j) if batch else (i, j), generator=g) * 2
        b = torch.randn(j, k, generator=g) * 2
        if all(_tie_free(EQ, x, b) for x in (a if batch else [a])):
            return a, b
    raise AssertionError("no tie-free data found")  # pragma: no cover


def weight(shape: torch.Size) -> Tensor:
    return torch.linspace(-1.0, 2.0, math.prod(shape)).reshape(shape)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    try:
        yield
    finally:
        torch._dynamo.reset()
        counters.clear()


def no_graph_breaks() -> None:
    assert not counters["graph_break"], dict(counters["graph_break"])


class Recording:
    """A backend that keeps Dynamo's graphs, then hands them to ``aot_eager``."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.inner = lookup_backend("aot_eager")

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)

    def targets(self) -> list[Any]:
        """Each call's target; an opaque (``nonstrict_trace``) call by the name of its function."""
        return [
            _opaque_name(n) or n.target
            for gm in self.graphs
            for n in gm.graph.nodes
            if n.op == "call_function"
        ]


def _opaque_name(node: torch.fx.Node) -> str | None:
    """The function a ``nonstrict_trace`` call node runs, by name (its callable's attribute)."""
    callable_attr = node.args[0] if node.args else None
    if isinstance(callable_attr, torch.fx.Node) and callable_attr.op == "get_attr":
        name = str(callable_attr.target)
        if name.endswith("_callable"):
            return name.removesuffix("_callable")
    return None


def close(got: Any, want: Any, tol: dict[str, float] = TOL) -> None:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if g.is_floating_point():
            torch.testing.assert_close(g, w, **tol)
        else:
            assert g.dtype == w.dtype and torch.equal(g, w)


# ------------------------------------------------------------------- forward
@pytest.mark.parametrize(
    "name", pick(ALL, "log", "log_policy", "real_joint", "viterbi", "user_max")
)
def test_forward_is_one_node(name: str) -> None:
    op, oracle, entry = VARIANTS[name]
    a, b = operands()
    backend = Recording()
    compiled = torch.compile(op, fullgraph=True, backend=backend)
    got = compiled(a, b)
    no_graph_breaks()
    close(got, op(a, b))
    close(got, oracle(a, b), ORACLE_TOL)
    assert backend.targets().count(entry.__name__) == 1, backend.targets()
    got = compiled(a, b)  # the cached graph
    close(got, op(a, b))


@pytest.mark.full  # inductor: seconds of code generation per process
@pytest.mark.parametrize("name", ["log", "viterbi", "user_max"])
def test_forward_inductor(name: str) -> None:
    op, oracle, _ = VARIANTS[name]
    a, b = operands()
    got = torch.compile(op, fullgraph=True)(a, b)
    no_graph_breaks()
    close(got, op(a, b))
    close(got, oracle(a, b), ORACLE_TOL)


# ------------------------------------------------------------ training step
def _training_step(name: str, backend: str) -> None:
    f = values(name)
    a, b = operands()
    w = weight(torch.Size([3, 4]))

    def step(x: Tensor, y: Tensor) -> Tensor:
        return (f(x, y) * w).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    xs = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    loss = compiled(*xs)
    loss.backward()
    no_graph_breaks()
    ref = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    want = step(*ref)
    want.backward()
    close(loss.detach(), want.detach())
    close([x.grad for x in xs], [x.grad for x in ref])
    if name in TROPICAL:  # and against the oracle (tie-free data)
        o = [a.double().requires_grad_(), b.double().requires_grad_()]
        (brute("max" if name != "min" else "min", EQ, *o) * w.double()).sum().backward()
        close([x.grad for x in xs], [x.grad.float() for x in o], ORACLE_TOL)


@pytest.mark.parametrize("name", pick(ALL, "log", "max", "user_log", "top_real"))
def test_training_step(name: str) -> None:
    _training_step(name, "aot_eager")


@pytest.mark.parametrize("name", pick(["log", "user_log", "real_joint"], "log"))
def test_training_step_inductor(name: str) -> None:
    _training_step(name, "inductor")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(5, 4, generator=g))
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: Tensor) -> Tensor:
        return func.log_einsum("bj,jk->bk", x, self.weight, block_size=2) + self.bias


def test_compiled_module_with_optimizer_matches_eager() -> None:
    x, _ = operands(6, 5)
    y = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    models = [Tiny(), Tiny()]
    compiled = torch.compile(models[0], fullgraph=True, backend="aot_eager")
    for model, run in zip(models, [compiled, models[1]]):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            ((run(x) - y) ** 2).mean().backward()
            opt.step()
    no_graph_breaks()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, **TOL)


# ------------------------------------------------------------------- vmap
@pytest.mark.parametrize("name", pick(ALL, "log", "viterbi", "user_max"))
def test_compile_of_vmap(name: str) -> None:
    """The explicit vmap rule is ignored under compile: the forward is vmapped."""
    op, oracle, _ = VARIANTS[name]
    a, b = operands(batch=4)
    compiled = torch.compile(vmap(op, in_dims=(0, None)), fullgraph=True, backend="aot_eager")
    got = compiled(a, b)
    no_graph_breaks()
    close(got, vmap(op, in_dims=(0, None))(a, b))
    want = [oracle(x, b) for x in a]
    close(
        got, tuple(torch.stack(t) for t in zip(*want)) if name == "viterbi" else torch.stack(want)
    )


@pytest.mark.full  # inductor: seconds of code generation per process
def test_compile_of_vmap_inductor() -> None:
    op, oracle, _ = VARIANTS["log"]
    a, b = operands(batch=4)
    bb = torch.stack([b, b.flip(0), b * 0.5])
    compiled = torch.compile(vmap(vmap(op, in_dims=(0, None)), in_dims=(None, 0)), fullgraph=True)
    got = compiled(a, bb)
    no_graph_breaks()
    close(got, torch.stack([torch.stack([oracle(x, y) for x in a]) for y in bb]), ORACLE_TOL)


# -------------------------------------------------- grad and compile, mixed
GRAD_CASES = ["log", "max", "viterbi", "user_log", "user_max", "real_joint"]


def _eager_grads(f: Fn, a: Tensor, b: Tensor) -> Any:
    w = weight(torch.Size([3, 4]))
    return grad(lambda x, y: (f(x, y) * w).sum(), argnums=(0, 1))(a, b)


@pytest.mark.parametrize("name", pick(GRAD_CASES, "log", "viterbi", "user_max"))
def test_grad_of_compiled(name: str) -> None:
    """``func.grad(torch.compile(f))`` (no fullgraph: see the module docstring)."""
    f = values(name)
    a, b = operands()
    w = weight(torch.Size([3, 4]))
    compiled = torch.compile(f, backend="aot_eager")
    got = grad(lambda x, y: (compiled(x, y) * w).sum(), argnums=(0, 1))(a, b)
    close(got, _eager_grads(f, a, b))


@pytest.mark.parametrize("name", pick(GRAD_CASES, "max", "user_log", "real_joint"))
def test_compile_of_grad_values(name: str) -> None:
    """PyTorch 2.13 limitation: ``torch.compile(torch.func.grad(f))`` traces and
    differentiates our forward instead of calling our backward (#193279).  The
    values must still be right; nothing is asserted about memory."""
    f = values(name)
    a, b = operands()
    w = weight(torch.Size([3, 4]))
    g = grad(lambda x, y: (f(x, y) * w).sum(), argnums=(0, 1))
    got = torch.compile(g, fullgraph=True, backend="aot_eager")(a, b)
    no_graph_breaks()
    close(got, _eager_grads(f, a, b))


# ----------------------------------------------------------- recompilation
SHAPES = [(3, 5, 4), (4, 6, 2), (2, 3, 3), (5, 7, 6)]


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize(
    "name", pick(["log", "viterbi", "user_log", "user_max"], "log", "user_max")
)
def test_changing_shapes(name: str, dynamic: bool | None) -> None:
    op, oracle, _ = VARIANTS[name]
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for i, j, k in SHAPES + SHAPES[:1]:
        a, b = operands(i, j, k)
        got = compiled(a, b)
        close(got, op(a, b))
        close(got, oracle(a, b), ORACLE_TOL)
    no_graph_breaks()


@pytest.mark.parametrize("name", pick(["log", "max", "user_log"], "max"))
def test_changing_block_size(name: str) -> None:
    """One compiled function called with different block sizes (an int argument)."""
    fns: dict[str, Callable[..., Tensor]] = {
        "log": func.log_einsum,
        "max": func.max_einsum,
        "user_log": lambda *xs, **kw: func.semiring_einsum(USER_LOG, *xs, **kw),
    }
    op = fns[name]
    compiled = torch.compile(
        lambda x, y, bs: op(EQ, x, y, block_size=bs), fullgraph=True, backend="aot_eager"
    )
    a, b = operands()
    for bs in (1, 2, 3, 2, None):
        close(compiled(a, b, bs), op(EQ, a, b, block_size=bs))
    no_graph_breaks()


def test_user_semirings_under_compile() -> None:
    """The semiring is an argument of the compiled function: each one is right."""
    compiled = torch.compile(
        lambda s, x, y: func.semiring_einsum(s, EQ, x, y, block_size=2),
        fullgraph=True,
        backend="aot_eager",
    )
    a, b = operands()
    for s, kind in [(USER_LOG, "log"), (USER_MAX, "max"), (USER_LOG, "log"), (func.LOG, "log")]:
        close(compiled(s, a, b), _oracle(kind)(a, b), ORACLE_TOL)
    no_graph_breaks()


# ------------------------------------------------------ eager is unaffected
def _eager_snapshot(a: Tensor, b: Tensor) -> list[Any]:
    out: list[Any] = []
    for name in ALL:
        f = values(name)
        out.append(VARIANTS[name][0](a, b))
        out.append(_eager_grads(f, a, b))
        out.append(jvp(f, (a, b), (a.flip(0), b.flip(1))))
    return out


def test_eager_results_unchanged_after_compiling() -> None:
    a, b = operands()
    before = _eager_snapshot(a, b)
    # forward and a training step
    for name in pick(["log", "viterbi", "user_log", "real_joint"], "log", "viterbi"):
        torch._dynamo.reset()
        f = values(name)
        torch.compile(VARIANTS[name][0], fullgraph=True, backend="aot_eager")(a, b)
        x = a.clone().requires_grad_()
        torch.compile(lambda x, f=f: f(x, b).sum(), fullgraph=True, backend="aot_eager")(
            x
        ).backward()
    after = _eager_snapshot(a, b)
    for x, y in zip(before, after):
        for u, v in zip(
            torch.utils._pytree.tree_leaves(x), torch.utils._pytree.tree_leaves(y), strict=True
        ):
            assert torch.equal(u, v)
    # eager forward mode still uses the Functions with a jvp (and its guard)
    with pytest.raises(NotImplementedError, match="hessian"):
        jacfwd(jacfwd(lambda x: func.log_einsum(EQ, x, b, block_size=2)))(a)


def test_log_blas_relayout_under_compile() -> None:
    """The log BLAS operator with an operand copied into another layout (its fake shapes too)."""
    equation = "abcdefg,ceh->abdfgh"
    g = torch.Generator().manual_seed(12)
    a = torch.randn(4, 4, 4, 4, 4, 4, 16, generator=g, requires_grad=True)
    b = torch.randn(4, 4, 2, generator=g, requires_grad=True)
    (step,) = func.plan(equation, a, b, semiring=func.LOG).steps
    assert step.kernel.name == "log_blas"

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return (func.log_einsum(equation, x, y) * 0.5).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(a, b), (a, b))
    want = torch.autograd.grad(loss(a, b), (a, b))
    for gk, wk in zip(got, want, strict=True):
        close(gk, wk)
    no_graph_breaks()
