"""Differentiable real einsum (mirrors ``torch_semiring_einsum.real_differentiable``).

:func:`einsum` is the drop-in function; the other names are what the
reference's module imports, kept at the same path.
"""

from __future__ import annotations

from ._interop import combine, einsum, real_einsum_backward, real_einsum_forward

__all__ = ["combine", "einsum", "real_einsum_backward", "real_einsum_forward"]
