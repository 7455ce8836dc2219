"""The reference's module tree under ``semiring_einsum`` (DESIGN §2.1).

Code written for torch-semiring-einsum 1.2.0 imports more than its top level: its submodules
(``utils``, ``equation``, ``log_forward``, ``extend``, ...) and ``Equation`` objects built from
their fields.  Here, against the installed reference: every public name of every reference
module exists at the same path in ours with the same parameters; the internals give the
reference's values on random inputs; an ``Equation`` computes what its fields say; the drop-in
functions call the ``prepare_for_*`` methods that the reference calls; and the opt-in
``install_as_torch_semiring_einsum()`` makes unchanged imports resolve to ours.
"""

from __future__ import annotations

import inspect
import itertools
import math
import pickle
import pkgutil
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

R = pytest.importorskip("torch_semiring_einsum")

import semiring_einsum as S  # noqa: E402
from test_interop import close  # noqa: E402  (the drop-in layer's comparison)

Tensor = torch.Tensor

# The reference's own modules, read off the installed package (the oracle of this file).
MODULES = sorted(m.name for m in pkgutil.iter_modules(R.__path__))


# Equations in the reference's syntax (explicit output), with letter sizes.
EQUATIONS = [
    ("abce,abde,abdf->acd", dict(a=2, b=3, c=4, d=3, e=5, f=2)),
    ("ij,jk->ik", dict(i=3, j=4, k=5)),
    ("bij,bjk->bik", dict(b=2, i=3, j=4, k=5)),
    ("ab,bc,cd->ad", dict(a=2, b=3, c=4, d=5)),
    ("i,i->", dict(i=5)),
    ("ij->", dict(i=3, j=4)),
    ("i,j->ij", dict(i=3, j=4)),  # nothing summed
    ("ba,cb->ac", dict(a=3, b=4, c=2)),  # output not in first-appearance order
    # Scalars with nothing summed: fggs builds these for a factor with no attached node.
    ("->", {}),
    (",->", {}),
]
EQ_IDS = [e for e, _ in EQUATIONS]
BLOCKS = [1, 2, 1000, "auto"]


def mod(package: Any, name: str) -> types.ModuleType:
    module = getattr(package, name)
    assert isinstance(module, types.ModuleType), name
    return module


def public(module: types.ModuleType) -> dict[str, Any]:
    """Public module-level names that are not modules (``torch``, ``typing``, ``pynvml``...)."""
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and not isinstance(v, types.ModuleType)
    }


def make(equation: str, sizes: dict[str, int], seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed + sum(map(ord, equation)))
    lhs = equation.split("->")[0]
    return [
        torch.randn([sizes[c] for c in term], generator=g, dtype=torch.float64)
        for term in lhs.split(",")
    ]


def bs(package: Any, block: int | str) -> Any:
    return package.AUTOMATIC_BLOCK_SIZE if block == "auto" else block


def small_auto(package: Any) -> Any:
    """A budget small enough that the reference's estimate splits windows."""
    return package.AutomaticBlockSize(max_cpu_bytes=1200)


def fields_of(inputs: list[list[int]], output: list[int]) -> tuple[list, list, list, int]:
    """(variable_locations, input_variables, output_variables, num_variables) for hand-built
    fields, numbered however the caller likes."""
    n = 1 + max(v for term in inputs for v in term)
    locations: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for k, term in enumerate(inputs):
        for d, v in enumerate(term):
            locations[v].append((k, d))
    return locations, [list(t) for t in inputs], list(output), n


def structure(obj: Any) -> Any:
    """ReduceInfo / LookupInfo (of either package) as plain data, for comparison."""
    if hasattr(obj, "lookup_info"):
        return (
            "ReduceInfo",
            structure(obj.lookup_info),
            obj.output_variables,
            obj.reduced_variables,
            obj.reduced_dims,
        )
    if hasattr(obj, "index_map"):
        return ("LookupInfo", obj.index_map, obj.num_extra_vars, obj.permutation)
    if isinstance(obj, list):
        return [structure(o) for o in obj]
    if isinstance(obj, tuple):
        return tuple(structure(o) for o in obj)
    return obj


# ------------------------------------------------------------------ names and signatures
def test_the_submodules_are_imported_by_the_package():
    for name in MODULES:
        assert mod(S, name).__name__ == f"semiring_einsum.{name}"
        assert (mod(S, name).__doc__ or "").strip(), name


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_exists(name):
    ours = mod(S, name)
    missing = sorted(set(public(mod(R, name))) - set(vars(ours)))
    assert not missing, f"semiring_einsum.{name} lacks {missing}"


def _same_default(ref: Any, got: Any) -> bool:
    if isinstance(ref, float) and math.isnan(ref):
        return isinstance(got, float) and math.isnan(got)
    if isinstance(ref, R.AutomaticBlockSize):
        return got is S.AUTOMATIC_BLOCK_SIZE
    return type(ref) is type(got) and ref == got


def _check_signature(what: str, ref_obj: Any, our_obj: Any) -> None:
    ref = inspect.signature(ref_obj)
    got = inspect.signature(our_obj)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    assert [p.name for p in ref.parameters.values() if p.kind in positional] == [
        p.name for p in got.parameters.values() if p.kind in positional
    ], what
    extra = dict(got.parameters)
    for p in ref.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD and what.endswith(".einsum"):
            # The reference's combine()-made einsum takes **kwargs only to reject them all.
            continue
        assert p.name in extra, (what, p.name)
        q = extra.pop(p.name)
        assert q.kind == p.kind, (what, p.name, q.kind, p.kind)
        if p.default is not inspect.Parameter.empty:
            assert _same_default(p.default, q.default), (what, p.name, p.default, q.default)
        elif q.default is not inspect.Parameter.empty:
            # A superset DESIGN allows: block_size defaulting to AUTOMATIC_BLOCK_SIZE.
            assert p.name == "block_size" and q.default is S.AUTOMATIC_BLOCK_SIZE, (what, p.name)
    for q in extra.values():  # our extra parameters are optional
        assert q.default is not inspect.Parameter.empty, (what, q.name)


def _callables() -> list[tuple[str, str]]:
    return [
        (m, k)
        for m in MODULES
        for k, v in public(mod(R, m)).items()
        if callable(v) and not isinstance(v, torch.dtype)
    ]


@pytest.mark.parametrize(("module", "name"), _callables(), ids=lambda x: x)
def test_signatures_match(module, name):
    ref_obj = getattr(mod(R, module), name)
    our_obj = getattr(mod(S, module), name)
    what = f"{module}.{name}"
    if isinstance(ref_obj, type):
        assert isinstance(our_obj, type), what
        if issubclass(ref_obj, torch.autograd.Function):
            assert issubclass(our_obj, torch.autograd.Function), what
            methods = ["forward", "backward"]
        else:
            _check_signature(what, ref_obj, our_obj)
            methods = [m for m in vars(ref_obj) if not m.startswith("_")]
        for method in methods:
            ref_m = getattr(ref_obj, method)
            if callable(ref_m):
                _check_signature(f"{what}.{method}", ref_m, getattr(our_obj, method))
    else:
        _check_signature(what, ref_obj, our_obj)


@pytest.mark.parametrize("name", MODULES)
def test_reimported_names_are_the_same_objects(name):
    """A name the reference re-imports from another of its modules is that module's object."""
    ours = mod(S, name)
    for key, ref_obj in public(mod(R, name)).items():
        home = getattr(ref_obj, "__module__", None)
        if not (isinstance(home, str) and home.startswith("torch_semiring_einsum.")):
            continue
        home_name = home.rpartition(".")[2]
        if home_name == name or getattr(sys.modules[home], key, None) is not ref_obj:
            continue
        assert getattr(ours, key) is getattr(mod(S, home_name), key), (name, key, home_name)


def test_shared_objects_are_ours_and_one():
    assert S.log_viterbi_forward.ARGMAX_DTYPE == R.log_viterbi_forward.ARGMAX_DTYPE
    for name in MODULES:
        module = mod(S, name)
        for key in ("Equation", "AutomaticBlockSize", "AUTOMATIC_BLOCK_SIZE"):
            if hasattr(mod(R, name), key):
                assert getattr(module, key) is getattr(S, key), (name, key)
    assert S.AutomaticBlockSize is S.func.AutomaticBlockSize
    assert S.AUTOMATIC_BLOCK_SIZE is S.func.AUTOMATIC_BLOCK_SIZE
    # The drop-in functions are the top-level objects, not second copies.
    assert S.log_forward.log_einsum_forward is S.log_einsum_forward
    assert S.log_backward.log_einsum_backward is S.log_einsum_backward
    assert S.log_differentiable.log_einsum is S.log_einsum
    assert S.real_forward.real_einsum_forward is S.real_einsum_forward
    assert S.real_backward.real_einsum_backward is S.real_einsum_backward
    assert S.real_differentiable.einsum is S.einsum
    assert S.log_viterbi_forward.log_viterbi_einsum_forward is S.log_viterbi_einsum_forward
    assert S.extend.semiring_einsum_forward is S.semiring_einsum_forward
    assert S.function.combine is S.combine
    assert S.equation.compile_equation is S.compile_equation
    assert S.equation.get_cuda_memory_reserved is R.equation.get_cuda_memory_reserved


# ------------------------------------------------------------------ Equation
FIELDS = ([[(0, 0)], [(0, 1)]], [[0, 1]], [0], 2)


def test_equation_from_fields_ignores_a_disagreeing_source():
    x = torch.arange(6.0).reshape(2, 3)
    want = R.einsum(R.Equation("ij->j", *FIELDS), x, block_size=10)
    got = S.einsum(S.Equation("ij->j", *FIELDS), x, block_size=10)
    close(got, want)
    close(got, torch.einsum("ij->i", x))
    assert got.tolist() == [3.0, 12.0]


def test_equation_with_an_empty_source():
    x = torch.arange(6.0).reshape(2, 3)
    want = R.einsum(R.Equation("", *FIELDS), x, block_size=10)
    close(S.einsum(S.Equation("", *FIELDS), x, block_size=10), want)
    close(S.einsum(S.Equation("", *FIELDS), x), want)


@pytest.mark.parametrize("equation", [*EQ_IDS, "ii->i", "zyx,xw->wz"])
def test_compile_equation_lists_match_the_reference(equation):
    ref, got = R.compile_equation(equation), S.compile_equation(equation)
    assert type(got) is S.Equation
    assert got.source == ref.source == equation
    # Exact equality: lists (of lists, of tuples), like the reference's.
    assert got.variable_locations == ref.variable_locations
    assert got.input_variables == ref.input_variables
    assert got.output_variables == ref.output_variables
    assert got.num_variables == ref.num_variables
    assert list(got.all_variables()) == list(ref.all_variables())
    for attr in ("reduce_input_to_output", "reduce_others_to_input", "reduce_all_to_input"):
        assert getattr(got, attr) is None


def test_compile_equation_example_from_the_brief():
    eq = S.compile_equation("ij,jk->ik")
    assert eq.input_variables == [[0, 1], [1, 2]]
    assert eq.output_variables == [0, 2]
    assert eq.variable_locations == [[(0, 0)], [(0, 1), (1, 0)], [(1, 1)]]
    assert repr(eq) == "Equation('ij,jk->ik')"


def test_equation_is_a_plain_mutable_picklable_class():
    eq = S.compile_equation("ij,jk->ik")
    a, b = make("ij,jk->ik", dict(i=3, j=4, k=5))
    close(S.einsum(eq, a, b), torch.einsum("ij,jk->ik", a, b))
    eq.output_variables = [2, 0]  # mutable, like the reference's; now it computes 'ki'
    close(S.einsum(eq, a, b), torch.einsum("ij,jk->ki", a, b))
    eq.input_variables = [[1, 0], [1, 2]]  # 'ji,jk->ki'
    close(S.einsum(eq, a.T, b), torch.einsum("ji,jk->ki", a.T, b))
    again = pickle.loads(pickle.dumps(eq))
    assert type(again) is S.Equation and again.output_variables == [2, 0]
    close(S.einsum(again, a.T, b), torch.einsum("ji,jk->ki", a.T, b))
    hash(eq)  # hashable by identity, like any plain object


@pytest.mark.parametrize(
    ("equation", "shapes"),
    [
        ("ij,jk", [(2, 3), (3, 4)]),
        ("...ij,...jk->...ik", [(5, 2, 3), (5, 3, 4)]),
        ("i...,j...->...ij", [(2, 4), (3, 4)]),
        (" b i j , b j k -> b i k ", [(2, 3, 4), (2, 4, 5)]),
    ],
)
def test_our_superset_syntax_keeps_working(equation, shapes):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    eq = S.compile_equation(equation)
    want = torch.einsum(equation, *xs)
    close(S.einsum(eq, *xs, block_size=2), want)
    close(S.real_einsum_forward(eq, *xs, block_size=1), want)
    close(S.log_einsum(eq, *xs, block_size=2), torch.einsum(equation, *map(torch.exp, xs)).log())


def test_ellipsis_fields_count_from_the_end():
    eq = S.compile_equation("...ij,jk->...ik")
    assert eq.input_variables == [[0, 1], [1, 2]]
    assert eq.output_variables == [0, 2]
    assert eq.variable_locations == [[(0, -2)], [(0, -1), (1, 0)], [(1, 1)]]


def test_bad_fields_give_a_value_error_naming_the_problem():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"input_variables\[0\] lists 2 variable.* has 3 dim"):
        S.einsum(S.Equation("ij->i", *FIELDS), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="describes 1 argument.* 2 were given"):
        S.einsum(S.Equation("ij->i", *FIELDS), x, x)
    with pytest.raises(ValueError, match=r"output_variables\[0\] is variable 7.* no entry"):
        S.log_einsum(S.Equation("", [[(0, 0)], [(0, 1)]], [[0, 1]], [7], 2), x)
    with pytest.raises(ValueError, match="output_variables repeats variable 0"):
        S.einsum(S.Equation("", [[(0, 0)], [(0, 1)]], [[0, 1]], [0, 0], 2), x)
    with pytest.raises(ValueError, match=r"input_variables\[0\]\[1\] must be an int"):
        S.einsum(S.Equation("", [[(0, 0)], [(0, 1)]], [[0, "j"]], [0], 2), x)
    with pytest.raises(ValueError, match="60 distinct variables; at most 52"):
        S.einsum(S.Equation("", [], [list(range(60))], [], 60), torch.zeros([1] * 60))
    with pytest.raises(ValueError, match="puts variable 1 at dimension 5 of argument 0"):
        S.Equation("", [[(0, 0)], [(0, 5)]], [[0, 1]], [0], 2).validate_sizes([x])
    with pytest.raises(ValueError, match="no location for variable 3"):
        S.Equation("", *FIELDS).get_sizes([x], [3])
    # validate_sizes: a size mismatch is a ValueError, as in the reference.
    eq = S.compile_equation("ij,jk->ik")
    with pytest.raises(ValueError):
        R.compile_equation("ij,jk->ik").validate_sizes([x, torch.zeros(4, 2)])
    with pytest.raises(ValueError, match="variable 1 has size 3 .* but size 4"):
        eq.validate_sizes([x, torch.zeros(4, 2)])
    assert "invalid fields" in repr(S.Equation("x", None, None, None, 0))  # type: ignore[arg-type]


@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_equation_methods_match(equation, sizes):
    xs = make(equation, sizes)
    ref, got = R.compile_equation(equation), S.compile_equation(equation)
    got.validate_sizes(xs)
    ref.validate_sizes(xs)
    every = list(range(ref.num_variables))
    assert got.get_sizes(xs, every) == ref.get_sizes(xs, every)
    assert got.get_sizes(xs, ref.output_variables) == ref.get_sizes(xs, ref.output_variables)


# Hand-built fields, numbered out of first-appearance order, with the reference's results.
HAND_BUILT = [
    ([[1, 0], [0, 2]], [2, 1], (3, 4, 5)),  # sizes are per variable number
    ([[2, 1, 0]], [0], (2, 3, 4)),
    ([[0], [0]], [], (5,)),
    ([[1], [0]], [0, 1], (3, 2)),
]


@pytest.mark.parametrize(("inputs", "output", "sizes"), HAND_BUILT)
def test_hand_built_fields_match_the_reference(inputs, output, sizes):
    fields = fields_of(inputs, output)
    g = torch.Generator().manual_seed(5)
    xs = [
        torch.randn([sizes[v] for v in term], generator=g, dtype=torch.float64) for term in inputs
    ]
    ours_eq, ref_eq = S.Equation("nonsense", *fields), R.Equation("nonsense", *fields)
    for block in (1, 2, "auto"):
        close(
            S.real_einsum_forward(ours_eq, *xs, block_size=bs(S, block)),
            R.real_einsum_forward(ref_eq, *xs, block_size=bs(R, block)),
        )
        close(
            S.log_einsum_forward(ours_eq, *xs, block_size=bs(S, block)),
            R.log_einsum_forward(ref_eq, *xs, block_size=bs(R, block)),
        )
        got, want = (
            S.log_viterbi_einsum_forward(ours_eq, *xs, block_size=bs(S, block)),
            R.log_viterbi_einsum_forward(ref_eq, *xs, block_size=bs(R, block)),
        )
        close(got[0], want[0])
        assert torch.equal(got[1], want[1])
    grad = torch.randn(want[0].shape, generator=g, dtype=torch.float64)
    needs = [True] * len(xs)
    close(
        S.real_einsum_backward(ours_eq, xs, needs, grad, 2),
        R.real_einsum_backward(ref_eq, xs, needs, grad, 2),
    )
    close(
        S.log_einsum_backward(ours_eq, xs, needs, grad, 2),
        R.log_einsum_backward(ref_eq, xs, needs, grad, 2),
    )


# ------------------------------------------------------------------ prepare_for_*
PREPARED = ("reduce_input_to_output", "reduce_others_to_input", "reduce_all_to_input")


@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_prepare_results_match_the_reference(equation, sizes):
    ref, got = R.compile_equation(equation), S.compile_equation(equation)
    for method in ("prepare_for_forward", "prepare_for_backward", "prepare_for_log_backward"):
        getattr(ref, method)()
        getattr(got, method)()
        getattr(got, method)()  # a second call keeps the first result
    for attr in PREPARED:
        assert structure(getattr(got, attr)) == structure(getattr(ref, attr)), attr
    assert isinstance(got.reduce_input_to_output, S.equation.ReduceInfo)
    info, lookup = got.reduce_all_to_input[0]
    assert isinstance(lookup, S.equation.LookupInfo)


def _calls(package: Any, eq: Any, xs: list[Tensor]) -> dict[str, Callable[[], Any]]:
    grad = torch.ones(package.real_einsum_forward(eq, *xs, block_size=2).shape, dtype=xs[0].dtype)
    needs = [True] * len(xs)
    leaves = [x.clone().requires_grad_(True) for x in xs]
    return {
        "real_einsum_forward": lambda: package.real_einsum_forward(eq, *xs, block_size=2),
        "real_einsum_backward": lambda: package.real_einsum_backward(eq, xs, needs, grad, 2),
        "einsum": lambda: package.einsum(eq, *leaves, block_size=2).sum().backward(),
        "log_einsum_forward": lambda: package.log_einsum_forward(eq, *xs, block_size=2),
        "log_einsum_backward": lambda: package.log_einsum_backward(eq, xs, needs, grad, 2),
        "log_einsum": lambda: package.log_einsum(eq, *leaves, block_size=2).sum().backward(),
        "log_viterbi_einsum_forward": lambda: package.log_viterbi_einsum_forward(
            eq, *xs, block_size=2
        ),
        "semiring_einsum_forward": lambda: package.semiring_einsum_forward(
            eq, xs, 2, lambda compute_sum: None
        ),
    }


@pytest.mark.parametrize(
    "call",
    [
        "real_einsum_forward",
        "real_einsum_backward",
        "einsum",
        "log_einsum_forward",
        "log_einsum_backward",
        "log_einsum",
        "log_viterbi_einsum_forward",
        "semiring_einsum_forward",
    ],
)
def test_functions_prepare_what_the_reference_prepares(call):
    equation, sizes = EQUATIONS[1]
    xs = make(equation, sizes)
    ref, got = R.compile_equation(equation), S.compile_equation(equation)
    _calls(R, ref, xs)[call]()
    _calls(S, got, xs)[call]()
    for attr in PREPARED:
        if getattr(ref, attr) is not None:
            assert structure(getattr(got, attr)) == structure(getattr(ref, attr)), (call, attr)
    if call.endswith("forward") and call != "real_einsum_forward":
        assert got.reduce_input_to_output is not None


# ------------------------------------------------------------------ equation-module helpers
@pytest.mark.parametrize("total", [0, 1, 5, 8])
def test_generate_slices(total):
    for block in (1, 2, 3, 8, 100):
        got = list(S.equation.generate_slices(total, block))
        assert got == list(R.equation.generate_slices(total, block))
    with pytest.raises(ValueError, match="block_size must be at least 1"):
        list(S.equation.generate_slices(total, 0))


def test_block_index_helpers():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        n = int(torch.randint(0, 4, (), generator=g))
        sizes = torch.randint(0, 7, (n,), generator=g).tolist()
        blocks = torch.randint(1, 5, (n,), generator=g).tolist()
        block = int(torch.randint(1, 5, (), generator=g))
        assert list(S.equation.block_sizes_to_indexes(sizes, blocks)) == list(
            R.equation.block_sizes_to_indexes(sizes, iter(blocks))
        )
        assert list(S.equation.get_fixed_block_size_indexes(sizes, block)) == list(
            R.equation.get_fixed_block_size_indexes(sizes, block)
        )
        for available in (-5, 0, 1, 3, 10, 50, 10**6):
            assert S.equation.get_automatic_block_sizes(
                sizes, available
            ) == R.equation.get_automatic_block_sizes(sizes, available), (sizes, available)
    variables = [3, 1, 3, 0, 2, 1]
    for excluded in (set(), {1}, {0, 3}, [2]):
        assert S.equation.get_variables_not_in(variables, excluded) == (
            R.equation.get_variables_not_in(variables, excluded)
        )


DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bits_and_bytes_per_element(dtype):
    for name in ("get_bits_per_element", "get_bytes_per_element"):
        try:
            want = getattr(R.equation, name)(dtype)
        except TypeError:
            with pytest.raises(TypeError):
                getattr(S.equation, name)(dtype)
        else:
            assert getattr(S.equation, name)(dtype) == want


def test_available_bytes_on_cpu():
    cpu = torch.device("cpu")
    for budget in (1, 4096, 1 << 30):
        assert S.equation.get_available_bytes(
            cpu, S.AutomaticBlockSize(max_cpu_bytes=budget)
        ) == R.equation.get_available_bytes(cpu, R.AutomaticBlockSize(max_cpu_bytes=budget))
    assert S.equation.get_available_bytes(cpu, S.AUTOMATIC_BLOCK_SIZE) == (
        R.equation.get_available_bytes(cpu, R.AUTOMATIC_BLOCK_SIZE)
    )
    with pytest.raises(ValueError):
        R.equation.get_available_bytes(torch.device("meta"), R.AUTOMATIC_BLOCK_SIZE)
    with pytest.raises(ValueError, match="no memory budget for device"):
        S.equation.get_available_bytes(torch.device("meta"), S.AUTOMATIC_BLOCK_SIZE)
    # An explicit CUDA budget needs no device query.
    cuda = torch.device("cuda", 0)
    ours = S.AutomaticBlockSize(max_cuda_bytes=12345)
    ref = R.AutomaticBlockSize(max_cuda_bytes=12345)
    assert S.equation.get_available_bytes_cuda(cuda, ours) == (
        R.equation.get_available_bytes_cuda(cuda, ref)
    )


@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_summed_variable_indexes_match(equation, sizes):
    xs = make(equation, sizes)
    ref, got = R.compile_equation(equation), S.compile_equation(equation)
    assert S.equation.get_output_elements(got, xs) == R.equation.get_output_elements(ref, xs)
    ref.prepare_for_forward()
    got.prepare_for_forward()
    variables = ref.reduce_input_to_output.reduced_variables
    every = list(range(ref.num_variables))
    for block in (1, 2, 1000, "auto", "small"):
        rb = small_auto(R) if block == "small" else bs(R, block)
        sb = small_auto(S) if block == "small" else bs(S, block)
        for dtypes in ((None,), (None, torch.int64)):
            for vs in (variables, every):
                want = list(R.equation.get_summed_variable_indexes(ref, xs, vs, rb, dtypes))
                have = list(S.equation.get_summed_variable_indexes(got, xs, vs, sb, dtypes))
                assert have == want, (block, dtypes, vs)
            want = list(ref.reduce_input_to_output.get_summed_variable_indexes(ref, xs, rb))
            assert list(got.reduce_input_to_output.get_summed_variable_indexes(got, xs, sb)) == want
            for var_values in want:
                assert got.reduce_input_to_output.get_term_size(got, xs, var_values) == (
                    ref.reduce_input_to_output.get_term_size(ref, xs, var_values)
                )
        if isinstance(rb, R.AutomaticBlockSize):
            sizes_ = ref.get_sizes(xs, variables)
            assert list(
                S.equation.get_automatic_block_size_indexes(got, xs, sizes_, sb, (None,))
            ) == list(R.equation.get_automatic_block_size_indexes(ref, xs, sizes_, rb, (None,)))
    with pytest.raises(ValueError, match="block_size must be an int or an AutomaticBlockSize"):
        S.equation.get_summed_variable_indexes(got, xs, variables, "big", (None,))


@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_create_reduce_info_and_lookup_match(equation, sizes):
    xs = make(equation, sizes)
    ref_eq = R.compile_equation(equation)
    grad = torch.randn(ref_eq.get_sizes(xs, ref_eq.output_variables), dtype=torch.float64)
    inputs, output = ref_eq.input_variables, ref_eq.output_variables
    cases = [(inputs, output, xs), (inputs, [], xs), ([*inputs, output], inputs[0], [*xs, grad])]
    for k in range(len(inputs)):
        others, tensors = list(inputs), list(xs)
        others[k], tensors[k] = output, grad
        cases.append((others, inputs[k], tensors))
    for ins, outs, tensors in cases:
        ref = R.equation.create_reduce_info(ins, outs)
        got = S.equation.create_reduce_info(ins, outs)
        assert structure(got) == structure(ref), (ins, outs)
        size = {v: t.shape[d] for term, t in zip(ins, tensors) for d, v in enumerate(term)}
        reduced_sizes = [size[v] for v in ref.reduced_variables]
        windows = R.equation.get_fixed_block_size_indexes(reduced_sizes, 2)
        for var_values in itertools.islice(windows, 6):
            for t, r_info, s_info in zip(tensors, ref.lookup_info, got.lookup_info):
                want = r_info.lookup(t, var_values)
                have = s_info.lookup(t, var_values)
                assert torch.equal(have, want) and have.stride() == want.stride()


# ------------------------------------------------------------------ extend
def test_adjust_size_and_reduce_in_place():
    g = torch.Generator().manual_seed(2)
    for shape, size in [
        ((2, 1, 3), [2, 4, 3]),
        ((1, 1), [3, 2]),
        ((), []),
        ((2, 3), [2, 3]),
        ((1, 4), [0, 4]),
    ]:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        want = R.extend.adjust_size(x, size)
        got = S.extend.adjust_size(x, size)
        assert torch.equal(got, want)
        if got.numel():
            assert got.data_ptr() != x.data_ptr()  # always a copy
    values = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])]

    def add(a: Tensor, b: Tensor) -> None:
        a += b

    want = R.extend.reduce_in_place(add, [v.clone() for v in values], lambda a: a * 10)
    close(S.extend.reduce_in_place(add, [v.clone() for v in values], lambda a: a * 10), want)
    want = R.extend.reduce_in_place(add, [v.clone() for v in values])
    close(S.extend.reduce_in_place(add, [v.clone() for v in values]), want)
    with pytest.raises(ValueError, match="at least one value"):
        S.extend.reduce_in_place(add, [])


def _impl(package: Any, eq: Any, xs: list[Tensor], block: Any, info: Any, inputs: list[Tensor]):
    u = package.utils
    return package.extend.semiring_einsum_forward_impl(
        eq, xs, block, inputs, u.add_in_place, u.sum_block, u.multiply_in_place, info, False
    )


@pytest.mark.parametrize("block", [*BLOCKS, "small"])
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_semiring_einsum_forward_impl_with_a_user_reduce_info(equation, sizes, block):
    """Extensions call the impl with their own ReduceInfo, e.g. to write a backward."""
    xs = make(equation, sizes)
    ref, got = R.compile_equation(equation), S.compile_equation(equation)
    rb = small_auto(R) if block == "small" else bs(R, block)
    sb = small_auto(S) if block == "small" else bs(S, block)
    for eq in (ref, got):
        eq.prepare_for_forward()
        eq.prepare_for_backward()
    # The forward.
    want = _impl(R, ref, xs, rb, ref.reduce_input_to_output, xs)
    close(_impl(S, got, xs, sb, got.reduce_input_to_output, xs), want)
    close(want, torch.einsum(equation, *xs))
    # A real backward: the gradient replaces argument k, reduced to argument k's variables.
    grad = torch.randn(want.shape, dtype=torch.float64)
    for k in range(len(xs)):
        inputs = list(xs)
        inputs[k] = grad
        want_k = _impl(R, ref, xs, rb, ref.reduce_others_to_input[k], inputs)
        close(_impl(S, got, xs, sb, got.reduce_others_to_input[k], inputs), want_k)
    # A Viterbi pass with include_indexes and two output dtypes.
    ru, su = R.log_viterbi_forward, S.log_viterbi_forward
    want_v = R.extend.semiring_einsum_forward_impl(
        ref, xs, rb, xs, ru.viterbi_max_in_place, ru.viterbi_max_block, R.utils.add_in_place,
        ref.reduce_input_to_output, True, (None, torch.int64),
    )  # fmt: skip
    got_v = S.extend.semiring_einsum_forward_impl(
        got, xs, sb, xs, su.viterbi_max_in_place, su.viterbi_max_block, S.utils.add_in_place,
        got.reduce_input_to_output, True, (None, torch.int64),
    )  # fmt: skip
    close(got_v[0], want_v[0])
    assert torch.equal(got_v[1], want_v[1])


def test_semiring_einsum_forward_impl_empty_window():
    """A size-0 reduced variable: sum_block sees one empty window (the reference raises)."""
    eq = S.compile_equation("ij,jk->ik")
    eq.prepare_for_forward()
    a, b = torch.ones(2, 0), torch.ones(0, 3)
    got = _impl(S, eq, [a, b], 2, eq.reduce_input_to_output, [a, b])
    close(got, torch.einsum("ij,jk->ik", a, b))


# ------------------------------------------------------------------ log_forward
def _with_neg_inf(xs: list[Tensor]) -> list[Tensor]:
    g = torch.Generator().manual_seed(9)
    out = [torch.where(torch.rand(x.shape, generator=g) < 0.3, -math.inf, x) for x in xs]
    if out[0].dim():
        out[0][0] = -math.inf
    return out


@pytest.mark.parametrize("block", [*BLOCKS, "small"])
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_log_forward_internals_match(equation, sizes, block):
    rb = small_auto(R) if block == "small" else bs(R, block)
    sb = small_auto(S) if block == "small" else bs(S, block)
    for xs in (make(equation, sizes), _with_neg_inf(make(equation, sizes))):
        ref, got = R.compile_equation(equation), S.compile_equation(equation)
        ref.prepare_for_forward()  # the reference's internals need it; ours prepare themselves
        want_max = R.log_forward.compute_max(ref, xs, rb)
        got_max = S.log_forward.compute_max(got, xs, sb)
        close(got_max, want_max)  # each term is a sum, added up in another order
        close(S.log_forward.compute_max(equation, xs, sb), want_max)
        want = R.log_forward.compute_sumexpsub(ref, xs, rb, want_max)
        close(S.log_forward.compute_sumexpsub(got, xs, sb, got_max), want)
        close(S.log_forward.compute_sumexpsub(equation, xs, sb, got_max), want)
        resized = R.log_forward.resize_max_values(want_max, ref)
        for eq in (got, equation):
            have = S.log_forward.resize_max_values(got_max, eq)
            assert have.shape == resized.shape
            close(have, resized)
        # The log backward module re-exports the same two passes.
        assert S.log_backward.compute_max is S.log_forward.compute_max


def _fggs_style(tse: Any, equation: Any, xs: list[Tensor], block: Any) -> Tensor:
    """A log-space einsum as user code writes it on top of the reference's modules."""
    u = tse.utils

    def mul(a: Tensor, b: Tensor) -> None:
        a.add_(b)

    def callback(compute_sum: Callable[..., Any]) -> Tensor:
        max_values = compute_sum(u.max_in_place, u.max_block, mul)
        u.clip_inf_in_place(max_values)
        resized = tse.log_forward.resize_max_values(max_values, equation)

        def sumexp_block(a: Tensor, dims: tuple[int, ...]) -> Tensor:
            a.sub_(resized)
            a.exp_()
            return u.sum_block(a, dims)

        total = compute_sum(u.add_in_place, sumexp_block, mul)
        return total.log_().add_(max_values)

    return tse.semiring_einsum_forward(equation, xs, block, callback)


@pytest.mark.parametrize("block", [1, 2, "auto"])
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS, ids=EQ_IDS)
def test_fggs_style_user_code(equation, sizes, block):
    for xs in (make(equation, sizes), _with_neg_inf(make(equation, sizes))):
        want = _fggs_style(R, R.compile_equation(equation), xs, bs(R, block))
        close(_fggs_style(S, S.compile_equation(equation), xs, bs(S, block)), want)
        close(_fggs_style(S, equation, xs, bs(S, block)), want)  # a plain string too
        ref_eq = R.compile_equation(equation)
        fields = (
            ref_eq.variable_locations,
            ref_eq.input_variables,
            ref_eq.output_variables,
            ref_eq.num_variables,
        )
        close(_fggs_style(S, S.Equation("", *fields), xs, bs(S, block)), want)


# ------------------------------------------------------------------ log_viterbi_forward
def _ties(shape: tuple[int, ...], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, shape, generator=g).to(torch.float64)


@pytest.mark.parametrize(
    ("shape", "dims"),
    [((3, 4), (1,)), ((2, 3, 4), (1, 2)), ((2, 3, 4, 2), (2, 3)), ((3, 4), ()), ((5,), (0,))],
)
def test_viterbi_helpers_match(shape, dims):
    for seed in range(5):
        a = _ties(shape, seed)  # many ties
        want = R.log_viterbi_forward.max_argmax_block(a.clone(), dims)
        got = S.log_viterbi_forward.max_argmax_block(a.clone(), dims)
        close(got[0], want[0], rtol=0, atol=0)
        assert got[1].dtype == want[1].dtype and torch.equal(got[1], want[1])
        var_values = tuple(slice(3 * i + 1, 3 * i + 1 + a.shape[d]) for i, d in enumerate(dims))
        want = R.log_viterbi_forward.viterbi_max_block(a.clone(), dims, var_values)
        got = S.log_viterbi_forward.viterbi_max_block(a.clone(), dims, var_values)
        close(got[0], want[0], rtol=0, atol=0)
        assert torch.equal(got[1], want[1])
        # Folding two parts together, ties keeping the first.
        other = (_ties(want[0].shape, seed + 50), torch.randint(0, 9, want[1].shape))
        r_acc = (want[0].clone(), want[1].clone())
        s_acc = (want[0].clone(), want[1].clone())
        R.log_viterbi_forward.viterbi_max_in_place(r_acc, other)
        S.log_viterbi_forward.viterbi_max_in_place(s_acc, other)
        assert torch.equal(s_acc[0], r_acc[0]) and torch.equal(s_acc[1], r_acc[1])
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    for dim in range(3):
        i = torch.randint(0, x.shape[dim], [n for d, n in enumerate(x.shape) if d != dim])
        assert torch.equal(
            S.log_viterbi_forward.lookup_dim(x, i, dim),
            R.log_viterbi_forward.lookup_dim(x, i, dim),
        )


# ------------------------------------------------------------------ utils
def test_utils_match():
    g = torch.Generator().manual_seed(4)
    special = torch.tensor([math.inf, -math.inf, math.nan, 0.0], dtype=torch.float64)
    for _ in range(5):
        a = torch.randn(3, 4, generator=g, dtype=torch.float64)
        a.view(-1)[:4] = special
        b = torch.randn(3, 4, generator=g, dtype=torch.float64)
        b.view(-1)[-4:] = special
        for name in ("add_in_place", "multiply_in_place", "max_in_place"):
            want, got = a.clone(), a.clone()
            assert getattr(R.utils, name)(want, b) is None
            assert getattr(S.utils, name)(got, b) is None
            close(got, want, rtol=0, atol=0)
        for name in ("sum_block", "max_block"):
            for dims in ((), (0,), (1,), (0, 1)):
                want = getattr(R.utils, name)(a.clone(), dims)
                got = getattr(S.utils, name)(a.clone(), dims)
                close(got, want, rtol=0, atol=0)
            assert getattr(S.utils, name)(a, ()) is a  # the empty reduction is `a` itself
        for dtype in (torch.float16, torch.float32, torch.float64):
            want, got = a.to(dtype), a.to(dtype)
            R.utils.clip_inf_in_place(want)
            S.utils.clip_inf_in_place(got)
            close(got, want, rtol=0, atol=0)


def test_take_kwargs_matches():
    for keys in ([], ["a"], ["a", "c"], ["c", "b", "a"]):
        ref_kwargs, our_kwargs = {"a": 1, "b": 2}, {"a": 1, "b": 2}
        assert S.function.take_kwargs(keys, our_kwargs) == R.function.take_kwargs(keys, ref_kwargs)
        assert our_kwargs == ref_kwargs


# ------------------------------------------------------------------ log_differentiable
@pytest.mark.parametrize("saves", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize(("equation", "sizes"), EQUATIONS[:4], ids=EQ_IDS[:4])
def test_log_einsum_function_apply(equation, sizes, saves):
    xs = _with_neg_inf(make(equation, sizes))
    xs[0][0] = -math.inf
    results = {}
    for name, package in (("ref", R), ("ours", S)):
        leaves = [x.clone().requires_grad_(True) for x in xs]
        eq = package.compile_equation(equation)
        out = package.log_differentiable.LogEinsumFunction.apply(eq, 2, *saves, 0.0, *leaves)
        out.sum().backward()
        results[name] = [out, *[x.grad for x in leaves]]
    close(results["ours"], results["ref"])
    # Without any input needing a gradient, nothing is kept for a backward.
    with torch.no_grad():
        out = S.log_differentiable.LogEinsumFunction.apply(
            S.compile_equation(equation), 2, *saves, math.nan, *xs
        )
    close(out, results["ref"][0].detach())


# ------------------------------------------------------------------ install
def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_install_makes_unchanged_imports_resolve_to_ours():
    out = _run(
        """
        import sys
        import semiring_einsum
        semiring_einsum.install_as_torch_semiring_einsum()
        semiring_einsum.install_as_torch_semiring_einsum()  # idempotent

        import torch
        import torch_semiring_einsum
        import torch_semiring_einsum.utils
        import torch_semiring_einsum.log_forward as lf
        from torch_semiring_einsum.equation import Equation, compile_equation
        from torch_semiring_einsum import extend, log_viterbi_forward, real_differentiable

        assert torch_semiring_einsum is semiring_einsum
        assert torch_semiring_einsum.utils is semiring_einsum.utils
        assert lf is semiring_einsum.log_forward and extend is semiring_einsum.extend
        for name in ("equation", "extend", "function", "log_backward", "log_differentiable",
                     "log_forward", "log_viterbi_forward", "real_backward",
                     "real_differentiable", "real_forward", "utils", "func"):
            assert sys.modules["torch_semiring_einsum." + name] is getattr(semiring_einsum, name)
        import torch_semiring_einsum.func
        assert torch_semiring_einsum.func is semiring_einsum.func
        assert Equation is semiring_einsum.Equation is lf.Equation is extend.Equation
        assert compile_equation("ij->i").__class__ is Equation
        semiring_einsum.install_as_torch_semiring_einsum()  # still fine after use
        reference = [m for m in sys.modules.values()
                     if getattr(m, "__file__", None) and "site-packages/torch_semiring_einsum"
                     in m.__file__]
        assert not reference, reference  # the real package was never loaded

        x = torch.arange(6.0).reshape(2, 3)
        eq = Equation("ij->j", [[(0, 0)], [(0, 1)]], [[0, 1]], [0], 2)
        print(torch_semiring_einsum.einsum(eq, x, block_size=10).tolist())
        """
    )
    assert out.split() == ["[3.0,", "12.0]"]


@pytest.mark.full
def test_install_refuses_after_the_real_reference_was_imported():
    out = _run(
        """
        import sys
        import torch_semiring_einsum
        import semiring_einsum
        real = sys.modules["torch_semiring_einsum"]
        try:
            semiring_einsum.install_as_torch_semiring_einsum()
        except RuntimeError as error:
            print(error)
        else:
            raise SystemExit("no error")
        assert sys.modules["torch_semiring_einsum"] is real is not semiring_einsum
        assert sys.modules["torch_semiring_einsum.utils"] is real.utils
        """
    )
    assert "'torch_semiring_einsum' is already imported" in out
    assert "the real torch-semiring-einsum" in out
    assert "call semiring_einsum.install_as_torch_semiring_einsum() before" in out


def test_install_in_this_process_refuses_cleanly():
    """Here the reference is imported (by this module), so the call refuses and changes nothing."""
    before = dict(sys.modules)
    with pytest.raises(RuntimeError, match="already imported .* the real torch-semiring-einsum"):
        S.install_as_torch_semiring_einsum()
    assert sys.modules["torch_semiring_einsum"] is R
    assert {k: v for k, v in sys.modules.items() if k.startswith("torch_semiring")} == {
        k: v for k, v in before.items() if k.startswith("torch_semiring")
    }
