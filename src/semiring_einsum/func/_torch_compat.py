"""Every private torch symbol the package uses, bound once, with version guards.

torch 2.13 has no public API for what these do: telling whether a tracer, a dispatch mode,
a ``torch.func`` transform or a forward-AD level is active, looking through a transform's
tensor wrappers, running an autograd Function without its argument binding, registering a
function with Dynamo as one opaque call, and the functional collectives.  Where a public API
exists it is used instead, here or in the caller (``torch.compiler.is_compiling``,
``torch.compiler.allow_in_graph``, ``torch.func.debug_unwrap``).  No other module of the
package names a private torch module or attribute (``tests/test_torch_compat.py`` checks it);
the others read the call's :class:`~._context.Context`, which :mod:`._context` works out with
these names.

Each name is bound at import to torch's own object, so a C function stays a C function and a
caller that imports the name (``from ._torch_compat import name``) pays what it paid when it
named torch directly.  Where this torch lacks a symbol, the name is bound to a fallback that
keeps results right (perhaps slower), or, where none can, to a function that raises and says
what is missing; :func:`missing` lists what this torch lacks.  Dynamo (about a second to
import) and the functional collectives are imported only when used.

This module imports nothing from the package: it is the bottom of the import order.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from types import ModuleType, SimpleNamespace
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

TORCH_VERSION: tuple[int, ...] = tuple(
    int(part) for part in re.findall(r"\d+", torch.__version__.split("+")[0])[:3]
)
"""This torch's version as numbers, ``(2, 13, 0)`` for ``2.13.0+cpu``."""

OLDEST_TESTED = (2, 13)
"""The oldest torch the tests ran on: the floor ``pyproject.toml`` asks for."""

_MISSING: list[str] = []
_ABSENT = object()


def _find(path: str) -> Any:
    """The object at the dotted ``path`` (its module imported if need be), or ``_ABSENT``."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return _ABSENT


def _bind(path: str, fallback: Any) -> Any:
    """The object at ``path``; ``fallback`` where this torch lacks it (and noted as missing)."""
    found = _find(path)
    if found is _ABSENT:
        _MISSING.append(path)
        return fallback
    return found


def _lacking(path: str) -> Callable[..., Any]:
    """A stand-in for a symbol nothing can replace: it raises, naming it."""

    def lacking(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"semiring_einsum needs {path}, which torch {torch.__version__} lacks "
            f"(the tests ran on torch >= {'.'.join(map(str, OLDEST_TESTED))})"
        )

    return lacking


# -- Tracers and dispatch modes ---------------------------------------------------------------

get_current_dispatch_mode_stack: Callable[[], list[Any]] = _bind(
    "torch.utils._python_dispatch._get_current_dispatch_mode_stack",
    _lacking("torch.utils._python_dispatch._get_current_dispatch_mode_stack"),
)
"""The active ``TorchDispatchMode`` objects: :func:`._context.tracing` looks for a tracing
or fake-tensor mode among them."""

len_torch_dispatch_stack: Callable[[], int] = _bind(
    "torch._C._len_torch_dispatch_stack", lambda: len(get_current_dispatch_mode_stack())
)
"""How many dispatch modes are active: the cheap first check of every call (nearly always 0)."""

# -- torch.func transforms --------------------------------------------------------------------

get_interpreter_stack: Callable[[], list[Any] | None] = _bind(
    "torch._C._functorch.get_interpreter_stack",
    _lacking("torch._C._functorch.get_interpreter_stack"),
)
"""The open ``torch.func`` transform levels, innermost last (``None`` when none is open);
each level's ``key()`` is a :data:`TransformType`."""

TransformType: Any = _bind(
    "torch._C._functorch.TransformType", SimpleNamespace(Vmap=object(), Jvp=object())
)
"""The kinds of transform level (``TransformType.Vmap``, ``TransformType.Jvp``, ...).  The
fallback matches no level: every level then counts as one that may differentiate (slower,
still right), and forward-over-forward goes unnoticed, as before the check existed."""

are_functorch_transforms_active: Callable[[], bool] = _bind(
    "torch._C._are_functorch_transforms_active", lambda: bool(get_interpreter_stack())
)
"""Whether a ``torch.func`` transform is open: :func:`._autograd.apply` then goes through
``Function.apply`` (transform dispatch) rather than its shortcut."""

unwrap_dead_wrappers: Callable[[Sequence[Any]], tuple[Any, ...]] = _bind(
    "torch._functorch.utils.unwrap_dead_wrappers", tuple
)
"""The arguments with the wrappers of exited transforms unwrapped, as ``Function.apply`` does
before it runs (the fallback, for a torch without such wrappers, changes nothing)."""

is_functorch_wrapped_tensor: Callable[[torch.Tensor], bool] = _bind(
    "torch._C._functorch.is_functorch_wrapped_tensor",
    _lacking("torch._C._functorch.is_functorch_wrapped_tensor"),
)
"""Whether a tensor is a transform's wrapper (batched, grad-tracking, functional): the native
kernel reads only unwrapped memory; the DTensor route looks through wrappers."""

is_batchedtensor: Callable[[torch.Tensor], bool] = _bind(
    "torch._C._functorch.is_batchedtensor", _lacking("torch._C._functorch.is_batchedtensor")
)
"""Whether a wrapper is ``vmap``'s (batched) one: the call then may not read values."""

get_unwrapped: Callable[[torch.Tensor], torch.Tensor] = _bind(
    "torch._C._functorch.get_unwrapped", _lacking("torch._C._functorch.get_unwrapped")
)
"""The tensor one wrapper holds (one level down)."""

is_legacy_batchedtensor: Callable[[torch.Tensor], bool] = _bind(
    "torch._C._functorch.is_legacy_batchedtensor", lambda tensor: False
)
"""Whether a tensor is batched by ``torch.autograd``'s own (legacy) vmap; a torch without that
vmap has no such tensors."""

# -- autograd Functions -----------------------------------------------------------------------


def _base_apply(fn: type[torch.autograd.Function], *args: Any) -> Any:
    return super(torch.autograd.Function, fn).apply(*args)  # type: ignore[misc]


def _public_apply(fn: type[torch.autograd.Function], *args: Any) -> Any:
    return fn.apply(*args)


_BASE = getattr(torch._C, "_FunctionBase", None)
_APPLY_OWNER = next((c for c in torch.autograd.Function.__mro__[1:] if "apply" in vars(c)), None)
function_apply: Callable[..., Any] = _base_apply
"""``function_apply(fn, *args)`` runs the autograd Function ``fn`` as ``fn.apply(*args)`` ends:
the C ``torch._C._FunctionBase.apply``, without the ``inspect.signature`` binding of the
arguments ``Function.apply`` does first (tens of microseconds a call).  Only for positional
arguments, no open transform and the wrappers of exited ones unwrapped
(:data:`unwrap_dead_wrappers`).  Where ``Function``'s base is not that class, it is
``fn.apply`` itself."""

if _BASE is None or _APPLY_OWNER is not _BASE:  # pragma: no cover - other torch versions
    _MISSING.append("torch._C._FunctionBase.apply")
    function_apply = _public_apply

# -- Forward-mode AD --------------------------------------------------------------------------

FORWARD_AD_LEVEL = "_current_level"
"""The key of :data:`FORWARD_AD_STATE` that holds the innermost open dual level (-1: none)."""

FORWARD_AD_STATE: dict[str, Any] = (
    vars(torch.autograd.forward_ad)
    if FORWARD_AD_LEVEL in vars(torch.autograd.forward_ad)
    else {FORWARD_AD_LEVEL: 0}
)
"""``torch.autograd.forward_ad``'s namespace, whose ``FORWARD_AD_LEVEL`` entry is the open dual
level: ``FORWARD_AD_STATE[FORWARD_AD_LEVEL] >= 0`` while a ``dual_level`` is open.  Read as a
dict, as cheap as the attribute (every call reads it).  The fallback says a level is always
open: every call then takes the autograd Function (slower, still right)."""

if FORWARD_AD_STATE is not vars(torch.autograd.forward_ad):
    _MISSING.append("torch.autograd.forward_ad._current_level")

# -- torch.compile ----------------------------------------------------------------------------

register_pytree_constant: Callable[[type], None] = _bind(
    "torch.utils._pytree.register_constant", lambda cls: None
)
"""Register a class whose instances pytrees treat as constants (a semiring in a compiled
graph is then the object itself, guarded on by equality).  Without it, registration is
skipped; :func:`nonstrict_trace`'s fallback takes no such objects anyway."""

DYNAMO_MODULE = "torch._dynamo"
"""Dynamo's module: :mod:`._compile` registers its functions once something imports it (it
costs about a second, so the package never does)."""


def nonstrict_trace(fn: F) -> F:
    """``fn`` as one call in Dynamo's graphs, traced by AOTAutograd on fake tensors
    (``torch._dynamo.nonstrict_trace``); on a torch without it (before 2.8), the public
    ``torch.compiler.allow_in_graph``, which takes tensors and Python constants only.

    Imports Dynamo.
    """
    trace = getattr(importlib.import_module(DYNAMO_MODULE), "nonstrict_trace", None)
    if trace is None:  # pragma: no cover - torch < 2.8
        return torch.compiler.allow_in_graph(fn)
    return trace(fn)


# -- torch.distributed ------------------------------------------------------------------------


def functional_collectives() -> ModuleType:
    """``torch.distributed._functional_collectives`` (imported on first use): the collectives
    as traceable tensor ops (``all_reduce``, ``wait_tensor``, ...) that DTensor uses."""
    import torch.distributed._functional_collectives as funcol

    return funcol


def all_gather_tensor() -> Callable[..., torch.Tensor]:
    """The functional all-gather, ``(tensor, gather_dim, group) -> tensor``:
    ``all_gather_single`` where this torch has it, else ``all_gather_tensor``."""
    funcol = functional_collectives()
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return gather


# -- torch.library ----------------------------------------------------------------------------


def destroy_library(lib: torch.library.Library) -> None:
    """Undo every registration made through ``lib`` (``Library._destroy``: torch has no
    public way to remove one kernel registration)."""
    destroy = getattr(lib, "_destroy", None)
    if destroy is None:  # pragma: no cover - other torch versions
        raise RuntimeError(
            f"torch {torch.__version__} cannot remove a kernel registration "
            "(torch.library.Library._destroy is missing)"
        )
    destroy()


# -- Version report ---------------------------------------------------------------------------


def missing() -> list[str]:
    """The private symbols this torch lacks (empty on the torch the tests ran on).

    Imports Dynamo and, where torch has distributed support, the functional collectives, to
    look into them (the first call may take a second or two).
    """
    found = list(_MISSING)
    if not hasattr(torch.library.Library, "_destroy"):
        found.append("torch.library.Library._destroy")
    dynamo = importlib.import_module(DYNAMO_MODULE)
    for name in ("nonstrict_trace", "allow_in_graph"):
        if not hasattr(dynamo, name):
            found.append(f"{DYNAMO_MODULE}.{name}")
    if torch.distributed.is_available():
        try:
            funcol = functional_collectives()
        except ImportError:  # pragma: no cover - other torch builds
            found.append("torch.distributed._functional_collectives")
        else:
            for name in ("all_reduce", "wait_tensor", "all_gather_single"):
                if not hasattr(funcol, name):
                    found.append(f"{funcol.__name__}.{name}")
    return found


__all__ = [
    "TORCH_VERSION",
    "OLDEST_TESTED",
    "get_current_dispatch_mode_stack",
    "len_torch_dispatch_stack",
    "get_interpreter_stack",
    "TransformType",
    "are_functorch_transforms_active",
    "unwrap_dead_wrappers",
    "is_functorch_wrapped_tensor",
    "is_batchedtensor",
    "get_unwrapped",
    "is_legacy_batchedtensor",
    "function_apply",
    "FORWARD_AD_LEVEL",
    "FORWARD_AD_STATE",
    "register_pytree_constant",
    "DYNAMO_MODULE",
    "nonstrict_trace",
    "functional_collectives",
    "all_gather_tensor",
    "destroy_library",
    "missing",
]
