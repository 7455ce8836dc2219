"""The stack-RNN benchmark's model (``benchmarks/stack_rnn.py``): ours against plain torch.

No timing: a few timesteps in float64, where our loss must equal plain torch's and our
gradients (``grad_of_neg_inf=0.0`` on the einsums with -inf outputs) must all be finite.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import semiring_einsum

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stack_rnn.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmarks_stack_rnn", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("block", [10, semiring_einsum.AUTOMATIC_BLOCK_SIZE], ids=["b10", "auto"])
def test_ours_matches_plain_torch(bench, block):
    task = bench.make_task(batch=3, steps=6, dtype=torch.float64)
    want = task.train_step(bench.torch_backend())
    torch_grads = task.grads()
    ours = bench.library_backend("ours", semiring_einsum, block)
    got = task.train_step(ours)
    grads = task.grads()
    assert math.isfinite(float(got))
    assert abs(float(got) - float(want)) <= 1e-9
    assert len(grads) == len(torch_grads) > 0
    for g in grads:
        assert torch.isfinite(g).all()
    # Plain torch has no grad_of_neg_inf: its gradients are NaN, which is why the option exists.
    assert any(g.isnan().any() for g in torch_grads)


def test_viterbi_decode_matches_plain_torch(bench):
    task = bench.make_task(batch=3, steps=6, dtype=torch.float64)
    ours = bench.library_backend("ours", semiring_einsum, 10)
    for got, want in zip(task.decode(ours), task.decode(bench.torch_backend())):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_pop_operands_have_a_neg_inf_triangle(bench):
    task = bench.make_task(batch=2, steps=6, dtype=torch.float64)
    gamma, popped = bench.pop_operands(task, 5)
    assert gamma.shape == (2, 4, 4, 2, 3, 2, 3) and popped.shape == (2, 4, 2, 3, 2)
    rows, cols = torch.tril_indices(4, 4, offset=-1)
    assert torch.isneginf(gamma[:, rows, cols]).all()
    assert torch.isfinite(popped).all()
