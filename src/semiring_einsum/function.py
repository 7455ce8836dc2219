"""Joining a forward and a backward (mirrors ``torch_semiring_einsum.function``).

:func:`combine` is the drop-in function; :func:`take_kwargs` is the small
helper of the reference's module, kept for code that imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._interop import combine

__all__ = ["combine", "take_kwargs"]


def take_kwargs(keys: Iterable[str], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Move the entries of ``kwargs`` named in ``keys`` into a new dict.

    The moved entries are removed from ``kwargs``.

    Example:
        >>> from semiring_einsum.function import take_kwargs
        >>> options = {"a": 1, "b": 2}
        >>> take_kwargs(["a", "c"], options), options
        ({'a': 1}, {'b': 2})
    """
    return {key: kwargs.pop(key) for key in keys if key in kwargs}
