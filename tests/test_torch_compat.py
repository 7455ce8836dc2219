"""The private torch symbols: all in ``func/_torch_compat.py``, and all there on this torch.

A smoke test checks that every name the module exports is torch's own object and behaves as
its callers expect, and that this torch lacks nothing (:func:`_torch_compat.missing`).  A scan
of the package's code (not its comments or docstrings) checks that no other module names a
private torch module or attribute.  ``pyproject.toml``'s torch floor is the oldest torch the
tests ran on (:data:`_torch_compat.OLDEST_TESTED`).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import semiring_einsum
from semiring_einsum.func import _torch_compat as C

SRC = Path(semiring_einsum.__file__).resolve().parent
COMPAT = SRC / "func" / "_torch_compat.py"
PYPROJECT = SRC.parent.parent / "pyproject.toml"

# A string that is exactly the dotted name of a private torch module or attribute.
_PRIVATE_PATH = re.compile(r"torch(\.\w+)*\._\w*(\.\w+)*")


def _private(segment: str) -> bool:
    return segment.startswith("_") and not (segment.startswith("__") and segment.endswith("__"))


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of ``tree``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                found.add(id(body[0].value))
    return found


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``['a', 'b', 'c']``; ``None`` unless a chain of names."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def private_uses(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for every private torch module or attribute the code names.

    Names bound to torch (``import torch``, ``import torch.x as y``, ``from torch import y``)
    are followed through attribute chains; imports, ``getattr`` with a constant name and
    strings that are exactly a private dotted torch name count too.  Comments and docstrings
    do not.
    """
    tree = ast.parse(source)
    torch_names = set()
    found = []
    for node in ast.walk(tree):  # names bound to torch objects, and private imports
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] != "torch":
                    continue
                torch_names.add(alias.asname or "torch")
                if any(_private(p) for p in parts):
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "torch":
                continue
            for alias in node.names:
                torch_names.add(alias.asname or alias.name)
                if any(_private(p) for p in [*parts, alias.name]):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    docstrings = _docstrings(tree)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:  # whole chains only
            parts = _dotted(node)
            if parts and parts[0] in torch_names and any(_private(p) for p in parts[1:]):
                found.append((node.lineno, ".".join(parts)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
        ):
            target, name = node.args[0], node.args[1]
            parts = _dotted(target)
            if (
                parts
                and parts[0] in torch_names
                and isinstance(name, ast.Constant)
                and isinstance(name.value, str)
                and _private(name.value)
            ):
                found.append((node.lineno, f"{node.func.id}({'.'.join(parts)}, {name.value!r})"))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and _PRIVATE_PATH.fullmatch(node.value)
        ):
            found.append((node.lineno, repr(node.value)))
    return sorted(set(found))


# -- The scan ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "import torch\nf = torch._C._functorch.get_unwrapped\n",
        "import torch\nx = torch.utils._pytree\n",
        "import torch\nx = torch.autograd.forward_ad._current_level\n",
        "import torch.autograd.forward_ad as fad\nx = fad._current_level\n",
        "import torch._dynamo\n",
        "import torch._C._functorch as F\n",
        "import torch.utils._pytree as pytree\n",
        "from torch._functorch.utils import unwrap_dead_wrappers\n",
        "from torch._C import _functorch\n",
        "from torch import _C\n",
        "from torch.utils import _pytree\n",
        "import importlib\nm = importlib.import_module('torch._dynamo')\n",
        "import torch\nok = hasattr(torch._dynamo, 'x')\n",
        "import torch\nok = getattr(torch.autograd.forward_ad, '_current_level')\n",
        "import torch as th\nf = th._C._len_torch_dispatch_stack\n",
        "import torch\ndef f():\n    import torch._dynamo\n    return torch._dynamo.reset()\n",
    ],
)
def test_the_scan_finds_private_uses(code: str) -> None:
    assert private_uses(code), code


@pytest.mark.parametrize(
    "code",
    [
        "import torch\nv = torch.__version__\n",
        "import torch\nf = torch.compiler.is_compiling\n",
        "import torch\nx = torch.func.debug_unwrap\n",
        '"""Registered with ``torch._dynamo.nonstrict_trace``."""\nimport torch\n',
        "import torch\n# torch._dynamo.disable costs 0.07 ms\nx = 1\n",
        'import torch\ndef f():\n    """See torch._C._functorch."""\n',
        "from ._torch_compat import get_unwrapped\nx = get_unwrapped\n",
        "import torch\nmessage = 'see torch._dynamo for why'\n",
        "class A:\n    def f(self):\n        return self._private\n",
        "import torch\nx = torch.zeros(1)._version\n",  # a tensor's attribute, not a torch name
    ],
)
def test_the_scan_passes_public_uses_and_prose(code: str) -> None:
    assert private_uses(code) == [], code


def test_only_torch_compat_names_private_torch_symbols() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == COMPAT:
            continue
        for line, what in private_uses(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(SRC.parent)}:{line}: {what}")
    assert not offenders, (
        "private torch symbols outside func/_torch_compat.py (bind them there and import "
        "the name):\n" + "\n".join(offenders)
    )


def test_torch_compat_imports_nothing_of_the_package() -> None:
    tree = ast.parse(COMPAT.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("semiring_einsum")
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("semiring_einsum") for a in node.names)


# -- The smoke test ---------------------------------------------------------------------------


def test_this_torch_lacks_nothing() -> None:
    assert C.missing() == []
    assert C.TORCH_VERSION[:2] >= C.OLDEST_TESTED


def test_every_export_exists() -> None:
    for name in C.__all__:
        assert hasattr(C, name), name
    assert isinstance(C.TORCH_VERSION, tuple) and all(isinstance(v, int) for v in C.TORCH_VERSION)
    assert len(C.TORCH_VERSION) == 3
    assert isinstance(C.DYNAMO_MODULE, str)
    assert isinstance(C.FORWARD_AD_STATE, dict)
    assert C.TransformType.Vmap != C.TransformType.Jvp
    callables = set(C.__all__) - {
        "TORCH_VERSION",
        "OLDEST_TESTED",
        "TransformType",
        "FORWARD_AD_LEVEL",
        "FORWARD_AD_STATE",
        "DYNAMO_MODULE",
    }
    for name in callables:
        assert callable(getattr(C, name)), name


def test_hot_path_names_are_torchs_own_functions() -> None:
    """A caller of these pays no Python layer: they are torch's C functions themselves."""
    builtin = type(len)
    for name in (
        "len_torch_dispatch_stack",
        "get_interpreter_stack",
        "are_functorch_transforms_active",
        "is_functorch_wrapped_tensor",
        "is_batchedtensor",
        "is_legacy_batchedtensor",
        "get_unwrapped",
    ):
        assert isinstance(getattr(C, name), builtin), name
    assert C.FORWARD_AD_STATE is vars(torch.autograd.forward_ad)


def test_dispatch_modes() -> None:
    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return func(*args, **(kwargs or {}))

    assert C.len_torch_dispatch_stack() == 0
    assert C.get_current_dispatch_mode_stack() == []
    with Mode() as mode:
        assert C.len_torch_dispatch_stack() == 1
        assert C.get_current_dispatch_mode_stack() == [mode]


def test_transform_levels_and_wrappers() -> None:
    assert not C.get_interpreter_stack()
    assert not C.are_functorch_transforms_active()
    x = torch.randn(3, 2)
    seen = {}

    def f(row: torch.Tensor) -> torch.Tensor:
        seen["keys"] = [level.key() for level in C.get_interpreter_stack() or []]
        seen["active"] = C.are_functorch_transforms_active()
        seen["wrapped"] = C.is_functorch_wrapped_tensor(row)
        seen["batched"] = C.is_batchedtensor(row)
        seen["inner"] = C.get_unwrapped(row).shape
        seen["legacy"] = C.is_legacy_batchedtensor(row)
        return row * 2

    torch.func.vmap(f)(x)
    assert seen == {
        "keys": [C.TransformType.Vmap],
        "active": True,
        "wrapped": True,
        "batched": True,
        "inner": (3, 2),
        "legacy": False,
    }
    assert not C.is_functorch_wrapped_tensor(x) and not C.is_batchedtensor(x)

    def g(y: torch.Tensor) -> torch.Tensor:
        seen["jvp"] = [level.key() for level in C.get_interpreter_stack() or []]
        return y.sin()

    torch.func.jvp(g, (x,), (torch.ones_like(x),))
    assert seen["jvp"] == [C.TransformType.Jvp]


def test_forward_ad_level() -> None:
    assert C.FORWARD_AD_STATE[C.FORWARD_AD_LEVEL] == -1
    with fwAD.dual_level():
        assert C.FORWARD_AD_STATE[C.FORWARD_AD_LEVEL] >= 0
    assert C.FORWARD_AD_STATE[C.FORWARD_AD_LEVEL] == -1


def test_function_apply_and_dead_wrappers() -> None:
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
            pass

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            return g * 2

    x = torch.ones(3, requires_grad=True)
    args = C.unwrap_dead_wrappers((x, "constant"))
    assert isinstance(args, tuple) and args[0] is x and args[1] == "constant"
    y = C.function_apply(Double, x)
    assert y.grad_fn is not None and "Double" in type(y.grad_fn).__name__
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    # A wrapper whose transform has exited is unwrapped.
    dead = torch.func.grad(lambda t: (setattr(Double, "kept", t), t.sum())[1])(torch.ones(2))
    assert torch.equal(dead, torch.ones(2))
    leaked = Double.kept  # type: ignore[attr-defined]
    (unwrapped,) = C.unwrap_dead_wrappers((leaked,))
    assert not C.is_functorch_wrapped_tensor(unwrapped)


def test_pytree_constant_and_nonstrict_trace() -> None:
    from torch.utils._pytree import is_constant_class

    class Constant:
        def __eq__(self, other: object) -> bool:
            return isinstance(other, Constant)

        def __hash__(self) -> int:
            return 0

    C.register_pytree_constant(Constant)
    assert is_constant_class(Constant)

    def add(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    traced = C.nonstrict_trace(add)
    assert torch.equal(traced(torch.zeros(2)), torch.ones(2))
    assert C.DYNAMO_MODULE in sys.modules


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_functional_collectives() -> None:
    funcol = C.functional_collectives()
    assert callable(funcol.all_reduce) and callable(funcol.wait_tensor)
    assert C.all_gather_tensor() is funcol.all_gather_single


@pytest.mark.full
def test_importing_the_package_imports_neither_dynamo_nor_collectives() -> None:
    code = (
        "import sys, semiring_einsum, semiring_einsum.func\n"
        "print(sorted(m for m in sys.modules if m in "
        "('torch._dynamo', 'torch.distributed._functional_collectives')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- The torch floor --------------------------------------------------------------------------


def test_pyproject_asks_for_the_oldest_torch_the_tests_ran_on() -> None:
    text = PYPROJECT.read_text(encoding="utf-8")
    floors = re.findall(r'"torch>=([\d.]+)"', text)
    assert len(floors) == 1, floors
    assert tuple(int(v) for v in floors[0].split(".")) == C.OLDEST_TESTED
