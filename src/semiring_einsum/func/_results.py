"""What the functions that return two tensors return: named tuples, which unpack as before.

``values, argmax = viterbi_einsum(...)`` still works; so does ``viterbi_einsum(...).argmax``.
They are pytrees to ``torch.func`` and ``torch.compile`` (as every ``NamedTuple`` is).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor


class ViterbiResult(NamedTuple):
    """:func:`~semiring_einsum.func.viterbi_einsum`'s result."""

    values: Tensor
    """The max-plus einsum (differentiable)."""
    argmax: Tensor
    """Per output cell, the summed indices' values of its first maximising term
    (int64, ``values.shape + (number of summed indices,)``)."""


class KBestResult(NamedTuple):
    """:func:`~semiring_einsum.func.kbest_einsum`'s result."""

    values: Tensor
    """Per output cell, its ``k`` best term values, best first (last dim ``k``)."""
    argmax: Tensor
    """Their summed indices' values (last dims ``k`` and the number of summed indices)."""


class EntropyResult(NamedTuple):
    """:func:`~semiring_einsum.func.entropy_einsum`'s result."""

    log_z: Tensor
    """The log partition function per output cell (:func:`log_einsum`'s result)."""
    entropy: Tensor
    """The entropy of each cell's distribution over its terms (nats)."""


class ExpectationResult(NamedTuple):
    """:func:`~semiring_einsum.func.expectation_einsum`'s result."""

    log_z: Tensor
    """The log partition function per output cell (:func:`log_einsum`'s result)."""
    expectation: Tensor
    """The expected sum of the value factors under each cell's distribution."""
