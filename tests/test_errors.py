"""Bad input (DESIGN §3 "Bad input"): early, specific errors with context.

Every error names the equation and, where there is one, the operand and the
index at fault.  Errors are raised before any computation and leave the
inputs untouched.  Messages are checked by fragments (the quoted equation,
``operand k``, ``'j'``, the sizes) rather than by their exact wording.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from semiring_einsum import func
from semiring_einsum.func import EquationError

Tensor = torch.Tensor


def has(*fragments: str) -> str:
    """A regex that matches a message containing every fragment, in any order.

    Fragments are literal text, except those made by :func:`n` (a whole number).
    """
    parts = (f[3:] if f.startswith("re:") else re.escape(f) for f in fragments)
    return "(?s)^" + "".join(f"(?=.*{p})" for p in parts)


def n(k: int) -> str:
    """A fragment for the number ``k`` as a whole word (so 1 does not match 12)."""
    return rf"re:(?<![\d.]){k}(?![\d.])"


def quoted(equation: str) -> str:
    """How a message quotes the equation."""
    return repr(equation)


PLAIN = func.Semiring(
    "plain", torch.add, torch.mul, lambda x, dims: x.sum(dims) if dims else x, 0.0, 1.0
)


def _viterbi(eq: str, *xs: object, **kw: object) -> object:
    return func.viterbi_einsum(eq, *xs, **kw)  # type: ignore[arg-type]


def _semiring_log(eq: str, *xs: object, **kw: object) -> object:
    return func.semiring_einsum(func.LOG, eq, *xs, **kw)  # type: ignore[arg-type]


def _semiring_custom(eq: str, *xs: object, **kw: object) -> object:
    return func.semiring_einsum(PLAIN, eq, *xs, **kw)  # type: ignore[arg-type]


FUNCS: dict[str, Callable[..., object]] = {
    "einsum": func.einsum,
    "log_einsum": func.log_einsum,
    "max_einsum": func.max_einsum,
    "min_einsum": func.min_einsum,
    "viterbi_einsum": _viterbi,
    "semiring_einsum_log": _semiring_log,
    "semiring_einsum_custom": _semiring_custom,
}
# viterbi_einsum only does joint plans (optimize=False); it has no optimize errors.
PATH_FUNCS = {k: v for k, v in FUNCS.items() if k != "viterbi_einsum"}
FLOAT_ONLY = {k: v for k, v in FUNCS.items() if k not in ("einsum", "semiring_einsum_custom")}

all_funcs = pytest.mark.parametrize("fn", list(FUNCS.values()), ids=list(FUNCS))
path_funcs = pytest.mark.parametrize("fn", list(PATH_FUNCS.values()), ids=list(PATH_FUNCS))
float_funcs = pytest.mark.parametrize("fn", list(FLOAT_ONLY.values()), ids=list(FLOAT_ONLY))


def t(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(shape).to(dtype)


# ------------------------------------------------------------- operand count
@all_funcs
def test_too_few_operands(fn: Callable[..., object]) -> None:
    eq = "ij,jk->ik"
    with pytest.raises(EquationError, match=has(quoted(eq), "2 operand", n(1))):
        fn(eq, t(2, 3))


@all_funcs
def test_too_many_operands(fn: Callable[..., object]) -> None:
    eq = "ij,jk->ik"
    with pytest.raises(EquationError, match=has(quoted(eq), "2 operand", n(3))):
        fn(eq, t(2, 3), t(3, 4), t(4, 5))


@all_funcs
def test_wrong_operand_count_implicit_output(fn: Callable[..., object]) -> None:
    eq = "ij,jk"
    with pytest.raises(EquationError, match=has(quoted(eq), "2 operand", n(1))):
        fn(eq, t(2, 3))


@all_funcs
def test_trailing_comma_counts_an_operand(fn: Callable[..., object]) -> None:
    eq = "ij,"
    with pytest.raises(EquationError, match=has(quoted(eq), "2 operand", n(1))):
        fn(eq, t(2, 3))


# ------------------------------------------------------------- rank mismatch
@all_funcs
def test_operand_with_more_dims_than_subscripts(fn: Callable[..., object]) -> None:
    eq = "ij,jk->ik"
    with pytest.raises(EquationError, match=has(quoted(eq), "operand 0", "3 dimension", n(2))):
        fn(eq, t(2, 3, 1), t(3, 4))


@all_funcs
def test_operand_with_fewer_dims_than_subscripts(fn: Callable[..., object]) -> None:
    eq = "ij,jk->ik"
    with pytest.raises(EquationError, match=has(quoted(eq), "operand 1", "1 dimension", n(2))):
        fn(eq, t(2, 3), t(3))


@all_funcs
def test_scalar_operand_for_a_vector_subscript(fn: Callable[..., object]) -> None:
    eq = "i->"
    with pytest.raises(EquationError, match=has(quoted(eq), "operand 0", "0 dimension", n(1))):
        fn(eq, torch.tensor(1.0))


@all_funcs
def test_ellipsis_operand_with_too_few_dims(fn: Callable[..., object]) -> None:
    eq = "...ij,jk->ik"
    with pytest.raises(EquationError, match=has(quoted(eq), "operand 0", "1 dimension", n(2))):
        fn(eq, t(2), t(3, 4))


# ------------------------------------------------------------- size mismatch
@all_funcs
def test_shared_index_size_mismatch(fn: Callable[..., object]) -> None:
    eq = "ij,jk->ik"
    expected = "index 'j' has size 3 in operand 0 but 4 in operand 1 (equation 'ij,jk->ik')"
    with pytest.raises(EquationError, match=re.escape(expected)):
        fn(eq, t(2, 3), t(4, 5))


@all_funcs
def test_size_mismatch_names_the_operands_at_fault(fn: Callable[..., object]) -> None:
    # operand 0 broadcasts j (size 1); the clash is between operands 1 and 2
    eq = "ij,jk,jl->ikl"
    with pytest.raises(
        EquationError, match=has(quoted(eq), "'j'", "operand 1", "operand 2", n(3), n(4))
    ):
        fn(eq, t(2, 1), t(3, 4), t(4, 5))


@all_funcs
def test_size_mismatch_between_diagonal_and_other_operand(fn: Callable[..., object]) -> None:
    eq = "ii,i->i"
    with pytest.raises(
        EquationError, match=has(quoted(eq), "'i'", "operand 0", "operand 1", n(3), n(4))
    ):
        fn(eq, t(3, 3), t(4))


@all_funcs
def test_ellipsis_size_mismatch(fn: Callable[..., object]) -> None:
    eq = "...i,...i->..."
    with pytest.raises(
        EquationError, match=has(quoted(eq), "'...'", "operand 0", "operand 1", n(2), n(4))
    ):
        fn(eq, t(2, 3), t(4, 3))


@all_funcs
def test_repeated_index_in_one_operand_with_different_sizes(fn: Callable[..., object]) -> None:
    eq = "ii->i"
    with pytest.raises(EquationError, match=has(quoted(eq), "'i'", "operand 0", n(2), n(3))):
        fn(eq, t(2, 3))


@all_funcs
def test_repeated_index_in_second_operand_with_different_sizes(
    fn: Callable[..., object],
) -> None:
    eq = "ij,jkk->ik"
    with pytest.raises(EquationError, match=has(quoted(eq), "'k'", "operand 1", n(4), n(5))):
        fn(eq, t(2, 3), t(3, 4, 5))


# ------------------------------------------------------------- output errors
@all_funcs
def test_output_index_in_no_operand(fn: Callable[..., object]) -> None:
    eq = "ab,bc->ad"
    with pytest.raises(EquationError, match=has(quoted(eq), "'d'", "output")):
        fn(eq, t(2, 3), t(3, 4))


@all_funcs
def test_repeated_output_index(fn: Callable[..., object]) -> None:
    eq = "ab,bc->aa"
    with pytest.raises(EquationError, match=has(quoted(eq), "'a'", "output", "repeated")):
        fn(eq, t(2, 3), t(3, 4))


@all_funcs
def test_ellipsis_in_output_but_in_no_input(fn: Callable[..., object]) -> None:
    eq = "ij,jk->...ik"
    with pytest.raises(EquationError, match=has(quoted(eq), "'...'", "output")):
        fn(eq, t(2, 3), t(3, 4))


@all_funcs
def test_ellipsis_twice_in_output(fn: Callable[..., object]) -> None:
    eq = "...i->......"
    with pytest.raises(EquationError, match=has(quoted(eq), "'...'", "output")):
        fn(eq, t(2, 3))


# ------------------------------------------------------------------- syntax
@all_funcs
@pytest.mark.parametrize(
    "eq,char,where",
    [
        ("i1,jk->ik", "'1'", "operand 0"),
        ("ij;jk", "';'", "operand 0"),
        ("ij,j_->i", "'_'", "operand 1"),
        ("ij,jk->i1", "'1'", "output"),
        ("ij,jk>ik", "'>'", "operand 1"),
        ("\u00efj,jk->ik", "'\u00ef'", "operand 0"),
    ],
)
def test_invalid_character(fn: Callable[..., object], eq: str, char: str, where: str) -> None:
    ops = [t(2, 3), t(3, 4)][: eq.split("->")[0].count(",") + 1]
    with pytest.raises(EquationError, match=has(quoted(eq), char, where)):
        fn(eq, *ops)


@all_funcs
@pytest.mark.parametrize(
    "eq,where",
    [
        ("i.j,jk->ik", "operand 0"),
        ("ij,jk->i.", "output"),
        ("ij..->i", "operand 0"),
        ("....i,jk->k", "operand 0"),
    ],
)
def test_stray_dot(fn: Callable[..., object], eq: str, where: str) -> None:
    with pytest.raises(EquationError, match=has(quoted(eq), "'.'", where)):
        fn(eq, t(2, 3), t(3, 4))


@all_funcs
def test_ellipsis_twice_in_an_operand(fn: Callable[..., object]) -> None:
    eq = "...i...,jk->ik"
    with pytest.raises(EquationError, match=has(quoted(eq), "'...'", "operand 0")):
        fn(eq, t(2, 3), t(3, 4))


@all_funcs
@pytest.mark.parametrize("eq", ["ij,jk->ik->i", "ij->->i"])
def test_two_arrows(fn: Callable[..., object], eq: str) -> None:
    ops = [t(2, 3), t(3, 4)][: eq.split("->")[0].count(",") + 1]
    with pytest.raises(EquationError, match=has(quoted(eq), "'->'")):
        fn(eq, *ops)


@all_funcs
@pytest.mark.parametrize("eq", [None, b"ij,jk->ik", 3])
def test_equation_not_a_string(fn: Callable[..., object], eq: object) -> None:
    with pytest.raises(TypeError, match=has("equation", type(eq).__name__)):
        fn(eq, t(2, 3), t(3, 4))


def test_equation_error_is_a_value_error() -> None:
    assert issubclass(EquationError, ValueError)
    with pytest.raises(ValueError):
        func.einsum("ab,bc->ad", t(2, 3), t(3, 4))


# ---------------------------------------------------------- operand types
@all_funcs
@pytest.mark.parametrize(
    "bad,k",
    [([[1.0] * 4] * 3, 1), (3.0, 0), (None, 1), ("ab", 0)],
    ids=["list", "float", "None", "str"],
)
def test_non_tensor_operand(fn: Callable[..., object], bad: object, k: int) -> None:
    eq = "ij,jk->ik"
    ops: list[object] = [t(2, 3), t(3, 4)]
    ops[k] = bad
    with pytest.raises(
        TypeError, match=has(quoted(eq), f"operand {k}", "Tensor", type(bad).__name__)
    ):
        fn(eq, *ops)


@float_funcs
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_operands_to_non_real_semirings(
    fn: Callable[..., object], dtype: torch.dtype
) -> None:
    eq = "ij,jk->ik"
    a = (torch.rand(2, 3) * 4).to(dtype)
    b = (torch.rand(3, 4) * 4).to(dtype)
    with pytest.raises(TypeError, match=has(quoted(eq), "floating", str(dtype))):
        fn(eq, a, b)


def test_integer_tensors_to_log_einsum() -> None:
    eq = "ij,jk->ik"
    a = torch.arange(6).reshape(2, 3)
    with pytest.raises(TypeError, match=has(quoted(eq), "floating", "int64")):
        func.log_einsum(eq, a, a.T)


# --------------------------------------------------------------- block_size
@all_funcs
@pytest.mark.parametrize(
    "block_size,exc",
    [
        (0, ValueError),
        (-1, ValueError),
        (1.5, TypeError),
        ("big", TypeError),
        (True, TypeError),
        (False, TypeError),
        (2.0, TypeError),
        ([4], TypeError),
    ],
    ids=["0", "-1", "1.5", "big", "True", "False", "2.0", "list"],
)
def test_invalid_block_size(
    fn: Callable[..., object], block_size: object, exc: type[Exception]
) -> None:
    eq = "ij,jk->ik"
    with pytest.raises(exc, match=has("block_size", quoted(eq))):
        fn(eq, t(2, 3), t(3, 4), block_size=block_size)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"max_cpu_bytes": 0}, "max_cpu_bytes"),
        ({"max_cpu_bytes": -1}, "max_cpu_bytes"),
        ({"max_cpu_bytes": 1.5}, "max_cpu_bytes"),
        ({"max_cpu_bytes": "1"}, "max_cpu_bytes"),
        ({"max_cpu_bytes": None}, "max_cpu_bytes"),
        ({"max_cpu_bytes": True}, "max_cpu_bytes"),
        ({"max_cuda_bytes": 0}, "max_cuda_bytes"),
        ({"max_cuda_bytes": -5}, "max_cuda_bytes"),
        ({"max_cuda_bytes": 2.5}, "max_cuda_bytes"),
        ({"max_cuda_bytes": True}, "max_cuda_bytes"),
        ({"cuda_memory_proportion": 0}, "cuda_memory_proportion"),
        ({"cuda_memory_proportion": -0.1}, "cuda_memory_proportion"),
        ({"cuda_memory_proportion": 1.5}, "cuda_memory_proportion"),
        ({"cuda_memory_proportion": math.nan}, "cuda_memory_proportion"),
        ({"cuda_memory_proportion": "x"}, "cuda_memory_proportion"),
        ({"cuda_memory_proportion": None}, "cuda_memory_proportion"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) else v,
)
def test_invalid_automatic_block_size(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        func.AutomaticBlockSize(**kwargs)  # type: ignore[arg-type]


def test_valid_automatic_block_size_edges() -> None:
    func.AutomaticBlockSize(max_cpu_bytes=1, max_cuda_bytes=1, cuda_memory_proportion=1.0)
    func.AutomaticBlockSize(max_cuda_bytes=None, cuda_memory_proportion=1e-3)


# ---------------------------------------------------------- grad_of_neg_inf
@pytest.mark.parametrize(
    "value,exc,shown",
    [
        ("foo", ValueError, "'foo'"),
        ("Uniform", ValueError, "'Uniform'"),
        (None, TypeError, "NoneType"),
        (True, TypeError, "bool"),
        ([0.0], TypeError, "list"),
    ],
    ids=["foo", "Uniform", "None", "True", "list"],
)
def test_invalid_grad_of_neg_inf(value: object, exc: type[Exception], shown: str) -> None:
    with pytest.raises(exc, match=has("grad_of_neg_inf", shown)):
        func.log_einsum("ij,jk->ik", t(2, 3), t(3, 4), grad_of_neg_inf=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [math.nan, 0.0, 1, -2.5, math.inf, "uniform"])
def test_valid_grad_of_neg_inf_is_accepted(value: object) -> None:
    out = func.log_einsum("ij,jk->ik", t(2, 3), t(3, 4), grad_of_neg_inf=value)  # type: ignore[arg-type]
    assert out.shape == (2, 4)


# ----------------------------------------------------------------- optimize
CHAIN = "ab,bc,cd->ad"


def chain_ops() -> list[Tensor]:
    return [t(2, 3), t(3, 4), t(4, 5)]


@path_funcs
@pytest.mark.parametrize(
    "path",
    [
        [(0, 5), (0, 1)],  # index out of range
        [(0, 1), (0, 2)],  # index out of range after the first step
        [(-1, 0), (0, 1)],  # negative index
        [(0, 1)],  # leaves two operands
        [],  # no step at all
        [(0, 1), (0, 1), (0, 1)],  # one step too many
        [(), (0, 1, 2)],  # an empty step
        [(0, 0), (0, 1)],  # the same operand twice in one step
        [(0, 1, 1)],  # the same operand twice, single step
    ],
    ids=["oob", "oob2", "neg", "short", "empty", "long", "emptystep", "dup", "dup1"],
)
def test_invalid_explicit_path(fn: Callable[..., object], path: list[tuple[int, ...]]) -> None:
    with pytest.raises(EquationError, match=has(quoted(CHAIN), "path")):
        fn(CHAIN, *chain_ops(), optimize=path)


@path_funcs
@pytest.mark.parametrize(
    "path", [["ab"], [(0.5, 1), (0, 1)], [(0, None), (0, 1)]], ids=["str", "float", "None"]
)
def test_explicit_path_with_non_integer_entries(fn: Callable[..., object], path: object) -> None:
    with pytest.raises((TypeError, EquationError), match=has(quoted(CHAIN), "path")):
        fn(CHAIN, *chain_ops(), optimize=path)


@path_funcs
def test_unknown_optimize_strategy(fn: Callable[..., object]) -> None:
    with pytest.raises(EquationError, match=has(quoted(CHAIN), "bogus")):
        fn(CHAIN, *chain_ops(), optimize="bogus")


@path_funcs
@pytest.mark.parametrize("optimize", [{}, {"a": 1}, 3.5], ids=["dict", "dict1", "float"])
def test_optimize_of_wrong_type(fn: Callable[..., object], optimize: object) -> None:
    with pytest.raises((TypeError, EquationError), match=has(quoted(CHAIN), "optimize")):
        fn(CHAIN, *chain_ops(), optimize=optimize)


# --------------------------------------------------------- semiring_einsum
@pytest.mark.parametrize(
    "semiring",
    ["log", None, torch.logaddexp, (torch.add, torch.mul)],
    ids=["str", "None", "fn", "tuple"],
)
def test_semiring_einsum_rejects_non_semiring(semiring: object) -> None:
    with pytest.raises(TypeError, match=has("Semiring", type(semiring).__name__)):
        func.semiring_einsum(semiring, "ij,jk->ik", t(2, 3), t(3, 4))  # type: ignore[arg-type]


# ------------------------------------------------------------------- plan()
@pytest.mark.parametrize(
    "shape,exc",
    [(None, TypeError), ("abc", TypeError), ((3.7, 4), TypeError), ((3, -4), ValueError)],
    ids=["None", "str", "float", "negative"],
)
def test_plan_rejects_bad_shapes(shape: object, exc: type[Exception]) -> None:
    eq = "ij,jk->ik"
    with pytest.raises(exc, match=has(quoted(eq), "operand 1")):
        func.plan(eq, (2, 3), shape)  # type: ignore[arg-type]


def test_plan_reports_equation_errors() -> None:
    eq = "ij,jk->ik"
    expected = "index 'j' has size 3 in operand 0 but 4 in operand 1 (equation 'ij,jk->ik')"
    with pytest.raises(EquationError, match=re.escape(expected)):
        func.plan(eq, (2, 3), (4, 5))


# --------------------------------------- raised before computing, inputs kept
class OpRecorder(TorchDispatchMode):
    """Record every aten op that is not a view or a metadata query."""

    METADATA = {"aten.promote_types.default", "aten.result_type.Tensor"}

    def __init__(self) -> None:
        super().__init__()
        self.computed: list[str] = []

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not op.is_view and str(op) not in self.METADATA:
            self.computed.append(str(op))
        return op(*args, **(kwargs or {}))


def _bad_calls() -> dict[str, tuple[type[Exception], Callable[[], tuple[object, ...]]]]:
    """name -> (exception, builder of (equation, operands, kwargs))."""
    f32 = torch.float32

    def ops(*shapes: tuple[int, ...], dtype: torch.dtype = f32) -> list[Tensor]:
        return [torch.randn(s).to(dtype) for s in shapes]

    return {
        "count": (EquationError, lambda: ("ij,jk->ik", ops((2, 3)), {})),
        "rank": (EquationError, lambda: ("ij,jk->ik", ops((2, 3, 1), (3, 4)), {})),
        "size": (EquationError, lambda: ("ij,jk->ik", ops((2, 3), (4, 5)), {})),
        "diag": (EquationError, lambda: ("ii,ij->ij", ops((3, 3), (4, 2)), {})),
        "out_missing": (EquationError, lambda: ("ab,bc->ad", ops((2, 3), (3, 4)), {})),
        "out_repeated": (EquationError, lambda: ("ab,bc->aa", ops((2, 3), (3, 4)), {})),
        "char": (EquationError, lambda: ("i1,jk->ik", ops((2, 3), (3, 4)), {})),
        "non_tensor": (TypeError, lambda: ("ij,jk->ik", [*ops((2, 3)), 1.0], {})),
        "block_size": (ValueError, lambda: ("ij,jk->ik", ops((2, 3), (3, 4)), {"block_size": 0})),
        "block_size_broadcast": (
            ValueError,
            lambda: (
                "ij,jk->ik",
                [torch.randn(2, 3), torch.randn(1, 4).expand(3, 4)],
                {"block_size": 0},
            ),
        ),
        "block_size_float16": (
            ValueError,
            lambda: ("ij,jk->ik", ops((2, 3), (3, 4), dtype=torch.float16), {"block_size": 0}),
        ),
        "block_size_mixed_dtypes": (
            ValueError,
            lambda: (
                "ij,jk->ik",
                [torch.randn(2, 3), torch.randn(3, 4, dtype=torch.float64)],
                {"block_size": -1},
            ),
        ),
        "path": (
            EquationError,
            lambda: (CHAIN, ops((2, 3), (3, 4), (4, 5)), {"optimize": [(0, 5)]}),
        ),
        "path_mixed_dtypes": (
            EquationError,
            lambda: (
                CHAIN,
                [torch.randn(2, 3), torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 5)],
                {"optimize": [(0, 5)]},
            ),
        ),
    }


BAD = _bad_calls()


@pytest.mark.parametrize("fn", list(PATH_FUNCS.values()), ids=list(PATH_FUNCS))
@pytest.mark.parametrize("case", sorted(BAD))
def test_errors_come_before_any_computation(fn: Callable[..., object], case: str) -> None:
    exc, build = BAD[case]
    eq, operands, kwargs = build()
    tensors = [x for x in operands if isinstance(x, torch.Tensor)]
    before = [x.clone() for x in tensors]
    versions = [x._version for x in tensors]
    rec = OpRecorder()
    with pytest.raises(exc), rec:
        fn(eq, *operands, **kwargs)
    assert rec.computed == [], f"{case}: computed {rec.computed} before raising"
    for x, x0, v in zip(tensors, before, versions):
        assert torch.equal(x, x0)
        assert x._version == v


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_log_einsum_type_error_before_computation(dtype: torch.dtype) -> None:
    a = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    b = torch.arange(12, dtype=dtype).reshape(3, 4)
    rec = OpRecorder()
    with pytest.raises(TypeError, match="floating"), rec:
        func.log_einsum("ij,jk->ik", a, b)
    assert rec.computed == [], f"computed {rec.computed} before raising"


def test_errors_leave_requires_grad_inputs_untouched() -> None:
    a = torch.randn(2, 3, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    a0, b0 = a.detach().clone(), b.detach().clone()
    for fn in FUNCS.values():
        with pytest.raises(EquationError):
            fn("ij,jk->ik", a, b)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    assert a.grad is None and b.grad is None
