"""torch.func conformance (issue 3): every differentiable op under every transform.

Each case applies one ``torch.func`` (or autograd) transform to one of our ops
and to a plain-torch float64 oracle (:mod:`oracle`: ``torch.logsumexp`` /
``amax`` / ``amin`` / sums over a broadcast joint tensor) and compares.  The
ops ("variants") cover both layers and every semiring family:

* ``real`` (pairwise, BLAS steps), ``real_joint`` (three operands in one
  blocked step: the real autograd rule), ``log``, ``log_policy`` (the joint
  path with a ``grad_of_neg_inf`` weight), ``max``, ``min``, ``viterbi`` and
  ``viterbi_pairwise`` (their values; joint and pairwise plans), ``user_log``
  (``dataclasses.replace(func.LOG)``: the generic rule) and ``user_max`` (a
  tropical user semiring);
* the top-level ``semiring_einsum.einsum`` / ``semiring_einsum.log_einsum``.

Every case runs with the vmap fallback disabled (so no hidden per-example loop
can make a vmap pass), checks that the inputs are bit-identical afterwards and
that no result shares storage with an input.  Tropical data is tie-free: the
terms of each output cell are at least ``GAP`` apart.

Forward-over-forward (``jacfwd(jacfwd)``, ``jvp(jvp)``) through our autograd
Functions must raise ``NotImplementedError`` (PyTorch returns wrong numbers
there, pytorch/pytorch#197867); it is never allowed to return numbers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import (
    functional_call,
    grad,
    hessian,
    jacfwd,
    jacrev,
    jvp,
    linearize,
    stack_module_state,
    vjp,
    vmap,
)
from torch.utils._pytree import tree_leaves

import semiring_einsum
from oracle import brute, brute_viterbi, joint
from semiring_einsum import func
from semiring_einsum.func import _autograd, _rules

Tensor = torch.Tensor
F64 = torch.float64
GAP = 1e-4  # smallest distance between two terms of one tropical output cell
TOL = {"rtol": 1e-7, "atol": 1e-7}

USER_LOG = dataclasses.replace(func.LOG)  # not the built-in: the user-semiring rule
USER_MAX = func.Semiring(
    "user_max",
    add=torch.maximum,
    mul=torch.add,
    sum=lambda x, dims: x.amax(dims) if dims else x,
    zero=-math.inf,
    one=0.0,
)

EQ = "ij,jk->ik"  # the matrix's equation: a (3, 5), b (5, 4); block_size=2 -> windows 2, 2, 1
NI, NJ, NK, NB = 3, 5, 4, 6  # NB: the vmap batch


# ------------------------------------------------------------------- variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """One public op, as ``call(equation, *operands)``."""

    name: str
    call: Callable[..., Tensor]
    semiring: str  # the oracle's: real, log, max or min
    rule: bool  # runs through our autograd Functions (else only torch ops)
    eq: str = EQ
    extra: tuple[Tensor, ...] = ()  # constant operands after a and b

    @property
    def tropical(self) -> bool:
        return self.semiring in ("max", "min")

    def ours(self) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda a, b: self.call(self.eq, a, b, *self.extra)

    def oracle(self) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda a, b: brute(self.semiring, self.eq, a, b, *self.extra)

    def oracle_call(self, eq: str, *xs: Tensor) -> Tensor:
        return brute(self.semiring, eq, *xs)


_C = torch.randn(NK, generator=torch.Generator().manual_seed(99), dtype=F64)

VARIANTS = {
    v.name: v
    for v in [
        Variant("real", lambda e, *xs: func.einsum(e, *xs, block_size=2), "real", False),
        Variant(
            "real_joint",
            lambda e, *xs: func.einsum(e, *xs, optimize=False, block_size=2),
            "real",
            True,
            eq="ij,jk,k->ik",
            extra=(_C,),
        ),
        Variant("log", lambda e, *xs: func.log_einsum(e, *xs, block_size=2), "log", True),
        Variant(
            "log_policy",
            lambda e, *xs: func.log_einsum(e, *xs, block_size=2, grad_of_neg_inf=0.0),
            "log",
            True,
        ),
        Variant("max", lambda e, *xs: func.max_einsum(e, *xs, block_size=2), "max", True),
        Variant("min", lambda e, *xs: func.min_einsum(e, *xs, block_size=2), "min", True),
        Variant(
            "viterbi",
            lambda e, *xs: func.viterbi_einsum(e, *xs, block_size=2)[0],
            "max",
            True,
        ),
        Variant(
            "viterbi_pairwise",
            lambda e, *xs: func.viterbi_einsum(e, *xs, block_size=2, optimize="auto")[0],
            "max",
            True,
        ),
        Variant(
            "user_log",
            lambda e, *xs: func.semiring_einsum(USER_LOG, e, *xs, block_size=2),
            "log",
            True,
        ),
        Variant(
            "user_max",
            lambda e, *xs: func.semiring_einsum(USER_MAX, e, *xs, block_size=2),
            "max",
            True,
        ),
        Variant(
            "top_real",
            lambda e, *xs: semiring_einsum.einsum(e, *xs, block_size=2),
            "real",
            False,
        ),
        Variant(
            "top_log",
            lambda e, *xs: semiring_einsum.log_einsum(e, *xs, block_size=2),
            "log",
            True,
        ),
    ]
}
ALL = list(VARIANTS)
SMOOTH = [n for n, v in VARIANTS.items() if not v.tropical]
TROPICAL = [n for n, v in VARIANTS.items() if v.tropical]
RULED = [n for n, v in VARIANTS.items() if v.rule]


# ----------------------------------------------------------------------- data
def tie_free(equation: str, *xs: Tensor, gap: float = GAP) -> bool:
    """Whether the terms of every output cell are at least ``gap`` apart."""
    tensors, output, summed, size = joint(equation, *xs)
    full = [size[c] for c in output + summed]
    terms = sum(t.expand(full) for t in tensors).reshape([size[c] for c in output] + [-1])
    if terms.shape[-1] < 2:
        return True
    top = terms.sort(dim=-1).values
    return bool((top[..., 1:] - top[..., :-1]).min() > gap)


# Equations for one tensor passed several times.  ("ij,jk,kl->il" would have
# structural max-plus ties on its diagonal: the terms (j, k) = (i, m) and (m, i).)
SAME = [("ij,jk->ik", 2), ("ij,jk,kl->ik", 3)]


@dataclasses.dataclass(frozen=True)
class Data:
    a: Tensor  # (NI, NJ)
    b: Tensor  # (NJ, NK)
    ab: Tensor  # (NB, NI, NJ): a batch of a
    bb: Tensor  # (NB, NJ, NK): a batch of b
    s: Tensor  # (NJ, NJ): passed several times
    w: Tensor  # (NI, NK): cotangent / loss weight
    w2: Tensor  # (NI, NK): a second cotangent
    wb: Tensor  # (NB, NI, NK): a batched cotangent
    ta: Tensor  # tangents of a and b
    tb: Tensor
    ta2: Tensor
    tb2: Tensor


@functools.cache
def data() -> Data:
    """Fixed float64 data; every (a-like, b-like) pair used below is tie-free."""
    for seed in range(1000):
        g = torch.Generator().manual_seed(seed)

        def r(*shape: int, g: torch.Generator = g) -> Tensor:
            return torch.randn(shape, generator=g, dtype=F64) * 2

        a, b, ab, bb, s = r(NI, NJ), r(NJ, NK), r(NB, NI, NJ), r(NB, NJ, NK), r(NJ, NJ)
        lefts, rights = [a, *ab], [b, *bb]
        if not all(tie_free(EQ, x, y) for x in lefts for y in rights):
            continue
        if not all(tie_free(e, *[x] * n) for x in (s, s.T) for e, n in SAME):
            continue
        return Data(a, b, ab, bb, s, *(r(*t) for t in [(NI, NK), (NI, NK), (NB, NI, NK)]),
                    *(r(*t) for t in [(NI, NJ), (NJ, NK), (NI, NJ), (NJ, NK)]))  # fmt: skip
    raise AssertionError("no tie-free data found")  # pragma: no cover


def fields(obj: Any) -> list[Any]:
    """A dataclass's field values themselves (``dataclasses.astuple`` deep-copies)."""
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]


# ---------------------------------------------------------------- assertions
def close(got: Any, want: Any) -> None:
    gl, wl = tree_leaves(got), tree_leaves(want)
    assert len(gl) == len(wl), (len(gl), len(wl))
    for g, w in zip(gl, wl):
        assert isinstance(g, Tensor) and isinstance(w, Tensor)
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        torch.testing.assert_close(g, w, **TOL)


def _bits(x: Tensor) -> Tensor:
    return x.detach().clone().view(torch.int64) if x.dtype == F64 else x.detach().clone()


@contextlib.contextmanager
def pure(*xs: Tensor) -> Iterator[None]:
    """Inputs bit-identical (and version counters untouched) across the block."""
    snaps = [(_bits(x), x._version) for x in xs]
    yield
    for x, (bits, version) in zip(xs, snaps):
        assert torch.equal(_bits(x), bits), "an input was modified"
        assert x._version == version, "an input was written to"


def _storage(x: Tensor) -> int:
    return x.untyped_storage().data_ptr()


def assert_fresh(outs: Any, ins: Any) -> None:
    """No result shares storage with an input."""
    taken = {_storage(x) for x in tree_leaves(ins) if isinstance(x, Tensor) and x.numel()}
    for out in tree_leaves(outs):
        if isinstance(out, Tensor) and out.numel():
            assert _storage(out) not in taken, "a result shares storage with an input"


@pytest.fixture(autouse=True)
def no_vmap_fallback() -> Iterator[None]:
    """Ops without a batching rule raise instead of looping over the batch."""
    before = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(before)


# ----------------------------------------------------------------- transforms
Fn = Callable[[Tensor, Tensor], Tensor]


def loss(f: Fn, d: Data) -> Fn:
    return lambda a, b: (f(a, b) * d.w).sum()


def _backward(f: Fn, d: Data) -> Any:
    a, b = d.a.detach().requires_grad_(), d.b.detach().requires_grad_()
    out = f(a, b)
    out.backward(d.w)
    return out.detach(), a.grad, b.grad


def _vjp(argnums: tuple[int, ...]) -> Callable[[Fn, Data], Any]:
    def run(f: Fn, d: Data) -> Any:
        def g(*sub: Tensor) -> Tensor:
            args = [d.a, d.b]
            for i, x in zip(argnums, sub):
                args[i] = x
            return f(*args)

        out, vjp_fn = vjp(g, *[(d.a, d.b)[i] for i in argnums])
        return out, vjp_fn(d.w), vjp_fn(d.w2)  # the pullback, called twice

    return run


def _forward_ad(f: Fn, d: Data) -> Any:
    with fwAD.dual_level():
        out = f(fwAD.make_dual(d.a, d.ta), fwAD.make_dual(d.b, d.tb))
        primal, tangent = fwAD.unpack_dual(out)
        return primal.clone(), tangent.clone()


def _linearize(f: Fn, d: Data) -> Any:
    out, jvp_fn = linearize(f, d.a, d.b)
    return out, jvp_fn(d.ta, d.tb), jvp_fn(d.ta2, d.tb2)


def _vmap_backward(f: Fn, d: Data) -> Any:
    ab, b = d.ab.detach().requires_grad_(), d.b.detach().requires_grad_()
    out = vmap(f, in_dims=(0, None))(ab, b)
    out.backward(d.wb)
    return out.detach(), ab.grad, b.grad


def _grad_vmap(f: Fn, d: Data) -> Any:
    return grad(lambda x, y: (vmap(f, in_dims=(0, None))(x, y) * d.wb).sum(), argnums=(0, 1))(
        d.ab, d.b
    )


def _nested_mixed(f: Fn, d: Data) -> Any:
    # outer over b's batch, inner over a's; then a (2, 3)-batch of a against 2 b's
    first = vmap(vmap(f, in_dims=(0, None)), in_dims=(None, 0))(d.ab, d.bb)
    a2 = d.ab.reshape(2, NB // 2, NI, NJ)
    second = vmap(vmap(f, in_dims=(0, None)), in_dims=(0, 0))(a2, d.bb[:2])
    return first, second


FIRST_ORDER: dict[str, Callable[[Fn, Data], Any]] = {
    "call": lambda f, d: f(d.a, d.b),
    "backward": _backward,
    "grad0": lambda f, d: grad(loss(f, d), argnums=0)(d.a, d.b),
    "grad1": lambda f, d: grad(loss(f, d), argnums=1)(d.a, d.b),
    "grad01": lambda f, d: grad(loss(f, d), argnums=(0, 1))(d.a, d.b),
    "vjp0": _vjp((0,)),
    "vjp1": _vjp((1,)),
    "vjp01": _vjp((0, 1)),
    "jvp": lambda f, d: jvp(f, (d.a, d.b), (d.ta, d.tb)),
    "jvp_one_tangent": lambda f, d: jvp(lambda x: f(x, d.b), (d.a,), (d.ta,)),
    "jacrev": lambda f, d: jacrev(f, argnums=(0, 1))(d.a, d.b),
    "jacfwd": lambda f, d: jacfwd(f, argnums=(0, 1))(d.a, d.b),
    "hessian": lambda f, d: hessian(loss(f, d), argnums=(0, 1))(d.a, d.b),
    "vmap_00": lambda f, d: vmap(f)(d.ab, d.bb),
    "vmap_0N": lambda f, d: vmap(f, in_dims=(0, None))(d.ab, d.b),
    "vmap_N0": lambda f, d: vmap(f, in_dims=(None, 0))(d.a, d.bb),
    "vmap_1N_out1": lambda f, d: vmap(f, in_dims=(1, None), out_dims=1)(d.ab.movedim(0, 1), d.b),
    "vmap_batch1": lambda f, d: vmap(f)(d.ab[:1], d.bb[:1]),
    "vmap_nested_mixed": _nested_mixed,
    "vmap_chunk2": lambda f, d: vmap(f, chunk_size=2)(d.ab, d.bb),
    "vmap_grad": lambda f, d: vmap(grad(loss(f, d), argnums=(0, 1)), in_dims=(0, None))(d.ab, d.b),
    "grad_vmap": _grad_vmap,
    "vmap_jacrev": lambda f, d: vmap(jacrev(f, argnums=(0, 1)), in_dims=(None, 0))(d.a, d.bb),
    "vmap_jacfwd": lambda f, d: vmap(jacfwd(f, argnums=(0, 1)), in_dims=(0, None))(d.ab, d.b),
    "vmap_hessian": lambda f, d: vmap(hessian(loss(f, d), argnums=(0, 1)))(d.ab, d.bb),
    "vmap_vmap_grad": lambda f, d: vmap(vmap(grad(loss(f, d)), in_dims=(0, None)), (None, 0))(
        d.ab, d.bb
    ),
    "vmap_then_backward": _vmap_backward,
    "forward_ad": _forward_ad,
    "linearize": _linearize,
    "autograd_jacobian_vectorized": lambda f, d: torch.autograd.functional.jacobian(
        f, (d.a, d.b), vectorize=True
    ),
    "autograd_hessian_forward_mode": lambda f, d: torch.autograd.functional.hessian(
        loss(f, d), (d.a, d.b), vectorize=True, outer_jacobian_strategy="forward-mode"
    ),
    "grad_under_no_grad": lambda f, d: _under(torch.no_grad(), grad(loss(f, d)), d),
    "call_under_inference_mode": lambda f, d: _under(torch.inference_mode(), f, d),
}
HESSIANS = {"hessian", "vmap_hessian", "autograd_hessian_forward_mode"}
# torch.func.linearize warns on every call in torch 2.13 (its make_fx graph inserts
# a get_attr node for a tensor constant), even for ``torch.sin``: filter only that.
_LINEARIZE_WARNING = pytest.mark.filterwarnings(
    "ignore:Attempted to insert a get_attr Node with no underlying reference:UserWarning"
)


def _transform_params(names: list[str]) -> list[Any]:
    return [pytest.param(t, marks=_LINEARIZE_WARNING) if t == "linearize" else t for t in names]


def _under(mode: Any, f: Callable[..., Any], d: Data) -> Any:
    with mode:
        out = f(d.a, d.b)
    return out.clone()  # (an inference tensor cannot be compared outside the mode)


@pytest.mark.parametrize("transform", _transform_params(list(FIRST_ORDER)))
@pytest.mark.parametrize("name", ALL)
def test_first_order_matrix(name: str, transform: str) -> None:
    v, d = VARIANTS[name], data()
    run = FIRST_ORDER[transform]
    inputs = fields(d)
    with pure(*inputs):
        got = run(v.ours(), d)
    want = run(v.oracle(), d)
    close(got, want)
    assert_fresh(got, inputs)
    if v.tropical and transform in HESSIANS:  # piecewise linear: second derivative 0 a.e.
        assert all((h == 0).all() for h in tree_leaves(got))


@_LINEARIZE_WARNING
@pytest.mark.parametrize("name", ["log", "max", "user_log", "real_joint"])
def test_linearize_jvp_fn_is_reusable(name: str) -> None:
    """The function ``linearize`` returns is linear and can be called many times.

    (``linearize`` traces the jvp with make_fx and constant-folds everything that
    does not depend on the tangents; an in-place op in a forward that mutates such
    a folded constant then changes it on every call.)
    """
    v, d = VARIANTS[name], data()
    _, jvp_fn = linearize(v.ours(), d.a, d.b)
    first = jvp_fn(d.ta, d.tb)
    for scale in (1.0, 2.0, -1.0):
        close(jvp_fn(scale * d.ta, scale * d.tb), scale * first)
    want = jvp(v.oracle(), (d.a, d.b), (d.ta, d.tb))[1]
    close(jvp_fn(d.ta, d.tb), want)


# -------------------------------------------------------------- second order
def _grad_grad(f: Fn, d: Data) -> Any:
    inner = grad(loss(f, d), argnums=0)
    return grad(lambda x, y: (inner(x, y) * d.ta).sum(), argnums=(0, 1))(d.a, d.b)


def _double_backward(f: Fn, d: Data) -> Any:
    a, b = d.a.detach().requires_grad_(), d.b.detach().requires_grad_()
    ga, gb = torch.autograd.grad(loss(f, d)(a, b), (a, b), create_graph=True)
    total = (ga * d.ta).sum() + (gb * d.tb).sum()
    if not total.requires_grad:  # tropical: the gradient is constant in a and b
        return torch.zeros_like(a), torch.zeros_like(b)
    return torch.autograd.grad(total, (a, b), allow_unused=True, materialize_grads=True)


def _vjp_of_vjp(f: Fn, d: Data) -> Any:
    def pulled(x: Tensor) -> Any:
        return vjp(f, x, d.b)[1](d.w)

    return vjp(pulled, d.a)[1]((d.ta, d.tb))


SECOND_ORDER: dict[str, Callable[[Fn, Data], Any]] = {
    "jacrev_jacrev": lambda f, d: jacrev(jacrev(f, argnums=(0, 1)), argnums=(0, 1))(d.a, d.b),
    "jacrev_jacfwd": lambda f, d: jacrev(jacfwd(f, argnums=(0, 1)), argnums=(0, 1))(d.a, d.b),
    "grad_grad": _grad_grad,
    "jvp_grad_hvp": lambda f, d: jvp(grad(loss(f, d), argnums=(0, 1)), (d.a, d.b), (d.ta, d.tb)),
    "vjp_of_vjp": _vjp_of_vjp,
    "autograd_double_backward": _double_backward,
}


@pytest.mark.parametrize("transform", list(SECOND_ORDER))
@pytest.mark.parametrize("name", ALL)
def test_second_order_matrix(name: str, transform: str) -> None:
    """Real and log: against the oracle.  Tropical: the second derivative is 0 a.e."""
    v, d = VARIANTS[name], data()
    run = SECOND_ORDER[transform]
    inputs = fields(d)
    with pure(*inputs):
        got = run(v.ours(), d)
    want = run(v.oracle(), d)
    close(got, want)
    assert_fresh(got, inputs)
    if v.tropical and transform != "jvp_grad_hvp":
        assert all((h == 0).all() for h in tree_leaves(got))


# ------------------------------------------------------- forward over forward
FORWARD_OVER_FORWARD: dict[str, Callable[[Fn, Data], Any]] = {
    "jacfwd_jacfwd": lambda f, d: jacfwd(jacfwd(f, argnums=(0, 1)), argnums=(0, 1))(d.a, d.b),
    "jacfwd_jacfwd_one_arg": lambda f, d: jacfwd(jacfwd(lambda x: f(x, d.b)))(d.a),
    "jvp_jvp": lambda f, d: jvp(
        lambda x: jvp(lambda y: f(y, d.b), (x,), (d.ta,))[1], (d.a,), (d.ta2,)
    ),
    "jvp_jacfwd": lambda f, d: jvp(lambda x: jacfwd(f)(x, d.b), (d.a,), (d.ta,)),
    "jacfwd_hessian": lambda f, d: jacfwd(hessian(lambda x: loss(f, d)(x, d.b)))(d.a),
}


@pytest.mark.parametrize("transform", list(FORWARD_OVER_FORWARD))
@pytest.mark.parametrize("name", ALL)
def test_forward_over_forward_raises(name: str, transform: str) -> None:
    """Through our Functions it raises (never numbers); pure-torch paths are right."""
    v, d = VARIANTS[name], data()
    run = FORWARD_OVER_FORWARD[transform]
    if not v.rule:  # pairwise real steps are torch.einsum: PyTorch gets these right
        close(run(v.ours(), d), run(v.oracle(), d))
        return
    with pure(*fields(d)):
        with pytest.raises(NotImplementedError, match=r"(?s)hessian.*jacrev"):
            run(v.ours(), d)


# ---------------------------------------------------------------- gradcheck
def _leaves(*xs: Tensor) -> tuple[Tensor, ...]:
    return tuple(x.detach().clone().requires_grad_() for x in xs)


@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name: str) -> None:
    v, d = VARIANTS[name], data()
    assert gradcheck(
        v.ours(),
        _leaves(d.a, d.b),
        check_forward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
        check_undefined_grad=True,
    )


@pytest.mark.parametrize("name", SMOOTH)
def test_gradgradcheck(name: str) -> None:
    v, d = VARIANTS[name], data()
    assert gradgradcheck(
        v.ours(), _leaves(d.a, d.b), check_batched_grad=True, check_fwd_over_rev=True
    )


# ------------------------------------------------------- equations × variants
EQUATIONS: dict[str, list[tuple[int, ...]]] = {
    "ij,jk->ik": [(3, 5), (5, 4)],
    "ij,jk,ki->": [(3, 4), (4, 2), (2, 3)],
    "ij,jk->kji": [(3, 4), (4, 2)],
    "ij->j": [(5, 3)],
    "ij->ij": [(3, 4)],
    "i,j->ij": [(3,), (4,)],
}


@functools.cache
def eq_data(equation: str) -> tuple[list[Tensor], list[Tensor]]:
    """Tie-free operands, and a batch of 3 of them (every example tie-free)."""
    shapes = EQUATIONS[equation]
    for seed in range(1000):
        g = torch.Generator().manual_seed(1000 + seed)
        xs = [torch.randn(s, generator=g, dtype=F64) * 2 for s in shapes]
        bs = [torch.randn((3, *s), generator=g, dtype=F64) * 2 for s in shapes]
        if tie_free(equation, *xs) and all(
            tie_free(equation, *[x[i] for x in bs]) for i in range(3)
        ):
            return xs, bs
    raise AssertionError("no tie-free data found")  # pragma: no cover


def _weighted(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A scalar from ``f``'s output with a fixed, non-uniform weight."""

    def scalar(*xs: Tensor) -> Tensor:
        out = f(*xs)
        w = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
        return (out * w).sum()

    return scalar


EQ_TRANSFORMS: dict[str, Callable[[Callable[..., Tensor], list[Tensor], list[Tensor]], Any]] = {
    "call": lambda f, xs, bs: f(*xs),
    "grad": lambda f, xs, bs: grad(_weighted(f), argnums=tuple(range(len(xs))))(*xs),
    "jvp": lambda f, xs, bs: jvp(f, tuple(xs), tuple(b[0] for b in bs)),
    "jacrev": lambda f, xs, bs: jacrev(f, argnums=tuple(range(len(xs))))(*xs),
    "jacfwd": lambda f, xs, bs: jacfwd(f, argnums=tuple(range(len(xs))))(*xs),
    "hessian": lambda f, xs, bs: hessian(_weighted(f), argnums=tuple(range(len(xs))))(*xs),
    "vmap_all": lambda f, xs, bs: vmap(f)(*bs),
    "vmap_first": lambda f, xs, bs: vmap(f, in_dims=(0,) + (None,) * (len(xs) - 1))(bs[0], *xs[1:]),
    "vmap_last": lambda f, xs, bs: vmap(f, in_dims=(None,) * (len(xs) - 1) + (0,))(
        *xs[:-1], bs[-1]
    ),
    "vmap_grad": lambda f, xs, bs: vmap(grad(_weighted(f)), in_dims=(0,) + (None,) * (len(xs) - 1))(
        bs[0], *xs[1:]
    ),
}


@pytest.mark.parametrize("transform", list(EQ_TRANSFORMS))
@pytest.mark.parametrize("equation", list(EQUATIONS))
@pytest.mark.parametrize("name", ALL)
def test_equations(name: str, equation: str, transform: str) -> None:
    v = VARIANTS[name]
    xs, bs = eq_data(equation)
    run = EQ_TRANSFORMS[transform]
    with pure(*xs, *bs):
        got = run(lambda *ys: v.call(equation, *ys), xs, bs)
    close(got, run(lambda *ys: v.oracle_call(equation, *ys), xs, bs))
    assert_fresh(got, [*xs, *bs])


@pytest.mark.parametrize("equation", ["ij,jk,ki->", "ij->ij", "i,j->ij"])
@pytest.mark.parametrize("name", ALL)
def test_equations_gradcheck(name: str, equation: str) -> None:
    v = VARIANTS[name]
    xs, _ = eq_data(equation)
    assert gradcheck(
        lambda *ys: v.call(equation, *ys),
        _leaves(*xs),
        check_forward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
    )


# ------------------------------------------------------------------ layouts
def _noncontiguous(x: Tensor) -> Tensor:
    big = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
    big[:, ::2] = x
    return big[:, ::2]


def _innermost(t: Tensor) -> Tensor:
    """The plain tensor inside every functorch wrapper (batch dims included)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


@dataclasses.dataclass(frozen=True)
class Layout:
    """Primals and tangents, and how the op is reached from the primals."""

    a: Tensor
    b: Tensor
    ta: Tensor
    tb: Tensor
    wrap: Callable[[Fn], Fn] = lambda f: f


def _expanded(d: Data) -> Layout:
    """Stride-0 operands.  Forward mode needs a tangent laid out like its primal,
    which a stride-0 tensor cannot have (plain torch.einsum fails too), so the
    transforms see the small bases and expand them on the way in: the op still
    gets stride-0 operands (wrapped by jvp / vmap levels) under every transform."""
    return Layout(
        d.a[:1],
        d.b[:, :1],
        d.ta[:1],
        d.tb[:, :1],
        lambda f: lambda x, y: f(x.expand(NI, NJ), y.expand(NJ, NK)),
    )


LAYOUTS: dict[str, Callable[[Data], Layout]] = {
    "noncontiguous": lambda d: Layout(_noncontiguous(d.a), _noncontiguous(d.b), d.ta, d.tb),
    "transposed": lambda d: Layout(d.a.T.contiguous().T, d.b.T.contiguous().T, d.ta, d.tb),
    "expanded": _expanded,
}
LAYOUT_TRANSFORMS: dict[str, Callable[[Fn, Layout, Data], Any]] = {
    "call": lambda f, x, d: f(x.a, x.b),
    "grad": lambda f, x, d: grad(loss(f, d), argnums=(0, 1))(x.a, x.b),
    "jvp": lambda f, x, d: jvp(f, (x.a, x.b), (x.ta, x.tb)),
    "jacrev": lambda f, x, d: jacrev(f, argnums=(0, 1))(x.a, x.b),
    "jacfwd": lambda f, x, d: jacfwd(f, argnums=(0, 1))(x.a, x.b),
    "hessian": lambda f, x, d: hessian(loss(f, d), argnums=(0, 1))(x.a, x.b),
    "vmap_expanded_batch": lambda f, x, d: vmap(f, in_dims=(0, None))(
        x.a.expand(NB, *x.a.shape), x.b
    ),
    "vmap_grad_expanded_batch": lambda f, x, d: vmap(grad(loss(f, d)), in_dims=(0, None))(
        x.a.expand(NB, *x.a.shape), x.b
    ),
}


@pytest.mark.parametrize("transform", list(LAYOUT_TRANSFORMS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ALL)
def test_layouts(name: str, layout: str, transform: str) -> None:
    v, d = VARIANTS[name], data()
    x = LAYOUTS[layout](d)
    seen: list[Tensor] = []

    def ours(a: Tensor, b: Tensor) -> Tensor:
        if not seen:  # the layout the op gets (at the innermost level)
            seen.extend(_innermost(t) for t in (a, b))
        return v.ours()(a, b)

    run = LAYOUT_TRANSFORMS[transform]
    tensors = [*fields(x)[:4], *fields(d)]
    with pure(*tensors):
        got = run(x.wrap(ours), x, d)
    close(got, run(x.wrap(v.oracle()), x, d))
    assert_fresh(got, tensors)
    a, b = seen[0], seen[1]
    if layout == "expanded":
        assert 0 in a.stride() and 0 in b.stride()
    else:
        assert not a.is_contiguous() and not b.is_contiguous()


SAME_TWICE: dict[str, Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], Any]] = {
    "call": lambda f, s, t: f(s),
    "grad": lambda f, s, t: grad(_weighted(f))(s),
    "jvp": lambda f, s, t: jvp(f, (s,), (t,)),
    "jacrev": lambda f, s, t: jacrev(f)(s),
    "jacfwd": lambda f, s, t: jacfwd(f)(s),
    "hessian": lambda f, s, t: hessian(_weighted(f))(s),
    "vmap": lambda f, s, t: vmap(f)(torch.stack([s, s.T, s])),
    "vmap_grad": lambda f, s, t: vmap(grad(_weighted(f)))(torch.stack([s, s.T])),
    "gradcheck": lambda f, s, t: torch.tensor(
        gradcheck(f, _leaves(s), check_forward_ad=True, check_batched_grad=True)
    ),
}


@pytest.mark.parametrize("transform", list(SAME_TWICE))
@pytest.mark.parametrize("equation", ["ij,jk->ik", "ij,jk,kl->ik"])
@pytest.mark.parametrize("name", ALL)
def test_same_tensor_several_times(name: str, equation: str, transform: str) -> None:
    v, d = VARIANTS[name], data()
    s, t = d.s, d.s.T.contiguous()  # t: a tangent
    n = equation.count(",") + 1
    run = SAME_TWICE[transform]
    with pure(s, t):
        got = run(lambda x: v.call(equation, *[x] * n), s, t)
    if transform == "gradcheck":
        assert bool(got)
        return
    close(got, run(lambda x: v.oracle_call(equation, *[x] * n), s, t))
    assert_fresh(got, [s, t])


# -------------------------------------------------------------- vmap spy
@dataclasses.dataclass
class Spy:
    fold: mock.MagicMock  # fold_batch
    forwards: list[tuple[Any, list[Tensor]]]  # (spec, tensors) of each Function.forward call


@contextlib.contextmanager
def spy() -> Iterator[Spy]:
    """Count ``fold_batch`` calls and the forward calls of every autograd Function.

    ``_autograd`` binds ``fold_batch`` by name at import, so both the name in
    ``_rules`` and the one ``_autograd`` calls are wrapped (with one spy).  The
    forwards are wrapped on each generated Function class, whatever kernel they
    run.
    """
    result = Spy(mock.MagicMock(wraps=_rules.fold_batch), [])

    def wrap(original: Callable[..., Any]) -> Any:
        def forward(spec: Any, context: Any, *xs: Tensor) -> Any:
            result.forwards.append((spec, list(xs)))
            return original(spec, context, *xs)

        return staticmethod(forward)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(_rules, "fold_batch", result.fold))
        stack.enter_context(mock.patch.object(_autograd, "fold_batch", result.fold))
        for cls in set(_autograd._FUNCTIONS.values()):
            stack.enter_context(mock.patch.object(cls, "forward", wrap(cls.forward)))
        yield result


SPY_CASES: dict[str, tuple[Callable[[Fn, Data], Any], int, int]] = {
    # transform, fold_batch calls, forward calls
    "vmap_00": (FIRST_ORDER["vmap_00"], 1, 1),
    "vmap_0N": (FIRST_ORDER["vmap_0N"], 1, 1),
    "vmap_N0": (FIRST_ORDER["vmap_N0"], 1, 1),
    "vmap_1N_out1": (FIRST_ORDER["vmap_1N_out1"], 1, 1),
    "vmap_nested": (
        lambda f, d: vmap(vmap(f, in_dims=(0, None)), in_dims=(None, 0))(d.ab, d.bb),
        2,
        1,
    ),
    "vmap_chunk2": (FIRST_ORDER["vmap_chunk2"], 3, 3),  # NB = 6: three chunks, not six examples
    "vmap_grad": (lambda f, d: vmap(grad(loss(f, d)), in_dims=(0, None))(d.ab, d.b), 1, 1),
}


@pytest.mark.parametrize("case", list(SPY_CASES))
@pytest.mark.parametrize("name", RULED)
def test_vmap_folds_the_batch_into_one_forward_call(name: str, case: str) -> None:
    v, d = VARIANTS[name], data()
    run, folds, forwards = SPY_CASES[case]
    assert not torch._C._functorch._is_vmap_fallback_enabled()
    with spy() as seen:
        got = run(v.ours(), d)
    assert seen.fold.call_count == folds
    assert len(seen.forwards) == forwards  # once per vmap call (or chunk), not per example
    n_out = len(v.eq.split("->")[1])
    levels = 2 if case == "vmap_nested" else 1
    for spec, xs in seen.forwards:  # the batch is folded into the equation ...
        assert len(spec.step.output) == n_out + levels
        # ... and the forward gets plain tensors (batch dims included), not BatchedTensors
        assert not any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in xs)
    close(got, run(v.oracle(), d))


# ------------------------------------------- max-plus with a large output
# Max-plus steps with at least 4096 output cells take a different forward (one
# slice per summed coordinate) when the argmax is needed; a vmapped call folds
# the batch into the output, so a batch of smaller outputs can reach it too.
BIG_I, BIG_J, BIG_K = 64, 3, 64


@functools.cache
def big_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    for seed in range(1000):
        g = torch.Generator().manual_seed(7000 + seed)
        a = torch.randn(BIG_I, BIG_J, generator=g, dtype=F64) * 2
        b = torch.randn(BIG_J, BIG_K, generator=g, dtype=F64) * 2
        ab = torch.randn(2, BIG_I, BIG_J, generator=g, dtype=F64) * 2
        if all(tie_free(EQ, x, b) for x in (a, *ab)):
            w = torch.randn(BIG_I, BIG_K, generator=g, dtype=F64)
            return a, b, ab, w
    raise AssertionError("no tie-free data found")  # pragma: no cover


def _big_linearize(f: Fn, a: Tensor, b: Tensor, ab: Tensor, w: Tensor) -> Any:
    _, jvp_fn = linearize(f, a, b)
    return jvp_fn(a.flip(0), b.flip(1)), jvp_fn(a, b)


BIG_TRANSFORMS: dict[str, Callable[[Fn, Tensor, Tensor, Tensor, Tensor], Any]] = {
    "call": lambda f, a, b, ab, w: f(a, b),
    "grad": lambda f, a, b, ab, w: grad(lambda x, y: (f(x, y) * w).sum(), argnums=(0, 1))(a, b),
    "vjp_twice": lambda f, a, b, ab, w: [vjp(f, a, b)[1](c) for c in (w, w.flip(0))],
    "jvp": lambda f, a, b, ab, w: jvp(f, (a, b), (a.flip(0), b.flip(1))),
    "vmap": lambda f, a, b, ab, w: vmap(f, in_dims=(0, None))(ab, b),
    "vmap_grad": lambda f, a, b, ab, w: vmap(
        grad(lambda x, y: (f(x, y) * w).sum()), in_dims=(0, None)
    )(ab, b),
    "vmap_jvp": lambda f, a, b, ab, w: vmap(
        lambda x: jvp(lambda u: f(u, b), (x,), (x.flip(0),)), in_dims=0
    )(ab),
    "linearize": _big_linearize,
}


@pytest.mark.parametrize(
    "transform",
    [pytest.param(t, marks=_LINEARIZE_WARNING) if t == "linearize" else t for t in BIG_TRANSFORMS],
)
@pytest.mark.parametrize("name", ["max", "min", "viterbi"])
def test_large_max_plus_output(name: str, transform: str) -> None:
    v = VARIANTS[name]
    a, b, ab, w = big_data()
    run = BIG_TRANSFORMS[transform]
    with pure(a, b, ab, w):
        got = run(lambda x, y: v.call(EQ, x, y), a, b, ab, w)
    close(got, run(lambda x, y: v.oracle_call(EQ, x, y), a, b, ab, w))
    assert_fresh(got, [a, b, ab, w])


def test_large_viterbi_argmax() -> None:
    a, b, ab, _ = big_data()
    values, argmax = func.viterbi_einsum(EQ, a, b)
    want_v, want_i = brute_viterbi(EQ, a, b)
    close(values, want_v)
    assert torch.equal(argmax, want_i)
    values, argmax = vmap(lambda x: func.viterbi_einsum(EQ, x, b), in_dims=0)(ab)
    for n in range(2):
        want_v, want_i = brute_viterbi(EQ, ab[n], b)
        close(values[n], want_v)
        assert torch.equal(argmax[n], want_i)


# ------------------------------------------------------- viterbi's argmax
def test_viterbi_argmax_is_integer_and_not_differentiable() -> None:
    d = data()
    a, b = _leaves(d.a, d.b)
    values, argmax = func.viterbi_einsum(EQ, a, b, block_size=2)
    want_v, want_i = brute_viterbi(EQ, d.a, d.b)
    assert argmax.dtype == torch.int64
    assert not argmax.requires_grad and values.requires_grad
    close(values.detach(), want_v)
    assert torch.equal(argmax, want_i)


def test_viterbi_argmax_as_grad_aux() -> None:
    d = data()

    def f(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        values, argmax = func.viterbi_einsum(EQ, a, b, block_size=2)
        return (values * d.w).sum(), argmax

    with pure(d.a, d.b):
        (ga, gb), argmax = grad(f, argnums=(0, 1), has_aux=True)(d.a, d.b)
    assert argmax.dtype == torch.int64 and not argmax.requires_grad
    assert torch.equal(argmax, brute_viterbi(EQ, d.a, d.b)[1])
    close((ga, gb), grad(loss(VARIANTS["max"].oracle(), d), argnums=(0, 1))(d.a, d.b))
    # the same through vmap(grad): per-example gradients and argmax
    with pure(d.ab, d.b):
        (ga, gb), argmax = vmap(grad(f, argnums=(0, 1), has_aux=True), in_dims=(0, None))(d.ab, d.b)
    assert argmax.dtype == torch.int64
    assert torch.equal(argmax, torch.stack([brute_viterbi(EQ, x, d.b)[1] for x in d.ab]))
    want = vmap(grad(loss(VARIANTS["max"].oracle(), d), argnums=(0, 1)), in_dims=(0, None))
    close((ga, gb), want(d.ab, d.b))


@pytest.mark.parametrize(
    "in_dims", [(0, 0), (0, None), (None, 0), (1, None)], ids=["00", "0N", "N0", "1N"]
)
def test_viterbi_vmapped_both_outputs(in_dims: tuple[int | None, int | None]) -> None:
    d = data()
    a = {0: d.ab, None: d.a, 1: d.ab.movedim(0, 1)}[in_dims[0]]
    b = {0: d.bb, None: d.b}[in_dims[1]]
    with pure(a, b):
        values, argmax = vmap(
            lambda x, y: func.viterbi_einsum(EQ, x, y, block_size=2), in_dims=in_dims
        )(a, b)
    assert argmax.dtype == torch.int64 and argmax.shape == (NB, NI, NK, 1)
    pairs = [
        (a.select(in_dims[0], n) if in_dims[0] is not None else a,
         b.select(in_dims[1], n) if in_dims[1] is not None else b)
        for n in range(NB)
    ]  # fmt: skip
    want = [brute_viterbi(EQ, x, y) for x, y in pairs]
    close(values, torch.stack([v for v, _ in want]))
    assert torch.equal(argmax, torch.stack([i for _, i in want]))
    # nested, mixed in_dims
    with pure(d.ab, d.bb):
        values, argmax = vmap(
            vmap(lambda x, y: func.viterbi_einsum(EQ, x, y, block_size=2), in_dims=(0, None)),
            in_dims=(None, 0),
        )(d.ab, d.bb)
    for m in range(NB):
        for n in range(NB):
            v, i = brute_viterbi(EQ, d.ab[n], d.bb[m])
            close(values[m, n], v)
            assert torch.equal(argmax[m, n], i)


CHAIN = "ij,jk,kl->il"


@functools.cache
def chain_data() -> tuple[Tensor, Tensor, Tensor]:
    """A batch of first operands and two more, tie-free per example."""
    for seed in range(1000):
        g = torch.Generator().manual_seed(9000 + seed)
        a = torch.randn(4, 3, 4, generator=g, dtype=F64) * 2
        b = torch.randn(4, 3, generator=g, dtype=F64) * 2
        c = torch.randn(3, 2, generator=g, dtype=F64) * 2
        if all(tie_free(CHAIN, x, b, c) for x in a):
            return a, b, c
    raise AssertionError("no tie-free data found")  # pragma: no cover


@pytest.mark.parametrize("optimize", [False, "auto"], ids=["joint", "pairwise"])
def test_viterbi_argmax_of_a_chain_under_vmap_and_grad(optimize: Any) -> None:
    a, b, c = chain_data()

    def f(x: Tensor) -> tuple[Tensor, Tensor]:
        values, argmax = func.viterbi_einsum(CHAIN, x, b, c, optimize=optimize)
        return values.sum(), argmax

    with pure(a, b, c):
        values, argmax = vmap(lambda x: func.viterbi_einsum(CHAIN, x, b, c, optimize=optimize))(a)
        grads, aux = vmap(grad(f, has_aux=True))(a)
    want = [brute_viterbi(CHAIN, x, b, c) for x in a]
    close(values, torch.stack([v for v, _ in want]))
    assert torch.equal(argmax, torch.stack([i for _, i in want]))
    assert torch.equal(aux, argmax)
    close(grads, vmap(grad(lambda x: brute("max", CHAIN, x, b, c).sum()))(a))


# ------------------------------------------------------ modules, ensembles
class Tiny(nn.Module):
    """``out[k] = op("j,jk->k", x, weight)`` plus a bias, with a parameter and a buffer."""

    def __init__(self, op: Callable[..., Tensor], seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.op = op
        self.weight = nn.Parameter(torch.randn(NJ, NK, generator=g, dtype=F64))
        self.bias = nn.Parameter(torch.randn(NK, generator=g, dtype=F64))
        self.register_buffer("scale", torch.tensor(0.5 + seed, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return self.op("j,jk->k", x, self.weight) * self.scale + self.bias


MODULE_VARIANTS = ["log", "top_log", "max", "min", "user_log", "user_max", "real_joint"]


def _module_ops(name: str) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    v = VARIANTS[name]
    if name == "real_joint":  # a third (constant) operand keeps it on the blocked rule
        c = torch.ones(NK, dtype=F64)
        return (
            lambda e, x, w: v.call("j,jk,k->k", x, w, c),
            lambda e, x, w: brute("real", "j,jk,k->k", x, w, c),
        )
    return v.call, v.oracle_call


def _module_data(name: str) -> tuple[Tensor, Tensor]:
    """A batch of inputs (tie-free against the weights) and targets."""
    for seed in range(1000):
        g = torch.Generator().manual_seed(5000 + seed)
        xs = torch.randn(NB, NJ, generator=g, dtype=F64) * 2
        ys = torch.randn(NB, NK, generator=g, dtype=F64)
        weights = [Tiny(lambda *a: a[0], s).weight.detach() for s in range(3)]
        if all(tie_free("j,jk->k", x, w) for x in xs for w in weights):
            return xs, ys
    raise AssertionError("no tie-free data found")  # pragma: no cover


@pytest.mark.parametrize("name", MODULE_VARIANTS)
def test_functional_call_per_sample_grads(name: str) -> None:
    ours_op, oracle_op = _module_ops(name)
    ours, oracle = Tiny(ours_op, 0), Tiny(oracle_op, 0)
    params = {k: p.detach() for k, p in ours.named_parameters()}
    buffers = dict(ours.named_buffers())
    xs, ys = _module_data(name)

    def per_sample(model: nn.Module) -> Any:
        def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            out = functional_call(model, (p, buffers), (x,))
            return ((out - y) ** 2).sum()

        whole = grad(lambda p: vmap(sample_loss, in_dims=(None, 0, 0))(p, xs, ys).sum())(params)
        return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, xs, ys), whole

    with pure(xs, ys, *params.values(), *buffers.values()):
        (got, got_whole) = per_sample(ours)
    want, want_whole = per_sample(oracle)
    close(got, want)
    close(got_whole, want_whole)
    assert got["weight"].shape == (NB, NJ, NK)
    # per-sample gradients sum to the batch gradient
    close({k: g.sum(0) for k, g in got.items()}, got_whole)


@pytest.mark.parametrize("name", MODULE_VARIANTS)
def test_stack_module_state_ensemble(name: str) -> None:
    ours_op, oracle_op = _module_ops(name)
    models = [Tiny(ours_op, s) for s in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    xs, ys = _module_data(name)

    def ensemble(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, (p, b), (x,))

    def ens_loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return ((vmap(lambda x1: ensemble(p, b, x1))(x) - y) ** 2).sum()

    inputs = [xs, ys, *params.values(), *buffers.values()]
    with pure(*inputs):
        outs = vmap(ensemble, in_dims=(0, 0, None))(params, buffers, xs[0])
        batch = vmap(vmap(ensemble, in_dims=(None, None, 0)), in_dims=(0, 0, None))(
            params, buffers, xs
        )
        grads = vmap(grad(ens_loss), in_dims=(0, 0, None, None))(params, buffers, xs, ys)
    assert_fresh([outs, batch, grads], inputs)
    for m in range(len(models)):
        ref = Tiny(oracle_op, m)
        close(outs[m], ref(xs[0]).detach())
        close(batch[m], torch.stack([ref(x) for x in xs]).detach())
        ref_grads = torch.autograd.grad(((torch.stack([ref(x) for x in xs]) - ys) ** 2).sum(),
                                        list(ref.parameters()))  # fmt: skip
        close([grads[k][m] for k, _ in ref.named_parameters()], list(ref_grads))
