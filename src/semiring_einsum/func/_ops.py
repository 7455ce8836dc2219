"""The step kernels as registered operators: ``torch.ops.semiring_einsum.<name>``.

Each built-in step kernel is an operator defined with ``torch.library`` (a schema, a
CPU/default kernel, a fake (shape-only) implementation and a vmap rule), so that

* ``torch.compile`` places one opaque node per step and runs the eager kernel, value
  branches included (the log certificate, the NaN fallbacks of the max-plus kernels);
* a device kernel (CUDA, Triton, ...) can be registered for the same operator
  (:meth:`Operator.register_kernel`), and a sharding rule attached to it.

Operators take no Python objects: a step travels as its key (:meth:`~._plan.Step.key`).
They are called only inside the rules' forward and first-order backward, which autograd
never records, so they need no autograd formula.

Calling through the dispatcher costs about 12 µs, more than a whole small contraction, so
:meth:`Operator.__call__` runs the Python kernel directly where nothing needs the operator:
plain operands on a device without a registered kernel.  Kernels that never branch on values
(the windowed ones, real BLAS) are also run directly while tracing or under ``vmap``, so the
compiler sees, and fuses, their torch operations; the max-plus slice kernel has a value-free
form for tracers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _kernels as K
from . import _logblas as LB
from . import _native as NATIVE
from ._context import Context
from ._plan import Step, decode, fold
from ._torch_compat import destroy_library

Tensor = torch.Tensor
NAMESPACE = "semiring_einsum"
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")


class Operator:
    """One step kernel, registered as ``semiring_einsum::<name>``.

    Attributes:
        name: The operator's name in the namespace.
        impl: The Python kernel (the operator's CPU and default implementation).
        opaque: Whether the kernel reads values (so it must stay opaque to tracers
            and to ``vmap``); value-free kernels are run inline there.
        traced: A value-free form of an opaque kernel, run inline while tracing.
        eager: What a plain eager call runs instead of ``impl``, when it differs (the
            same outputs, with Python scalars where the schema needs tensors).
        qualname: ``"semiring_einsum::<name>"``.
        schema: The operator's schema after its name (arguments and results).
        op: The registered operator (``torch.ops.semiring_einsum.<name>.default``).
    """

    def __init__(
        self,
        name: str,
        schema: str,
        impl: Callable[..., Any],
        fake: Callable[..., Any],
        *,
        opaque: bool,
        vmap: Callable[[Any], Callable[..., Any]] | None = None,
        traced: Callable[..., Any] | None = None,
        eager: Callable[..., Any] | None = None,
    ) -> None:
        self.name = name
        self.impl = impl
        self.eager = impl if eager is None else eager
        self.opaque = opaque
        self.traced = traced
        self.qualname = f"{NAMESPACE}::{name}"
        self.schema = schema
        # torch.library's own API, not its custom_op wrapper: that one runs the
        # kernel with Dynamo disabled, whose frame hook cost 0.07 ms per
        # call on a log step of a batched matmul (b=8, n=128), more than the
        # whole compiled overhead we can afford.  Compiled graphs already run
        # with Dynamo disabled.
        _LIBRARY.define(name + schema)
        _LIBRARY.impl(name, _registered(impl), "CompositeExplicitAutograd")
        torch.library.register_fake(self.qualname, fake, lib=_LIBRARY)
        self.op = getattr(getattr(torch.ops, NAMESPACE), name).default
        if vmap is not None:  # a vmap rule made for this operator
            torch.library.register_vmap(self.qualname, vmap(self.op), lib=_LIBRARY)
        self.devices: set[str] = set()  # those with a kernel registered for them
        self._registrations: dict[str, Registration] = {}

    def register_kernel(self, device_type: str, kernel: Callable[..., Any]) -> Registration:
        """Run ``kernel`` for this operator on ``device_type`` (always through the
        dispatcher), until the returned registration is removed."""
        if device_type in self.devices:
            raise ValueError(
                f"{self.qualname} already has a kernel for {device_type!r}: remove that "
                "registration first"
            )
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        torch.library.register_kernel(self.qualname, device_type, kernel, lib=lib)
        self.devices.add(device_type)
        registration = Registration(self, device_type, lib)
        self._registrations[device_type] = registration  # (the library lives until removed)
        return registration

    def __call__(self, ctx: Context, spec: Any, *args: Any) -> Any:
        """Run the kernel on ``spec.step`` (the operator gets ``spec.key``)."""
        if not (ctx.traced or ctx.batched or ctx.foreign or self.devices) and not (
            torch.compiler.is_compiling()
        ):
            return self.eager(spec.step, *args)  # the common case first
        if ctx.device_type in self.devices:
            return self.op(spec.key, *args)
        # Dynamo may also trace a frame of ours on its own (a rule's forward, after a
        # graph break), under a context worked out eagerly: it is tracing all the same.
        if ctx.traced or torch.compiler.is_compiling():
            if self.traced is not None:
                return self.traced(spec.step, *args)
            return self.op(spec.key, *args) if self.opaque else self.impl(spec.step, *args)
        if (ctx.batched or ctx.foreign) and self.opaque:
            return self.op(spec.key, *args)
        return self.impl(spec.step, *args)


class Registration:
    """A device kernel registered for an operator; :meth:`remove` (or leaving a ``with``
    block) unregisters it."""

    def __init__(self, operator: Operator, device_type: str, lib: torch.library.Library) -> None:
        self._operator = operator
        self._device_type = device_type
        self._lib: torch.library.Library | None = lib

    def remove(self) -> None:
        """Unregister the kernel (again: nothing)."""
        if self._lib is not None:
            destroy_library(self._lib)
            self._lib = None
            self._operator.devices.discard(self._device_type)
            self._operator._registrations.pop(self._device_type, None)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ------------------------------------------------------------------- helpers
def _registered(impl: Callable[..., Any]) -> Callable[..., Any]:
    """The operator's implementation: ``impl`` on the decoded step, outputs contiguous.

    (Compiled code checks an operator's output strides against its fake's, which
    are contiguous.)  Only the registered operator pays for the copies; direct
    calls do not.
    """

    @functools.wraps(impl)
    def registered(key: str, *args: Any) -> Any:
        out = impl(decode(key).step, *args)
        if isinstance(out, tuple):
            return tuple(t.contiguous() for t in out)
        return out.contiguous()

    return registered


def _out(step: Step, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty(K.out_shape(step), dtype=dtype)


def _no_index(like: Tensor) -> Tensor:
    """What a max-plus operator returns for the argmax when none was asked for."""
    return like.new_empty((0,), dtype=torch.int64)


def _folded(
    key: str, info: Any, dims: Sequence[int | None], xs: Sequence[Tensor]
) -> tuple[str, list[Tensor]]:
    """A vmap rule's call: the batch folded into the step as a new leading output index."""
    sized = decode(key)
    step = fold(sized, info.batch_size, [d is not None for d in dims])
    ys = [x if d is None else x.movedim(d, 0) for x, d in zip(xs, dims)]
    return step.key(sized.budget, sized.itemsize, sized.device_type), ys


# ---------------------------------------------------------------- real BLAS
def _real_blas(step: Step, xs: list[Tensor]) -> Tensor:
    out = K.einsum_letters(step.inputs, step.output, *xs)
    if len(xs) == 1 and not step.windows:  # a pure permutation may be a view
        out = out.clone()
    return out


def _real_blas_fake(key: str, xs: list[Tensor]) -> Tensor:
    return _out(decode(key).step, xs[0])


def _one_output_vmap(op: Callable[..., Tensor]) -> Callable[..., Any]:
    def rule(info: Any, in_dims: tuple[Any, ...], key: str, xs: list[Tensor]) -> Any:
        folded, ys = _folded(key, info, in_dims[1], xs)
        return op(folded, ys), 0

    return rule


# ------------------------------------------------------------------ log BLAS
def _residual_shapes(step: Step, a: Tensor, b: Tensor) -> tuple[list[int], list[int]]:
    """The shapes of the residuals (``exp(X - mX)`` or ``mX``, in the program's layout)."""
    prog = LB.program(step)
    assert prog is not None
    return (
        _residual_shape(a, prog.perm_a, prog.dims_a, prog.save_a),
        _residual_shape(b, prog.perm_b, prog.dims_b, prog.save_b),
    )


def _residual_shape(
    x: Tensor, perm: tuple[int, ...] | None, dims: tuple[int, ...], save: bool
) -> list[int]:
    laid = [x.shape[d] for d in perm] if perm is not None else list(x.shape)
    return laid if save else [1 if d in dims else n for d, n in enumerate(laid)]


# How a log BLAS forward went (its last residual): not certified (residuals are
# placeholders); certified; certified with cells whose terms are all -inf.
NOT_CERTIFIED, CERTIFIED, CERTIFIED_DEAD = 0, 1, 2


def _log_blas(step: Step, a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    """Log step on BLAS: ``(out, res_a, res_b, sumexp, certified)``.

    When every cell passed the certificate (or is all -inf), the residuals are
    what a first-order backward needs (see :func:`._logblas.forward`) and
    ``certified`` is ``CERTIFIED`` (or ``CERTIFIED_DEAD``).  Otherwise the
    cells at risk were recomputed (or, when most were, the whole step ran on
    the exact row or window kernel), the residuals are placeholders and
    ``certified`` is ``NOT_CERTIFIED``.
    """
    *outs, certified = _log_blas_eager(step, a, b)
    return (*outs, torch.tensor(certified, device=outs[0].device))


def _log_blas_eager(step: Step, a: Tensor, b: Tensor) -> tuple[Any, ...]:
    """:func:`_log_blas` with ``certified`` a Python int (a plain eager call that
    keeps no residuals does not pay for a tensor it drops)."""
    prog = LB.program(step)
    assert prog is not None, f"not a BLAS log step: {step}"
    fast = LB.forward(prog, a, b)
    if fast is not None and len(fast) == 5:
        *outs, dead = fast
        return (*outs, CERTIFIED_DEAD if dead else CERTIFIED)
    if fast is not None:
        out = fast[0]
    else:  # most cells at risk (adversarial inputs): an exact kernel for the whole step
        rows = K.log_rows(step, [a, b])
        out = rows if rows is not None else K.log_forward(step, [a, b], inplace=True)[0]
    shape_a, shape_b = _residual_shapes(step, a, b)
    return out, a.new_empty(shape_a), b.new_empty(shape_b), _out(step, a), NOT_CERTIFIED


def _log_blas_fake(key: str, a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    step = decode(key).step
    shape_a, shape_b = _residual_shapes(step, a, b)
    return (
        _out(step, a),
        a.new_empty(shape_a),
        b.new_empty(shape_b),
        _out(step, a),
        a.new_empty((), dtype=torch.int64),
    )


def _log_blas_vmap(op: Callable[..., Any]) -> Callable[..., Any]:
    def rule(
        info: Any, in_dims: tuple[Any, ...], key: str, a: Tensor, b: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[int | None, ...]]:
        folded, (ya, yb) = _folded(key, info, in_dims[1:3], [a, b])
        outs = op(folded, ya, yb)
        dim_a = 0 if in_dims[1] is not None else None
        dim_b = 0 if in_dims[2] is not None else None
        return outs, (0, dim_a, dim_b, 0, None)

    return rule


def _log_blas_vjp(
    step: Step,
    neg_inf: str,
    a: Tensor,
    b: Tensor,
    out: Tensor,
    res_a: Tensor,
    res_b: Tensor,
    sumexp: Tensor,
    certified: Tensor,
    g: Tensor,
    need_a: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor]:
    """First-order gradients of a log BLAS step (a not-needed one is an empty tensor).

    From the forward's residuals when it was certified (two matmuls and a
    division); otherwise exactly, the certified cells on BLAS and the others on
    the blocked path.
    """
    needs = (need_a, need_b)
    grads: Sequence[Tensor | None]
    state = int(certified)
    if state != NOT_CERTIFIED:
        policy = K.NegInf.from_key(neg_inf)
        dead = state == CERTIFIED_DEAD
        grads = LB.vjp_certified(step, policy, a, b, out, res_a, res_b, sumexp, g, needs, dead)
    else:
        grads = LB.vjp_exact(step, K.NegInf.from_key(neg_inf), (a, b), out, g, needs, plain=True)
    ga, gb = (gk if gk is not None else x.new_empty((0,)) for gk, x in zip(grads, (a, b)))
    return ga, gb


def _log_blas_vjp_fake(
    key: str,
    neg_inf: str,
    a: Tensor,
    b: Tensor,
    out: Tensor,
    res_a: Tensor,
    res_b: Tensor,
    sumexp: Tensor,
    certified: Tensor,
    g: Tensor,
    need_a: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor]:
    return (
        a.new_empty(a.shape if need_a else (0,)),
        b.new_empty(b.shape if need_b else (0,)),
    )


# --------------------------------------------------------------- log kernels
def _log_rows(step: Step, xs: list[Tensor]) -> Tensor:
    out = K.log_rows(step, xs)
    return out if out is not None else K.log_forward(step, xs, inplace=True)[0]


def _log_windows(step: Step, inplace: bool, xs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return K.log_forward(step, xs, inplace=inplace)


def _log_windows_fake(key: str, inplace: bool, xs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    step = decode(key).step
    return _out(step, xs[0]), _out(step, xs[0]), _out(step, xs[0])


def _log_windows_vmap(op: Callable[..., Any]) -> Callable[..., Any]:
    def rule(info: Any, in_dims: tuple[Any, ...], key: str, inplace: bool, xs: list[Tensor]) -> Any:
        folded, ys = _folded(key, info, in_dims[2], xs)
        return op(folded, inplace, ys), (0, 0, 0)

    return rule


# ---------------------------------------------------------- max-plus kernels
def _indexed(found: tuple[Tensor, Tensor | None], argmax: bool) -> tuple[Tensor, Tensor]:
    """A max-plus kernel's result as its operator returns it (no index unless asked)."""
    values, index = found
    return values, index if argmax and index is not None else _no_index(values)


def _max_windows(step: Step, argmax: bool, xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    if K.small_step(step):
        return _indexed(K.max_small(step, xs, argmax), argmax)
    return _indexed(K.max_windows(step, xs, argmax), argmax)


def _max_rows(step: Step, argmax: bool, xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The row kernel; where it does not apply (a NaN value), the NaN-aware kernels."""
    if K.small_step(step):
        return _indexed(K.max_small(step, xs, argmax), argmax)
    found = K.max_rows(step, xs, argmax)
    if found is None:
        if argmax and math.prod(K.out_shape(step)) >= K.SLICES_MIN_OUTPUT:
            found = K.max_slices(step, xs, argmax)
        else:
            found = K.max_windows(step, xs, argmax)
    return _indexed(found, argmax)


def _max_slices(step: Step, argmax: bool, xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    return _indexed(K.max_slices(step, xs, argmax), argmax)


def _max_slices_traced(step: Step, argmax: bool, xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    return _indexed(K.max_slices(step, xs, argmax, traced=True), argmax)


def _max_tropical(
    step: Step, argmax: bool, xs: list[Tensor], index_view: bool = False
) -> tuple[Tensor, Tensor]:
    """The native kernel (:mod:`._native`); the windows where it cannot run this call."""
    found = NATIVE.max_plus(step, xs, argmax, index_view)
    return _indexed(found if found is not None else K.max_windows(step, xs, argmax), argmax)


def _max_tropical_eager(step: Step, argmax: bool, xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`_max_tropical` for a plain eager call: its argmax may be a permuted view
    (its readers walk it as it is; no copy into the output's order first)."""
    return _max_tropical(step, argmax, xs, index_view=True)


def _max_tropical_vjp(
    step: Step, a: Tensor, b: Tensor, index: Tensor, g: Tensor, need_a: bool, need_b: bool
) -> tuple[Tensor, Tensor]:
    """First-order gradients of a ``tropical`` step (a not-needed one is an empty tensor)."""
    grads = NATIVE.max_plus_vjp(step, [a, b], index, g, [need_a, need_b])
    ga, gb = (gk if gk is not None else x.new_empty((0,)) for gk, x in zip(grads, (a, b)))
    return ga, gb


def _max_tropical_vjp_fake(
    key: str, a: Tensor, b: Tensor, index: Tensor, g: Tensor, need_a: bool, need_b: bool
) -> tuple[Tensor, Tensor]:
    return a.new_empty(a.shape if need_a else (0,)), b.new_empty(b.shape if need_b else (0,))


def _max_fake(key: str, argmax: bool, xs: list[Tensor]) -> tuple[Tensor, Tensor]:
    step = decode(key).step
    values = _out(step, xs[0])
    return values, _out(step, xs[0], torch.int64) if argmax else _no_index(xs[0])


def _max_vmap(op: Callable[..., Any]) -> Callable[..., Any]:
    def rule(info: Any, in_dims: tuple[Any, ...], key: str, argmax: bool, xs: list[Tensor]) -> Any:
        folded, ys = _folded(key, info, in_dims[2], xs)
        return op(folded, argmax, ys), (0, 0 if argmax else None)

    return rule


# ------------------------------------------------------------- registration
_MAX_SCHEMA = "(str step, bool argmax, Tensor[] xs) -> (Tensor, Tensor)"

REAL_BLAS = Operator(
    "real_blas",
    "(str step, Tensor[] xs) -> Tensor",
    _real_blas,
    _real_blas_fake,
    opaque=False,
    vmap=_one_output_vmap,
)
LOG_BLAS = Operator(
    "log_blas",
    "(str step, Tensor a, Tensor b) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _log_blas,
    _log_blas_fake,
    opaque=True,
    vmap=_log_blas_vmap,
    eager=_log_blas_eager,
)
LOG_BLAS_VJP = Operator(
    "log_blas_vjp",
    "(str step, str neg_inf, Tensor a, Tensor b, Tensor out, Tensor res_a, Tensor res_b, "
    "Tensor sumexp, Tensor certified, Tensor g, bool need_a, bool need_b) -> (Tensor, Tensor)",
    _log_blas_vjp,
    _log_blas_vjp_fake,
    opaque=True,
)
LOG_ROWS = Operator(
    "log_rows",
    "(str step, Tensor[] xs) -> Tensor",
    _log_rows,
    _real_blas_fake,  # one output-shaped tensor
    opaque=True,
    vmap=_one_output_vmap,
)
LOG_WINDOWS = Operator(
    "log_windows",
    "(str step, bool inplace, Tensor[] xs) -> (Tensor, Tensor, Tensor)",
    _log_windows,
    _log_windows_fake,
    opaque=False,
    vmap=_log_windows_vmap,
)
MAX_WINDOWS = Operator(
    "max_windows",
    _MAX_SCHEMA,
    _max_windows,
    _max_fake,
    opaque=False,
    vmap=_max_vmap,
)
MAX_ROWS = Operator(
    "max_rows",
    _MAX_SCHEMA,
    _max_rows,
    _max_fake,
    opaque=True,
    vmap=_max_vmap,
)
MAX_SLICES = Operator(
    "max_slices",
    _MAX_SCHEMA,
    _max_slices,
    _max_fake,
    opaque=True,
    vmap=_max_vmap,
    traced=_max_slices_traced,
)
MAX_TROPICAL = Operator(
    "max_tropical",
    _MAX_SCHEMA,
    _max_tropical,
    _max_fake,
    opaque=True,
    vmap=_max_vmap,
    eager=_max_tropical_eager,
)
MAX_TROPICAL_VJP = Operator(
    "max_tropical_vjp",
    "(str step, Tensor a, Tensor b, Tensor index, Tensor g, bool need_a, bool need_b) "
    "-> (Tensor, Tensor)",
    _max_tropical_vjp,
    _max_tropical_vjp_fake,
    opaque=True,
)

OPERATORS = (
    REAL_BLAS,
    LOG_BLAS,
    LOG_BLAS_VJP,
    LOG_ROWS,
    LOG_WINDOWS,
    MAX_WINDOWS,
    MAX_ROWS,
    MAX_SLICES,
    MAX_TROPICAL,
    MAX_TROPICAL_VJP,
)
"""Every registered operator."""
