"""The one cache registry: every cache of the package is bounded, least recently used out
first, and emptied by ``clear_caches``."""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import semiring_einsum as se
from semiring_einsum import func
from semiring_einsum.func import _autograd, _cache, _prepare

SRC = Path(__file__).resolve().parents[1] / "src" / "semiring_einsum"


def _modules() -> list[object]:
    names = ["semiring_einsum"] + [
        m.name for m in pkgutil.walk_packages(se.__path__, "semiring_einsum.")
    ]
    return [importlib.import_module(n) for n in names if not n.endswith("__main__")]


def _memos() -> list[functools._lru_cache_wrapper]:
    found = {}
    for module in _modules():
        for value in vars(module).values():
            if isinstance(value, functools._lru_cache_wrapper):
                found[id(value)] = value
    return list(found.values())


def _tables() -> list[_cache.LRU]:
    found = {}
    for module in _modules():
        for value in vars(module).values():
            if isinstance(value, _cache.LRU):
                found[id(value)] = value
    return list(found.values())


def test_every_cache_is_registered_and_bounded() -> None:
    memos = _memos()
    assert len(memos) >= 20  # (the package has a few dozen)
    for memo in memos:
        assert memo.cache_clear in _cache._CLEARS, memo.__wrapped__
        assert memo.cache_info().maxsize is not None, memo.__wrapped__
    tables = _tables()
    assert len(tables) >= 3  # call setups, callback plans, on-demand Functions
    for table in tables:
        assert table.clear in _cache._CLEARS and table.maxsize >= 1


def test_no_module_makes_a_cache_outside_the_registry() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "_cache.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("lru_cache", "cache"):
                if isinstance(node.value, ast.Name) and node.value.id == "functools":
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, f"use _cache.cached or _cache.LRU: {offenders}"


def test_clear_caches_empties_every_cache() -> None:
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(4, 5)
    func.log_einsum("ij,jk->ik", a, b).sum().backward()
    func.viterbi_einsum("ij,jk,kl->il", a.detach(), b, torch.randn(5, 2))
    se.log_einsum(se.compile_equation("ij,jk->ik"), a, b, block_size=2).sum().backward()
    seven = [torch.randn(2, requires_grad=True) for _ in range(7)]
    func.einsum("a,a,a,a,a,a,a->", *seven, optimize=False)  # a Function made on demand
    assert len(_autograd._MADE) and len(_prepare._SEEN)
    assert any(m.cache_info().currsize for m in _memos())
    assert any(len(t) for t in _tables())
    func.clear_caches()
    assert [m.__wrapped__ for m in _memos() if m.cache_info().currsize] == []
    assert [t for t in _tables() if len(t)] == []
    # and everything still works after
    got = func.log_einsum("ij,jk->ik", a.detach(), b)
    torch.testing.assert_close(got, torch.logsumexp(a.detach()[:, :, None] + b, 1))


def test_lru_evicts_the_least_recently_used() -> None:
    table: _cache.LRU[str, int] = _cache.LRU(2)
    table.put("a", 1)
    table.put("b", 2)
    assert table.get("a") == 1  # a is now the most recently used
    table.put("c", 3)
    assert "b" not in table and table.keys() == ["a", "c"]
    with pytest.raises(TypeError):
        table.get([])  # type: ignore[arg-type]  # unhashable, as a dict says


def test_a_cache_must_be_bounded() -> None:
    with pytest.raises(ValueError, match="positive maxsize"):
        _cache.cached(0)
    with pytest.raises(ValueError, match="positive maxsize"):
        _cache.LRU(0)
