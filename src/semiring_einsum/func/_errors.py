"""The one exception family of the package."""

from __future__ import annotations


class EquationError(ValueError):
    """An einsum equation, or the operands given for it, is invalid.

    The message always quotes the equation, and names the operand and the
    index at fault where there is one, e.g.
    ``index 'j' has size 3 in operand 0 but 4 in operand 1 (equation 'ij,jk->ik')``.

    Example:
        >>> import torch
        >>> from semiring_einsum import func
        >>> try:
        ...     func.log_einsum("ab,bc->ad", torch.zeros(2, 3), torch.zeros(3, 4))
        ... except func.EquationError as e:
        ...     print(e)
        output index 'd' appears in no operand (equation 'ab,bc->ad')
    """


def fail(equation: str, message: str) -> EquationError:
    """Build an :class:`EquationError` whose message ends with the equation."""
    return EquationError(f"{message} (equation {equation!r})")
