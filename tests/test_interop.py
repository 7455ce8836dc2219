"""Conformance of the top-level package with torch-semiring-einsum 1.2.0 (DESIGN §2.1, §3.1).

``import semiring_einsum`` must be a drop-in for ``import torch_semiring_einsum``: the
13 names of ``reference-api.txt`` with compatible signatures, the same ``Equation``
data, and the same results (float64, tight tolerance) for every public function, the
``compute_sum`` callback protocol and ``combine``.  Where the reference is documented
broken or unimplemented (``grad_of_neg_inf`` other than NaN/0, a size-0 summed index),
our documented behaviour is checked against the brute-force float64 oracle instead.

Every call into ``semiring_einsum`` goes through :func:`ours`, which also checks that
no tensor argument is modified (values and autograd version counter).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
import torch_semiring_einsum as R

import semiring_einsum as S
from oracle import brute, brute_viterbi, joint

Tensor = torch.Tensor
NAN = math.nan
NEG_INF = -math.inf

REFERENCE_NAMES = [
    "compile_equation",
    "Equation",
    "einsum",
    "real_einsum_forward",
    "real_einsum_backward",
    "log_einsum",
    "log_einsum_forward",
    "log_einsum_backward",
    "log_viterbi_einsum_forward",
    "AUTOMATIC_BLOCK_SIZE",
    "AutomaticBlockSize",
    "semiring_einsum_forward",
    "combine",
]

# (equation, letter sizes); the first is the reference's own test equation.
EQUATIONS = [
    ("abce,abde,abdf->acd", dict(a=2, b=3, c=5, d=7, e=11, f=13)),
    ("ij,jk->ik", dict(i=3, j=4, k=5)),
    ("bij,bjk->bik", dict(b=2, i=3, j=4, k=5)),
    ("ab,bc,cd->ad", dict(a=2, b=3, c=4, d=5)),
    ("i,i->", dict(i=5)),
    ("ij->", dict(i=3, j=4)),
    ("i,j->ij", dict(i=3, j=4)),  # nothing summed
]
SMALL = EQUATIONS[1:]  # without the big reference equation, for the costlier matrices
EQ_IDS = [eq for eq, _ in EQUATIONS]
SMALL_IDS = EQ_IDS[1:]

BLOCKS = [1, 3, 1000, "auto"]
BLOCK_IDS = ["bs1", "bs3", "bs1000", "auto"]

RTOL, ATOL = 1e-9, 1e-10


# ------------------------------------------------------------------ helpers
def shapes_of(equation: str, sizes: dict[str, int]) -> list[tuple[int, ...]]:
    lhs = equation.split("->")[0]
    return [tuple(sizes[c] for c in term) for term in lhs.split(",")]


def make(equation: str, sizes: dict[str, int], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed + sum(map(ord, equation)))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes_of(equation, sizes)]


def with_neg_inf(equation: str, sizes: dict[str, int], seed: int = 0) -> list[Tensor]:
    """Operands with scattered -inf and a whole first slice of operand 0 at -inf.

    The first slice makes whole output cells all -inf whenever the first dim of
    operand 0 is an output index.
    """
    xs = make(equation, sizes, seed)
    g = torch.Generator().manual_seed(seed + 17)
    out = []
    for x in xs:
        mask = torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.2
        out.append(torch.where(mask, NEG_INF, x))
    if out[0].dim():
        out[0][0] = NEG_INF
    else:
        out[0].fill_(NEG_INF)
    return out


def bs(module: Any, block: int | str) -> Any:
    """The block size for ``module`` (each package has its own AUTOMATIC_BLOCK_SIZE)."""
    return module.AUTOMATIC_BLOCK_SIZE if block == "auto" else block


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


@contextlib.contextmanager
def unchanged(*tensors: Tensor, what: str = "call") -> Iterator[None]:
    """Check that the block modifies none of ``tensors`` (values and version counter)."""
    saved = [(t, t.detach().clone(), t._version) for t in tensors]
    yield
    for t, before, version in saved:
        assert t._version == version, f"{what} modified an input in place"
        torch.testing.assert_close(t.detach(), before, rtol=0, atol=0, equal_nan=True)


def ours(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` and check that no tensor argument was modified."""
    with unchanged(*_tensors(list(args)), *_tensors(kwargs), what=getattr(fn, "__name__", "fn")):
        return fn(*args, **kwargs)


def close(got: Any, want: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Recursive closeness (None matches None only); same dtype and shape; NaN == NaN."""
    if want is None:
        assert got is None
        return
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            close(g, w, rtol, atol)
        return
    assert isinstance(got, Tensor), type(got)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    torch.testing.assert_close(got.detach(), want.detach(), rtol=rtol, atol=atol, equal_nan=True)


def leaves(xs: Sequence[Tensor]) -> list[Tensor]:
    return [x.detach().clone().requires_grad_(True) for x in xs]


def summed_sizes(equation: str, xs: Sequence[Tensor]) -> tuple[list[int], list[int]]:
    """(output shape, sizes of the summed indices in first-appearance order)."""
    _, output, summed, size = joint(equation, *xs)
    return [size[c] for c in output], [size[c] for c in summed]


# ------------------------------------------------------------------ names and signatures
def test_all_reference_names_exist():
    assert sorted(R.__all__) == sorted(REFERENCE_NAMES)
    for name in REFERENCE_NAMES:
        assert hasattr(S, name), name
        assert name in S.__all__, name


def _same_default(ref: Any, got: Any) -> bool:
    if isinstance(ref, float) and math.isnan(ref):
        return isinstance(got, float) and math.isnan(got)
    if isinstance(ref, R.AutomaticBlockSize):
        return got is S.AUTOMATIC_BLOCK_SIZE and repr(ref) == repr(got)
    return type(ref) is type(got) and ref == got


@pytest.mark.parametrize("name", [n for n in REFERENCE_NAMES if n != "AUTOMATIC_BLOCK_SIZE"])
def test_signature_compatible(name):
    ref = inspect.signature(getattr(R, name))
    got = inspect.signature(getattr(S, name))
    ref_params = list(ref.parameters.values())
    got_params = dict(got.parameters)
    # Positional parameters keep the reference's names and order.
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    assert [p.name for p in ref_params if p.kind in positional] == [
        p.name for p in got.parameters.values() if p.kind in positional
    ]
    for p in ref_params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            # Only einsum has one: the reference's combine()-made einsum takes no
            # options, so it rejects every extra keyword (checked below).
            assert name == "einsum"
            continue
        assert p.name in got_params, (name, p.name)
        q = got_params.pop(p.name)
        assert q.kind == p.kind, (name, p.name, q.kind, p.kind)
        if p.default is not inspect.Parameter.empty:
            assert _same_default(p.default, q.default), (name, p.name, p.default, q.default)
    for q in got_params.values():  # our extra parameters are optional
        assert q.default is not inspect.Parameter.empty or q.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ), (name, q.name)


def test_einsum_rejects_unknown_keyword_like_the_reference():
    a, b = torch.ones(2, 3), torch.ones(3, 2)
    with pytest.raises(TypeError):
        R.einsum(R.compile_equation("ij,jk->ik"), a, b, block_size=1, bogus=1)
    with pytest.raises(TypeError):
        S.einsum("ij,jk->ik", a, b, block_size=1, bogus=1)


def test_automatic_block_size_object():
    assert isinstance(S.AUTOMATIC_BLOCK_SIZE, S.AutomaticBlockSize)
    assert repr(S.AUTOMATIC_BLOCK_SIZE) == repr(R.AUTOMATIC_BLOCK_SIZE) == "AUTOMATIC_BLOCK_SIZE"
    for attr in (
        "max_cpu_bytes",
        "max_cuda_bytes",
        "cache_available_cuda_memory",
        "cuda_memory_proportion",
    ):
        assert getattr(S.AUTOMATIC_BLOCK_SIZE, attr) == getattr(R.AUTOMATIC_BLOCK_SIZE, attr)
    custom = S.AutomaticBlockSize(max_cpu_bytes=4096, repr_string="small")
    assert repr(custom) == "small" and custom.max_cpu_bytes == 4096
    x, y = make("ij,jk->ik", dict(i=3, j=4, k=5))
    close(ours(S.einsum, "ij,jk->ik", x, y, block_size=custom), x @ y)


# ------------------------------------------------------------------ Equation
def _as_lists(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return [_as_lists(o) for o in obj]
    return obj


@pytest.mark.parametrize("equation", EQ_IDS + ["ii->i", "ab,ba->", "zyx,xw->wz"])
def test_compile_equation_matches_reference(equation):
    ref = R.compile_equation(equation)
    got = S.compile_equation(equation)
    assert isinstance(got, S.Equation)
    assert got.source == ref.source == equation
    for attr in ("input_variables", "output_variables", "variable_locations"):
        assert _as_lists(getattr(got, attr)) == _as_lists(getattr(ref, attr)), attr
    assert got.num_variables == ref.num_variables


def _equation_forms(equation: str) -> dict[str, Any]:
    ref = R.compile_equation(equation)
    fields = dict(
        variable_locations=ref.variable_locations,
        input_variables=ref.input_variables,
        output_variables=ref.output_variables,
        num_variables=ref.num_variables,
    )
    return {
        "str": equation,
        "compiled": S.compile_equation(equation),
        "positional": S.Equation(equation, *fields.values()),
        "keyword": S.Equation(source=equation, **fields),
    }


def _real_cb(compute_sum: Callable[..., Any]) -> Any:
    def add(a: Tensor, b: Tensor) -> None:
        a += b

    def sum_block(a: Tensor, dims: tuple[int, ...]) -> Tensor:
        return a.sum(dims) if dims else a

    def mul(a: Tensor, b: Tensor) -> None:
        a *= b

    return compute_sum(add, sum_block, mul)


@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS[1:4], ids=EQ_IDS[1:4])
def test_string_and_equation_forms_are_interchangeable(equation, sizes):
    xs = make(equation, sizes)
    grad = torch.randn(brute("real", equation, *xs).shape, dtype=torch.float64)
    results = {}
    for form, eq in _equation_forms(equation).items():
        calls = [
            ours(S.einsum, eq, *xs, block_size=2),
            ours(S.real_einsum_forward, eq, *xs, block_size=2),
            ours(S.real_einsum_backward, eq, xs, [True] * len(xs), grad, block_size=2),
            ours(S.log_einsum, eq, *xs, block_size=2),
            ours(S.log_einsum_forward, eq, *xs, block_size=2, return_max=True),
            ours(S.log_einsum_backward, eq, xs, [True] * len(xs), grad, block_size=2),
            ours(S.log_viterbi_einsum_forward, eq, *xs, block_size=2),
            ours(S.semiring_einsum_forward, eq, xs, 2, _real_cb),
        ]
        results[form] = calls
    for form in ("compiled", "positional", "keyword"):
        for got, want in zip(results[form], results["str"]):
            close(got, want, rtol=0, atol=0)
    close(results["str"][0], torch.einsum(equation, *xs))


# ------------------------------------------------------------------ real semiring
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_real_forward(equation, sizes, block):
    xs = make(equation, sizes)
    want = R.real_einsum_forward(R.compile_equation(equation), *xs, block_size=bs(R, block))
    eq = S.compile_equation(equation)
    close(ours(S.real_einsum_forward, eq, *xs, block_size=bs(S, block)), want)
    close(ours(S.einsum, eq, *xs, block_size=bs(S, block)), want)
    close(want, torch.einsum(equation, *xs))  # sanity of the reference itself


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_real_backward(equation, sizes, block):
    xs = make(equation, sizes)
    grad = torch.randn(brute("real", equation, *xs).shape, dtype=torch.float64)
    n = len(xs)
    masks = {tuple([True] * n), tuple(i % 2 == 0 for i in range(n)), tuple([False] * n)}
    for mask in sorted(masks):
        want = R.real_einsum_backward(
            R.compile_equation(equation), xs, list(mask), grad, bs(R, block)
        )
        got = ours(S.real_einsum_backward, equation, xs, list(mask), grad, bs(S, block))
        assert isinstance(got, list) and len(got) == n
        assert [g is None for g in got] == [not m for m in mask]
        close(got, want)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_einsum_autograd(equation, sizes, block):
    xs = make(equation, sizes)
    ref_in, our_in = leaves(xs), leaves(xs)
    if len(xs) > 1:  # a constant operand gets no gradient
        our_in[-1].requires_grad_(False)
        ref_in[-1].requires_grad_(False)
    weight = torch.randn(brute("real", equation, *xs).shape, dtype=torch.float64)
    want = R.einsum(R.compile_equation(equation), *ref_in, block_size=bs(R, block))
    (want * weight).sum().backward()
    got = ours(S.einsum, equation, *our_in, block_size=bs(S, block))
    (got * weight).sum().backward()
    close(got, want)
    close([x.grad for x in our_in], [x.grad for x in ref_in])


# ------------------------------------------------------------------ log semiring
@pytest.mark.parametrize("saves", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_log_einsum_autograd(equation, sizes, block, saves):
    save_max, save_sumexpsub = saves
    xs = make(equation, sizes)
    ref_in, our_in = leaves(xs), leaves(xs)
    weight = torch.randn(brute("real", equation, *xs).shape, dtype=torch.float64)
    want = R.log_einsum(
        R.compile_equation(equation),
        *ref_in,
        block_size=bs(R, block),
        save_max=save_max,
        save_sumexpsub=save_sumexpsub,
    )
    (want * weight).sum().backward()
    got = ours(
        S.log_einsum,
        equation,
        *our_in,
        block_size=bs(S, block),
        save_max=save_max,
        save_sumexpsub=save_sumexpsub,
    )
    (got * weight).sum().backward()
    close(got, want)
    close([x.grad for x in our_in], [x.grad for x in ref_in])


@pytest.mark.parametrize("neg_inf", [False, True], ids=["finite", "neg_inf"])
@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_log_einsum_forward_extras(equation, sizes, block, flags, neg_inf):
    return_max, return_sumexpsub = flags
    xs = (with_neg_inf if neg_inf else make)(equation, sizes)
    want = R.log_einsum_forward(
        R.compile_equation(equation),
        *xs,
        block_size=bs(R, block),
        return_max=return_max,
        return_sumexpsub=return_sumexpsub,
    )
    got = ours(
        S.log_einsum_forward,
        S.compile_equation(equation),
        *xs,
        block_size=bs(S, block),
        return_max=return_max,
        return_sumexpsub=return_sumexpsub,
    )
    if return_max or return_sumexpsub:
        assert isinstance(got, tuple) and isinstance(want, tuple)
        assert len(got) == len(want) == 1 + return_max + return_sumexpsub
    else:
        assert isinstance(got, Tensor) and isinstance(want, Tensor)
    close(got, want)
    if not (return_max or return_sumexpsub):
        close(got, brute("log", equation, *xs))


@pytest.mark.parametrize("saved", ["none", "both", "max", "sumexpsub"])
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_log_einsum_backward(equation, sizes, block, saved):
    xs = make(equation, sizes)
    n = len(xs)
    grad = torch.randn(brute("real", equation, *xs).shape, dtype=torch.float64)
    mask = [True] * n if n == 1 else [i % 2 == 1 for i in range(n)]
    want = R.log_einsum_backward(R.compile_equation(equation), xs, mask, grad, bs(R, block))
    _, m, s = ours(
        S.log_einsum_forward,
        equation,
        *xs,
        block_size=bs(S, block),
        return_max=True,
        return_sumexpsub=True,
    )
    kwargs = {}
    if saved in ("both", "max"):
        kwargs["saved_max"] = m
    if saved in ("both", "sumexpsub"):
        kwargs["saved_sumexpsub"] = s
    got = ours(S.log_einsum_backward, equation, xs, mask, grad, bs(S, block), NAN, **kwargs)
    assert [g is None for g in got] == [not x for x in mask]
    close(got, want)


# ------------------------------------------------------------------ grad_of_neg_inf
NEG_INF_CASES = [
    ("ij,jk->ik", dict(i=3, j=4, k=5)),
    ("ij,jk->i", dict(i=3, j=4, k=5)),  # each entry of A takes part in k terms of a cell
    ("abce,abde,abdf->acd", dict(a=2, b=2, c=3, d=2, e=3, f=2)),
    ("i,i->", dict(i=4)),
    ("bij,bjk->bik", dict(b=2, i=3, j=4, k=2)),
    ("ij,jk,kl->il", dict(i=2, j=3, k=4, l=2)),  # pairwise plans: partial sums can be dead
]
NEG_INF_IDS = [eq for eq, _ in NEG_INF_CASES]


@pytest.mark.parametrize("value", [NAN, 0.0], ids=["nan", "zero"])
@pytest.mark.parametrize("block", [1, 3, "auto"], ids=["bs1", "bs3", "auto"])
@pytest.mark.parametrize(("equation", "sizes"), NEG_INF_CASES, ids=NEG_INF_IDS)
def test_grad_of_neg_inf_like_reference(equation, sizes, block, value):
    xs = with_neg_inf(equation, sizes)
    grad = torch.randn(brute("real", equation, *xs).shape, dtype=torch.float64)
    mask = [True] * len(xs)
    want = R.log_einsum_backward(
        R.compile_equation(equation), xs, mask, grad, bs(R, block), grad_of_neg_inf=value
    )
    got = ours(S.log_einsum_backward, equation, xs, mask, grad, bs(S, block), grad_of_neg_inf=value)
    close(got, want)
    # The same through autograd.
    ref_in, our_in = leaves(xs), leaves(xs)
    out_r = R.log_einsum(
        R.compile_equation(equation), *ref_in, block_size=bs(R, block), grad_of_neg_inf=value
    )
    (out_r * grad).sum().backward()
    out_s = ours(S.log_einsum, equation, *our_in, block_size=bs(S, block), grad_of_neg_inf=value)
    (out_s * grad).sum().backward()
    close(out_s, out_r)
    assert not torch.isnan(out_s).any()
    close([x.grad for x in our_in], [x.grad for x in ref_in])


def neg_inf_oracle(
    equation: str, xs: Sequence[Tensor], grad: Tensor, value: float | str
) -> list[Tensor]:
    """Input gradients of log-einsum with DESIGN §3.1's grad_of_neg_inf rule (float64).

    Each term's weight is its softmax weight in its output cell, or -- in a cell
    whose terms are all -inf -- ``value`` (``1/N`` for ``'uniform'``); the
    gradient of an input entry is the sum over terms of weight * grad[cell] *
    (how many times the entry occurs in the term), i.e. a VJP through the
    broadcast sum that builds the terms.
    """
    leaves_ = [x.detach().clone().requires_grad_(True) for x in xs]
    tensors, output, summed, size = joint(equation, *leaves_)
    full = [size[c] for c in output + summed]
    terms = tensors[0].expand(full)
    for t in tensors[1:]:
        terms = terms + t
    terms = terms.expand(full).reshape([size[c] for c in output] + [-1])
    n = terms.shape[-1]
    with torch.no_grad():
        dead = (terms == NEG_INF).all(-1, keepdim=True)
        soft = torch.softmax(torch.where(dead, 0.0, terms), -1)
        fill = 1.0 / n if value == "uniform" else float(value)
        weights = torch.where(dead, fill, soft) * grad.unsqueeze(-1)
    return list(torch.autograd.grad(terms, leaves_, weights))


@pytest.mark.parametrize("value", ["uniform", 0.5, -2.0, 0.0, NAN], ids=str)
@pytest.mark.parametrize("block", [1, 3, "auto"], ids=["bs1", "bs3", "auto"])
@pytest.mark.parametrize(("equation", "sizes"), NEG_INF_CASES, ids=NEG_INF_IDS)
def test_grad_of_neg_inf_against_oracle(equation, sizes, block, value):
    xs = with_neg_inf(equation, sizes, seed=3)
    grad = torch.randn(brute("real", equation, *xs).shape, dtype=torch.float64)
    want = neg_inf_oracle(equation, xs, grad, value)
    got = ours(
        S.log_einsum_backward,
        equation,
        xs,
        [True] * len(xs),
        grad,
        bs(S, block),
        grad_of_neg_inf=value,
    )
    close(got, want)
    our_in = leaves(xs)
    out = ours(S.log_einsum, equation, *our_in, block_size=bs(S, block), grad_of_neg_inf=value)
    close(out, brute("log", equation, *xs))
    (out * grad).sum().backward()
    close([x.grad for x in our_in], want)


@pytest.mark.parametrize("value", ["uniform", 0.5])
def test_grad_of_neg_inf_hand_derived(value):
    """'ij,jk->i' with row 0 of A at -inf: cell 0 has N = J*K terms, all -inf.

    A[0, j] occurs in K terms of cell 0: its gradient is K * w * g[0]; each
    B[j, k] occurs once in cell 0 (w * g[0]) plus its ordinary softmax share
    of the finite cells 1 and 2.
    """
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4, 5, generator=g, dtype=torch.float64)
    a[0] = NEG_INF
    grad = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    w = 1.0 / 20 if value == "uniform" else value
    a1, b1 = a[1:].clone().requires_grad_(True), b.clone().requires_grad_(True)
    finite = torch.logsumexp((a1[:, :, None] + b1[None]).flatten(1), -1)
    ga1, gb1 = torch.autograd.grad((finite * grad[1:]).sum(), (a1, b1))
    want_a = torch.cat([torch.full((1, 4), 5 * w * 0.7, dtype=torch.float64), ga1])
    want_b = gb1 + w * 0.7
    for block in (1, 3, S.AUTOMATIC_BLOCK_SIZE):
        got = ours(
            S.log_einsum_backward,
            "ij,jk->i",
            [a, b],
            [True, True],
            grad,
            block,
            grad_of_neg_inf=value,
        )
        close(got, [want_a, want_b])


@pytest.mark.parametrize("block", [1, "auto"], ids=["bs1", "auto"])
def test_log_grad_finite_cell_with_dead_partial_sum(block):
    """Default grad_of_neg_inf=NaN: only *output* cells whose terms are all -inf get NaN.

    Row 0 and column 0 of B are all -inf, so every term through j=0 or k=0 is
    -inf (a pairwise plan, in either order, has a partial sum that is all
    -inf), but every output cell of 'ij,jk,kl->il' still has finite terms:
    all gradients are finite and equal the logsumexp oracle's (and the
    reference's, which sums all contracted indices jointly).
    """
    g = torch.Generator().manual_seed(9)
    a = torch.randn(2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, 4, generator=g, dtype=torch.float64)
    c = torch.randn(4, 2, generator=g, dtype=torch.float64)
    b[:, 0] = NEG_INF
    b[0, :] = NEG_INF
    xs = [a, b, c]
    equation = "ij,jk,kl->il"
    o = leaves(xs)
    brute("log", equation, *o).sum().backward()
    want = [x.grad for x in o]
    assert all(torch.isfinite(w).all() for w in want)
    r = leaves(xs)
    R.log_einsum(R.compile_equation(equation), *r, block_size=bs(R, block)).sum().backward()
    close([x.grad for x in r], want)
    ones = torch.ones(2, 2, dtype=torch.float64)
    close(ours(S.log_einsum_backward, equation, xs, [True] * 3, ones, bs(S, block)), want)
    ls = leaves(xs)
    ours(S.log_einsum, equation, *ls, block_size=bs(S, block)).sum().backward()
    close([x.grad for x in ls], want)


# ------------------------------------------------------------------ Viterbi
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_viterbi_matches_reference(equation, sizes, block):
    xs = make(equation, sizes)  # continuous random data: no ties
    want_v, want_a = R.log_viterbi_einsum_forward(
        R.compile_equation(equation), *xs, block_size=bs(R, block)
    )
    result = ours(S.log_viterbi_einsum_forward, equation, *xs, block_size=bs(S, block))
    assert isinstance(result, tuple) and len(result) == 2
    got_v, got_a = result
    out_shape, summed = summed_sizes(equation, xs)
    assert list(got_v.shape) == out_shape
    assert list(got_a.shape) == out_shape + [len(summed)]
    assert got_a.dtype == torch.int64
    close(got_v, want_v)
    assert torch.equal(got_a, want_a)
    oracle_v, oracle_a = brute_viterbi(equation, *xs)
    close(got_v, oracle_v)
    assert torch.equal(got_a, oracle_a)


# ------------------------------------------------------------------ compute_sum protocol
class WindowLog:
    """A viterbi-like callback using ``include_indexes=True``, recording every window."""

    def __init__(self, equation: str, xs: Sequence[Tensor], positional: bool = False) -> None:
        self.out_shape, self.summed = summed_sizes(equation, xs)
        self.storages = {x.untyped_storage().data_ptr() for x in xs}
        self.windows: list[tuple[slice, ...]] = []
        self.positional = positional

    def sum_block(
        self, a: Tensor, dims: tuple[int, ...], var_values: tuple[Any, ...]
    ) -> tuple[Tensor, Tensor]:
        nout, k = len(self.out_shape), len(self.summed)
        assert isinstance(dims, tuple) and dims == tuple(range(nout, nout + k))
        assert isinstance(var_values, tuple) and len(var_values) == k
        assert list(a.shape[:nout]) == self.out_shape
        extents = []
        for v, size in zip(var_values, self.summed):
            assert isinstance(v, slice)  # DESIGN §3.1 (the reference's docs say range)
            assert isinstance(v.start, int) and isinstance(v.stop, int)
            assert 0 <= v.start < v.stop <= size
            extents.append(v.stop - v.start)
        assert list(a.shape[nout:]) == extents
        assert a.untyped_storage().data_ptr() not in self.storages  # never a view of an input
        self.windows.append(tuple(slice(v.start, v.stop) for v in var_values))
        flat = a.reshape(self.out_shape + [-1])
        values, index = flat.max(-1)
        coords = []
        for extent in reversed(extents):
            coords.append(index % extent)
            index = index // extent
        coords.reverse()
        starts = torch.tensor([v.start for v in var_values], dtype=torch.int64)
        if coords:
            argmax = torch.stack(coords, -1) + starts
        else:
            argmax = torch.zeros(self.out_shape + [0], dtype=torch.int64)
        a.fill_(math.pi)  # scribbling on the window is allowed: it is ours
        return values, argmax

    @staticmethod
    def add(acc: tuple[Tensor, Tensor], part: tuple[Tensor, Tensor]) -> None:
        better = part[0] > acc[0]
        acc[0][...] = torch.where(better, part[0], acc[0])
        acc[1][...] = torch.where(better.unsqueeze(-1), part[1], acc[1])

    @staticmethod
    def mul(a: Tensor, b: Tensor) -> None:
        a += b

    def __call__(self, compute_sum: Callable[..., Any]) -> Any:
        dtypes = (None, torch.int64)
        if self.positional:
            return compute_sum(self.add, self.sum_block, self.mul, True, dtypes)
        return compute_sum(
            self.add, self.sum_block, self.mul, include_indexes=True, output_dtypes=dtypes
        )

    def check_tiling(self, block: int | str) -> None:
        cover = torch.zeros(self.summed, dtype=torch.int64)
        for window in self.windows:
            cover[window] += 1
            if isinstance(block, int):
                assert all(s.stop - s.start <= block for s in window)
        assert (cover == 1).all(), "windows must tile the summed index space exactly once"


@pytest.mark.parametrize("positional", [False, True], ids=["kw", "positional"])
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_compute_sum_include_indexes(equation, sizes, block, positional):
    xs = make(equation, sizes)
    ref_cb = WindowLog(equation, xs, positional)
    want = R.semiring_einsum_forward(R.compile_equation(equation), xs, bs(R, block), ref_cb)
    ref_cb.check_tiling(block)  # validates this test's callback on the reference
    our_cb = WindowLog(equation, xs, positional)
    got = ours(S.semiring_einsum_forward, S.compile_equation(equation), xs, bs(S, block), our_cb)
    our_cb.check_tiling(block)
    assert isinstance(got, tuple) and len(got) == 2
    close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    close(list(got), list(R.log_viterbi_einsum_forward(R.compile_equation(equation), *xs)))


def _logsumexp_two_pass(compute_sum: Callable[..., Any]) -> dict[str, Tensor]:
    """The reference's own pattern: a max pass, then a sum-of-exp pass using it."""

    def max_in_place(a: Tensor, b: Tensor) -> None:
        torch.maximum(a, b, out=a)

    def max_block(a: Tensor, dims: tuple[int, ...]) -> Tensor:
        return a.amax(dims) if dims else a

    def add_in_place(a: Tensor, b: Tensor) -> None:
        a.add_(b)

    def sum_block(a: Tensor, dims: tuple[int, ...]) -> Tensor:
        return a.sum(dims) if dims else a

    m = compute_sum(max_in_place, max_block, add_in_place)
    m.nan_to_num_(nan=NAN)  # clip ±inf to the finite range, like the reference

    def sumexpsub_block(a: Tensor, dims: tuple[int, ...]) -> Tensor:
        a.sub_(m.view(m.shape + (1,) * len(dims)))
        a.exp_()
        return sum_block(a, dims)

    s = compute_sum(add_in_place, sumexpsub_block, add_in_place, output_dtypes=(None,))
    out = s.log() + m
    return {"out": out, "max": m, "sumexpsub": s}


def _count_calls(cb: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    calls: list[int] = []

    def func(compute_sum: Callable[..., Any]) -> Any:
        calls.append(1)
        return cb(compute_sum)

    return func, calls


@pytest.mark.parametrize("neg_inf", [False, True], ids=["finite", "neg_inf"])
@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_compute_sum_two_pass(equation, sizes, block, neg_inf):
    xs = (with_neg_inf if neg_inf else make)(equation, sizes)
    want = R.semiring_einsum_forward(
        R.compile_equation(equation), xs, bs(R, block), _logsumexp_two_pass
    )
    func, calls = _count_calls(_logsumexp_two_pass)
    got = ours(S.semiring_einsum_forward, equation, xs, bs(S, block), func)
    assert calls == [1]  # func is called exactly once; its result is returned as is
    assert isinstance(got, dict) and set(got) == {"out", "max", "sumexpsub"}
    for key in got:
        close(got[key], want[key])
    close(got["out"], brute("log", equation, *xs))


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), SMALL, ids=SMALL_IDS)
def test_compute_sum_plain_real(equation, sizes, block):
    xs = make(equation, sizes)
    want = R.semiring_einsum_forward(R.compile_equation(equation), xs, bs(R, block), _real_cb)
    got = ours(S.semiring_einsum_forward, equation, xs, bs(S, block), _real_cb)
    close(got, want)
    got.add_(1.0)  # the result is ours to modify (the guard in ours() already ran)
    close(xs, make(equation, sizes), rtol=0, atol=0)


# ------------------------------------------------------------------ combine
def _scaled_ops(module: Any) -> tuple[Callable[..., Tensor], Callable[..., list[Any]], list]:
    """A forward with a forward-only option and a backward with a backward-only one."""
    seen: list[tuple[bool, ...]] = []

    def forward(equation: Any, *args: Tensor, block_size: Any, fscale: float = 1.0) -> Tensor:
        return module.real_einsum_forward(equation, *args, block_size=block_size) * fscale

    def backward(
        equation: Any,
        args: Sequence[Tensor],
        needs_grad: Sequence[bool],
        grad: Tensor,
        block_size: Any,
        bscale: float = 1.0,
    ) -> list[Any]:
        seen.append(tuple(bool(n) for n in needs_grad))
        grads = module.real_einsum_backward(equation, args, needs_grad, grad, block_size)
        return [None if g is None else g * bscale for g in grads]

    return forward, backward, seen


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS[:4], ids=EQ_IDS[:4])
def test_combine_round_trip(equation, sizes, block):
    xs = make(equation, sizes)
    weight = torch.randn(brute("real", equation, *xs).shape, dtype=torch.float64)
    results = {}
    for module in (R, S):
        fwd, bwd, seen = _scaled_ops(module)
        f = module.combine(fwd, bwd, forward_options=("fscale",), backward_options=("bscale",))
        inputs = leaves(xs)
        inputs[0].requires_grad_(False)
        eq = module.compile_equation(equation)
        call = ours if module is S else (lambda fn, *a, **k: fn(*a, **k))
        out = call(f, eq, *inputs, block_size=bs(module, block), fscale=2.0, bscale=3.0)
        (out * weight).sum().backward()
        results[module] = (out, [x.grad for x in inputs], seen)
        with pytest.raises(TypeError):
            f(eq, *inputs, block_size=bs(module, block), bogus=1.0)
    (out_s, grads_s, seen_s), (out_r, grads_r, seen_r) = results[S], results[R]
    close(out_s, out_r)
    close(out_s, 2.0 * torch.einsum(equation, *xs))
    assert grads_s[0] is None
    close(grads_s, grads_r)
    assert seen_s == seen_r == [(False,) + (True,) * (len(xs) - 1)]


@pytest.mark.parametrize("block", [1, 3, "auto"], ids=["bs1", "bs3", "auto"])
def test_combine_with_library_functions(block):
    equation, sizes = NEG_INF_CASES[0]
    xs = with_neg_inf(equation, sizes)
    grad = torch.randn(3, 5, dtype=torch.float64)
    ref_in, our_in = leaves(xs), leaves(xs)
    out_r = R.log_einsum(
        R.compile_equation(equation), *ref_in, block_size=bs(R, block), grad_of_neg_inf=0.0
    )
    (out_r * grad).sum().backward()
    f = S.combine(S.log_einsum_forward, S.log_einsum_backward, (), ("grad_of_neg_inf",))
    out_s = ours(f, equation, *our_in, block_size=bs(S, block), grad_of_neg_inf=0.0)
    (out_s * grad).sum().backward()
    close(out_s, out_r)
    close([x.grad for x in our_in], [x.grad for x in ref_in])
    # And the real pair, under torch.func.grad as the combine docstring promises.
    g = S.combine(S.real_einsum_forward, S.real_einsum_backward)
    a, b = make("ij,jk->ik", dict(i=3, j=4, k=5))
    with unchanged(a, b):
        got = torch.func.grad(lambda x: g("ij,jk->ik", x, b, block_size=bs(S, block)).sum())(a)
    close(got, torch.ones(3, 5, dtype=torch.float64) @ b.T)


# ------------------------------------------------------------------ size-0 summed index
ZERO_CASES = [
    ("ij,jk->ik", [(3, 0), (0, 5)]),
    ("i,i->", [(0,), (0,)]),
    ("bij,bjk->bik", [(2, 3, 0), (2, 0, 4)]),
    ("ab,bc,cd->ad", [(2, 3), (3, 0), (0, 4)]),
]


ZERO_IDS = [e for e, _ in ZERO_CASES]


def _zero_operands(shapes: Sequence[tuple[int, ...]]) -> tuple[list[Tensor], list[int], int]:
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    out_shape, summed = summed_sizes(ZERO_EQ[tuple(shapes)], xs)
    return xs, out_shape, len(summed)


ZERO_EQ = {tuple(shapes): eq for eq, shapes in ZERO_CASES}


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "shapes"), ZERO_CASES, ids=ZERO_IDS)
def test_size_zero_summed_index_real_and_log(equation, shapes, block):
    """The semiring zero: 0 for real, -inf for log (the reference cannot do this)."""
    xs, out_shape, _ = _zero_operands(shapes)
    b = bs(S, block)
    real = ours(S.real_einsum_forward, equation, *xs, block_size=b)
    close(real, torch.zeros(out_shape, dtype=torch.float64))
    close(ours(S.einsum, equation, *xs, block_size=b), real)
    close(real, brute("real", equation, *xs))
    log = ours(S.log_einsum, equation, *xs, block_size=b)
    close(log, torch.full(out_shape, NEG_INF, dtype=torch.float64))
    close(ours(S.log_einsum_forward, equation, *xs, block_size=b), log)
    close(log, brute("log", equation, *xs))


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "shapes"), ZERO_CASES, ids=ZERO_IDS)
def test_size_zero_summed_index_viterbi(equation, shapes, block):
    """Viterbi over an empty sum: value -inf, argmax zeros of shape out + (k,)."""
    xs, out_shape, k = _zero_operands(shapes)
    values, argmax = ours(S.log_viterbi_einsum_forward, equation, *xs, block_size=bs(S, block))
    close(values, torch.full(out_shape, NEG_INF, dtype=torch.float64))
    assert argmax.dtype == torch.int64 and list(argmax.shape) == out_shape + [k]
    assert torch.equal(argmax, torch.zeros_like(argmax))
    oracle_v, oracle_a = brute_viterbi(equation, *xs)
    close(values, oracle_v)
    assert torch.equal(argmax, oracle_a)


@pytest.mark.parametrize("block", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize(("equation", "shapes"), ZERO_CASES, ids=ZERO_IDS)
def test_size_zero_summed_index_gradients(equation, shapes, block):
    """Gradients exist, are finite and have the operands' shapes."""
    xs, out_shape, _ = _zero_operands(shapes)
    b = bs(S, block)
    grad = torch.randn(out_shape, dtype=torch.float64)
    for fn in (S.real_einsum_backward, S.log_einsum_backward):
        grads = ours(fn, equation, xs, [True] * len(xs), grad, b)
        assert [tuple(g.shape) for g in grads] == [tuple(x.shape) for x in xs]
        assert all(torch.isfinite(g).all() for g in grads)
    for fn, semiring in ((S.einsum, "real"), (S.log_einsum, "log")):
        ls, os_ = leaves(xs), leaves(xs)
        (ours(fn, equation, *ls, block_size=b) * grad).sum().backward()
        (brute(semiring, equation, *os_) * grad).sum().backward()
        close([x.grad for x in ls], [x.grad for x in os_])


# ------------------------------------------------------------------ drop-in usage
def _user_code(tse: Any) -> list[Any]:
    """Code as written against torch_semiring_einsum's README, run with either package."""
    g = torch.Generator().manual_seed(11)
    equation = tse.compile_equation("bik,bkj->bij")
    a = torch.rand(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(4, 5, 7, generator=g, dtype=torch.float64)
    c = tse.einsum(equation, a, b, block_size=10)
    c.sum().backward()
    ga, a.grad = a.grad, None
    d = tse.log_einsum(equation, a, b, block_size=10)
    d.sum().backward()
    gd = a.grad
    v, am = tse.log_viterbi_einsum_forward(equation, a.detach(), b, block_size=10)
    r = tse.real_einsum_forward(equation, a.detach(), b, block_size=tse.AUTOMATIC_BLOCK_SIZE)
    lf = tse.log_einsum_forward(equation, a.detach(), b, block_size=2, return_max=True)
    auto = tse.AutomaticBlockSize(max_cpu_bytes=1 << 12)
    small = tse.log_einsum(equation, a.detach(), b, block_size=auto)
    return [c, ga, d, gd, v, am, r, list(lf), small]


def test_import_as_torch_semiring_einsum():
    import semiring_einsum as torch_semiring_einsum

    got = _user_code(torch_semiring_einsum)
    want = _user_code(R)
    assert got[-4].shape == got[-5].shape + (1,)  # argmax: one summed index (k)
    close(got, want)


# ------------------------------------------------------------------ torch.func
@pytest.mark.parametrize("block", [1, "auto"], ids=["bs1", "auto"])
def test_top_level_under_torch_func_grad(block):
    b_ = bs(S, block)
    a, b = make("ij,jk->ik", dict(i=3, j=4, k=5))
    a_ = a.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(brute("log", "ij,jk->ik", a_, b).sum(), a_)
    with unchanged(a, b):
        got = torch.func.grad(lambda x: S.log_einsum("ij,jk->ik", x, b, block_size=b_).sum())(a)
    close(got, want)
    (want,) = torch.autograd.grad(brute("real", "ij,jk->ik", a_, b).sum(), a_)
    for fn in (S.einsum, S.real_einsum_forward):
        with unchanged(a, b):
            got = torch.func.grad(lambda x, fn=fn: fn("ij,jk->ik", x, b, block_size=b_).sum())(a)
        close(got, want)
    # All operands of the reference equation at once.
    equation, sizes = EQUATIONS[0]
    xs = make(equation, dict(a=2, b=2, c=3, d=2, e=3, f=2))
    ls = leaves(xs)
    want = torch.autograd.grad(brute("log", equation, *ls).sum(), ls)
    with unchanged(*xs):
        got = torch.func.grad(
            lambda *ys: S.log_einsum(equation, *ys, block_size=b_).sum(), argnums=(0, 1, 2)
        )(*xs)
    close(list(got), list(want))
    # vmap over a batch of left operands.
    batch = torch.randn(4, 3, 4, dtype=torch.float64)
    with unchanged(batch, b):
        got = torch.func.vmap(lambda x: S.log_einsum("ij,jk->ik", x, b, block_size=b_))(batch)
    close(got, torch.stack([brute("log", "ij,jk->ik", x, b) for x in batch]))


def test_combine_option_listed_twice_reaches_both():
    """A keyword in both option lists goes to forward *and* backward, as documented.

    (The reference pops it for the forward, so its backward never sees it.)
    """
    seen: dict[str, Any] = {}

    def fwd(equation: Any, *args: Tensor, block_size: Any, opt: Any = None) -> Tensor:
        seen["forward"] = opt
        return S.real_einsum_forward(equation, *args, block_size=block_size)

    def bwd(equation: Any, args: Any, needs: Any, grad: Tensor, block_size: Any, opt: Any = None):
        seen["backward"] = opt
        return S.real_einsum_backward(equation, args, needs, grad, block_size)

    f = S.combine(fwd, bwd, ("opt",), ("opt",))
    x = torch.ones(3, requires_grad=True)
    ours(f, "i->", x, block_size=1, opt=5).backward()
    assert seen == {"forward": 5, "backward": 5}
    close(x.grad, torch.ones(3))


def test_combine_in_a_loop_makes_no_new_functions():
    """combine() called again with the same functions reuses its rule, so the autograd
    Function classes made for it stay the same; clear_caches() forgets them."""
    from semiring_einsum.func import _autograd

    def run(f: Callable[..., Tensor]) -> Tensor:
        x = torch.arange(6.0).reshape(2, 3).requires_grad_()
        f(S.compile_equation("ij->i"), x, block_size=2).sum().backward()
        assert x.grad is not None
        return x.grad

    close(run(S.combine(S.real_einsum_forward, S.real_einsum_backward)), torch.ones(2, 3))
    made = set(_autograd._MADE.keys())
    assert made  # (its Function was made on demand)
    for _ in range(20):
        f = S.combine(S.real_einsum_forward, S.real_einsum_backward)
        close(run(f), torch.ones(2, 3))
    assert set(_autograd._MADE.keys()) == made
    other = S.combine(S.log_einsum_forward, S.log_einsum_backward)
    x = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    other(S.compile_equation("ij->i"), x, block_size=2).sum().backward()
    close(x.grad, torch.full((2, 3), 1 / 3, dtype=torch.float64))
    assert len(set(_autograd._MADE.keys()) - made) == 1  # a new pair, a new Function
    prebuilt = dict(_autograd._FUNCTIONS)
    S.func.clear_caches()
    assert len(_autograd._MADE) == 0 and _autograd._FUNCTIONS == prebuilt
