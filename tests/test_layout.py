"""The package's module layout (DESIGN §4): each module imports only modules listed after it
in :data:`ORDER` (so there are no cycles), and no module reaches for another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "semiring_einsum"

ORDER = [
    # the drop-in layer, top to bottom
    "semiring_einsum",
    "semiring_einsum.__main__",
    "semiring_einsum.bench",
    "semiring_einsum.bench.report",
    "semiring_einsum.bench.runner",
    "semiring_einsum.bench.measure",
    "semiring_einsum.bench.workloads",
    "semiring_einsum.log_backward",
    "semiring_einsum.real_backward",
    "semiring_einsum.log_forward",
    "semiring_einsum.real_forward",
    "semiring_einsum.log_viterbi_forward",
    "semiring_einsum.log_differentiable",
    "semiring_einsum.real_differentiable",
    "semiring_einsum.function",
    "semiring_einsum.extend",
    "semiring_einsum._install",
    "semiring_einsum._interop",
    "semiring_einsum.equation",
    "semiring_einsum.utils",
    # the functional core
    "semiring_einsum.func",
    "semiring_einsum.func._structured",
    "semiring_einsum.func._sample",
    "semiring_einsum.func._boolean",
    "semiring_einsum.func._api",
    "semiring_einsum.func._caches",
    "semiring_einsum.func._engine",
    "semiring_einsum.func._viterbi",
    "semiring_einsum.func._prepare",
    "semiring_einsum.func._distributed",
    "semiring_einsum.func._autograd",
    "semiring_einsum.func._rules",
    "semiring_einsum.func._ops",
    "semiring_einsum.func._logblas",
    "semiring_einsum.func._native",
    "semiring_einsum.func._multi",
    "semiring_einsum.func._kernels",
    "semiring_einsum.func._ties",
    "semiring_einsum.func._plan",
    "semiring_einsum.func._parse",
    "semiring_einsum.func._budget",
    "semiring_einsum.func._compile",
    "semiring_einsum.func._context",
    "semiring_einsum.func._semiring",
    "semiring_einsum.func._results",
    "semiring_einsum.func._errors",
    "semiring_einsum.func._torch_compat",
    "semiring_einsum.func._cache",
]
"""Every module of the package, from the top (imports most) to the bottom (imports none)."""


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` for every import of a package module by ``name`` (anywhere
    in the file, functions included); ``name`` is the imported name of a ``from`` import."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:  # a module: from . import _kernels
                    found.append((node.lineno, f"{module}.{alias.name}", None))
                else:
                    found.append((node.lineno, module, alias.name))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("semiring_einsum"):
            for alias in node.names:
                found.append((node.lineno, node.module or "", alias.name))
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name, None) for a in node.names if a.name.startswith("semiring_e")
            ]
    return found


def test_every_module_is_in_the_order() -> None:
    assert sorted(MODULES) == sorted(ORDER), "add the new module to ORDER (or remove the old)"


@pytest.mark.parametrize("name", ORDER)
def test_a_module_imports_only_modules_below_it(name: str) -> None:
    wrong = [
        f"line {line}: {module}"
        for line, module, _ in _imports(name)
        if ORDER.index(module) <= ORDER.index(name)
    ]
    assert not wrong, f"{name} imports modules above it (or itself): {wrong}"


@pytest.mark.parametrize("name", ORDER)
def test_no_module_imports_another_modules_private_names(name: str) -> None:
    """``from ._x import _y`` and ``alias._y`` (``alias`` a package module) are private reaches."""
    path = MODULES[name]
    wrong = [
        f"line {line}: {module}.{imported}"
        for line, module, imported in _imports(name)
        if imported is not None and imported.startswith("_") and not imported.startswith("__")
    ]
    aliases = {
        alias.asname or alias.name
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level and node.module is None
        for alias in node.names
    }
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            wrong.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert not wrong, f"{name} uses private names of other modules: {wrong}"
