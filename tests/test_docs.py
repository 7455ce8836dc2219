"""The documentation in ``docs/``: its code runs, its reference is complete, its links resolve."""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import semiring_einsum
from semiring_einsum import func

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_the_pages_are_all_there() -> None:
    assert set(PAGES) >= {
        "index.md",
        "getting-started.md",
        "semirings.md",
        "memory.md",
        "torch-func.md",
        "custom-semirings.md",
        "tutorials.md",
        "migrating.md",
        "performance.md",
        "api.md",
    }


CODE_PAGES = [page for page in PAGES if FENCE.search((DOCS / page).read_text())]


@pytest.mark.parametrize("page", CODE_PAGES)
def test_code_blocks_run(
    page: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every ```python block of a page runs, in order, in one namespace per page.

    ``torch.compile`` uses the ``aot_eager`` backend here (Dynamo and AOTAutograd, where our
    functions are traced) instead of inductor, whose code generation costs seconds per graph.
    """
    blocks = FENCE.findall((DOCS / page).read_text())
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    # A real module, since Dynamo looks up the globals of compiled functions by module name.
    module = types.ModuleType(f"docs_{page[:-3].replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for block in blocks:
                exec(compile(block, str(DOCS / page), "exec"), namespace)
    finally:
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
    capsys.readouterr()


def _documented(text: str) -> set[str]:
    """Full names of the objects that the page's autodoc / py directives describe."""
    names = set()
    for match in re.finditer(r"\.\. (?:auto\w+|py:\w+):: (\S+)\n((?:[ \t]+:.*\n)*)", text):
        name, options = match.groups()
        module = re.search(r":module: (\S+)", options)
        names.add(f"{module.group(1)}.{name}" if module else name)
    return names


def test_api_reference_covers_both_layers() -> None:
    documented = _documented((DOCS / "api.md").read_text())
    top = {f"semiring_einsum.{n}" for n in semiring_einsum.__all__ if n != "func"}
    core = {f"semiring_einsum.func.{n}" for n in func.__all__}
    assert len(top) == 14  # the reference's 13 names and install_as_torch_semiring_einsum
    assert not top - documented, "top-level names missing from docs/api.md"
    assert not core - documented, "semiring_einsum.func names missing from docs/api.md"


def test_every_page_is_in_the_table_of_contents() -> None:
    index = (DOCS / "index.md").read_text()
    for page in PAGES:
        if page != "index.md":
            assert re.search(rf"^{re.escape(page[:-3])}$", index, re.M), page


def test_tutorials_page_lists_every_example() -> None:
    text = (DOCS / "tutorials.md").read_text()
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert f"examples/{script.name}" in text


def test_performance_page_names_its_command() -> None:
    assert "python benchmarks/run.py" in (DOCS / "performance.md").read_text()


@pytest.mark.parametrize("source", ["README.md", *(f"docs/{p}" for p in PAGES)])
def test_relative_links_resolve(source: str) -> None:
    path = ROOT / source
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{source} links to missing {target}"


@pytest.mark.full
@pytest.mark.skipif(
    not (importlib.util.find_spec("sphinx") and importlib.util.find_spec("myst_parser")),
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)
def test_sphinx_build_has_no_warnings(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
