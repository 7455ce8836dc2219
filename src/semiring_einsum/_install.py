"""The opt-in alias: ``import torch_semiring_einsum`` resolving to this package."""

from __future__ import annotations

import importlib
import sys

ALIAS = "torch_semiring_einsum"
_PACKAGE = __name__.rpartition(".")[0]

# The reference's modules, plus our functional core: aliasing it too keeps
# ``import torch_semiring_einsum.func`` from loading a second copy of it.
SUBMODULES = (
    "equation",
    "extend",
    "function",
    "log_backward",
    "log_differentiable",
    "log_forward",
    "log_viterbi_forward",
    "real_backward",
    "real_differentiable",
    "real_forward",
    "utils",
    "func",
)


def install_as_torch_semiring_einsum() -> None:
    """Make ``import torch_semiring_einsum`` (and its submodules) give this package.

    After this call, unchanged code that imports ``torch_semiring_einsum``,
    ``torch_semiring_einsum.utils``, ``from torch_semiring_einsum.equation
    import Equation`` and so on gets ``semiring_einsum`` and its modules: the
    same module objects, so there is one ``Equation`` class.  Call it before
    anything imports ``torch_semiring_einsum``; calling it again does nothing.

    Raises:
        RuntimeError: if the real torch-semiring-einsum was imported first.

    Example:
        >>> import semiring_einsum
        >>> semiring_einsum.install_as_torch_semiring_einsum()  # doctest: +SKIP
        >>> import torch_semiring_einsum  # doctest: +SKIP
        >>> torch_semiring_einsum is semiring_einsum  # doctest: +SKIP
        True
    """
    modules = {ALIAS: importlib.import_module(_PACKAGE)}
    for name in SUBMODULES:
        modules[f"{ALIAS}.{name}"] = importlib.import_module(f"{_PACKAGE}.{name}")
    for name, module in modules.items():
        present = sys.modules.get(name)
        if present is not None and present is not module:
            raise RuntimeError(
                f"{name!r} is already imported from {getattr(present, '__file__', present)}, "
                f"the real torch-semiring-einsum, so it cannot be replaced by {_PACKAGE}: call "
                f"{_PACKAGE}.install_as_torch_semiring_einsum() before anything imports "
                f"{ALIAS} (or import {_PACKAGE} as {ALIAS} instead)"
            )
    sys.modules.update(modules)
