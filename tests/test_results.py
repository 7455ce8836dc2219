"""The named tuples of the functions that return two tensors: fields, unpacking, transforms."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import semiring_einsum
from oracle import brute, brute_viterbi
from semiring_einsum import func

Tensor = torch.Tensor
F64 = torch.float64
EQ = "ij,jk->ik"


def _operands(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, generator=g, dtype=F64), torch.randn(4, 5, generator=g, dtype=F64)


CASES: dict[
    str, tuple[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], type, tuple[str, ...]]
] = {
    "viterbi": (
        lambda a, b: func.viterbi_einsum(EQ, a, b),
        func.ViterbiResult,
        ("values", "argmax"),
    ),
    "kbest": (
        lambda a, b: func.kbest_einsum(EQ, a, b, k=2),
        func.KBestResult,
        ("values", "argmax"),
    ),
    "entropy": (
        lambda a, b: func.entropy_einsum(EQ, a, b),
        func.EntropyResult,
        ("log_z", "entropy"),
    ),
    "expectation": (
        lambda a, b: func.expectation_einsum(EQ, [a, b], [a, b]),
        func.ExpectationResult,
        ("log_z", "expectation"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_named_fields_and_unpacking(case: str) -> None:
    fn, kind, fields = CASES[case]
    a, b = _operands()
    got = fn(a, b)
    assert type(got) is kind and kind._fields == fields and isinstance(got, tuple)
    first, second = got  # unpacks as the plain tuple did
    assert getattr(got, fields[0]) is first and getattr(got, fields[1]) is second
    assert got[0] is first and len(got) == 2


def test_the_fields_hold_the_oracles_values() -> None:
    a, b = _operands(1)
    viterbi = func.viterbi_einsum(EQ, a, b)
    want_values, want_argmax = brute_viterbi(EQ, a, b)
    torch.testing.assert_close(viterbi.values, want_values, rtol=0, atol=1e-12)
    assert torch.equal(viterbi.argmax, want_argmax)
    entropy = func.entropy_einsum(EQ, a, b)
    torch.testing.assert_close(entropy.log_z, brute("log", EQ, a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_vmap_returns_the_named_tuple_of_a_loop(case: str) -> None:
    fn, kind, _ = CASES[case]
    g = torch.Generator().manual_seed(2)
    a_batch = torch.randn(3, 3, 4, generator=g, dtype=F64)
    b = torch.randn(4, 5, generator=g, dtype=F64)
    got = torch.func.vmap(lambda a: fn(a, b))(a_batch)
    assert type(got) is kind
    for field in range(2):
        want = torch.stack([fn(a, b)[field] for a in a_batch])
        torch.testing.assert_close(got[field], want, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.full
def test_compiled_returns_the_named_tuple() -> None:
    a, b = _operands(3)
    compiled = torch.compile(lambda a, b: func.viterbi_einsum(EQ, a, b), backend="eager")
    got = compiled(a, b)
    want = func.viterbi_einsum(EQ, a, b)
    assert type(got) is func.ViterbiResult
    assert torch.equal(got.values, want.values) and torch.equal(got.argmax, want.argmax)


def test_the_drop_in_returns_a_plain_tuple() -> None:
    """As torch-semiring-einsum's log_viterbi_einsum_forward does."""
    a, b = _operands(4)
    got = semiring_einsum.log_viterbi_einsum_forward(semiring_einsum.compile_equation(EQ), a, b)
    assert type(got) is tuple and len(got) == 2
