"""Derivative rules, one set per semiring family, as pure functions.

Each family is a :class:`Rule`: ``forward(spec, *xs) -> outputs`` (a tuple),
``vjp(spec, xs, outs, cotangents, needs) -> gradients`` and
``jvp(spec, xs, outs, tangents) -> output tangents``, in the spirit of JAX's
``custom_vjp``/``custom_jvp``.  ``vjp`` and ``jvp`` use only out-of-place,
differentiable torch operations, so second derivatives come from autograd
differentiating them.  :mod:`._autograd` registers each rule once as a family
of ``torch.autograd.Function`` classes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from opt_einsum import get_symbol

from . import _kernels as K
from . import _logblas as LB
from ._budget import Budget
from ._plan import Step, window_extents
from ._semiring import REAL, Semiring

Tensor = torch.Tensor
NegInf = float | str  # a float, 'nan' or 'uniform'


@dataclass(frozen=True, slots=True)
class Spec:
    """Everything a rule needs besides tensors; hashable, so Dynamo can guard on it.

    Attributes:
        step: The step being computed.
        budget: The resolved block size (backward steps are windowed with it).
        itemsize: Bytes per element of the accumulation dtype.
        device_type: Device type of the operands.
        neg_inf: Log semiring: softmax weight of each term of an all -inf
            cell in backward/forward mode: ``'nan'``, ``'uniform'`` or a float.
        extras: Log semiring: also return the per-cell max and scaled sum.
        semiring: User semirings: the :class:`Semiring` itself, so that an
            autograd graph or a ``vjp`` closure keeps it alive.
    """

    step: Step
    budget: Budget
    itemsize: int
    device_type: str
    neg_inf: NegInf = "nan"
    extras: bool = False
    semiring: Semiring | None = None  # user semirings only
    values_only: bool = False  # max-plus: no gradient can be asked for, skip the argmax
    # Log semiring: the BLAS program of the step, when it has one (derived).
    blas: LB.Program | None = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        prog = None if self.extras else LB.program(self.step, self.budget.bytes, self.itemsize)
        object.__setattr__(self, "blas", prog)


@dataclass(frozen=True)
class Rule:
    """A forward with its vjp and jvp; ``differentiable`` outputs come first."""

    name: str
    forward: Callable[..., tuple[Tensor, ...]]
    vjp: Callable[..., Sequence[Tensor | None]]
    jvp: Callable[..., tuple[Tensor | None, ...]] | None
    differentiable: int = 1
    batched: bool = True  # whether ``fold_batch`` applies (the spec is a Spec)


def fold_batch(
    batch_size: int, in_dims: Sequence[int | None], spec: Spec, xs: Sequence[Tensor]
) -> tuple[Spec, list[Tensor]]:
    """The vmap rule: make the vmapped dimension a fresh output index.

    A vmapped call then runs as one blocked contraction whose windows are
    sized with the batch dimension in view, instead of per-example
    contractions.  Batched operands get the new index first; the others
    broadcast along it (no copy).  Every output has the batch at dim 0.
    """
    step = spec.step
    used = set("".join(step.inputs))
    letter = next(get_symbol(i) for i in range(len(used) + 1) if get_symbol(i) not in used)
    inputs, ys = [], []
    for term, x, d in zip(step.inputs, xs, in_dims):
        if d is None:
            inputs.append(term)
            ys.append(x)
        else:
            inputs.append(letter + term)
            ys.append(x.movedim(d, 0))
    output = letter + step.output
    sizes = ((letter, batch_size),) + step.sizes
    windows = window_extents(
        tuple(inputs), output, sizes, spec.budget, spec.itemsize, spec.device_type
    )
    folded = Step(step.operands, tuple(inputs), output, sizes, windows)
    return replace(spec, step=folded), ys


# ----------------------------------------------------------------------- log
def _blas_log(spec: Spec, *tensors: Tensor) -> bool:
    """Whether this log step runs on BLAS (see :mod:`._logblas`)."""
    return spec.blas is not None and LB.can_branch(*tensors)


def _blas_log_derivative(spec: Spec, xs: Sequence[Tensor], *others: Tensor) -> bool:
    """Whether this log step's vjp/jvp runs on BLAS (operands free of +inf/NaN too)."""
    return _blas_log(spec, *xs, *others) and LB.backward_applicable(xs[0], xs[1])


def _differentiated() -> bool:
    """Whether a backward running now may itself be differentiated.

    True under ``create_graph`` (grad mode stays on in backward), an open
    forward-AD level, or any torch.func transform; a backward that uses
    constant residuals instead of differentiable recomputation must not run then.
    """
    return (
        torch.is_grad_enabled()
        or torch.autograd.forward_ad._current_level >= 0
        or bool(torch._C._functorch.get_interpreter_stack())
    )


def _log_forward(spec: Spec, *xs: Tensor) -> tuple[Tensor, ...]:
    if not spec.step.windows and not spec.extras:  # one term per cell: log(exp(t)) = t
        return (K.add_only(spec.step, xs),)
    if spec.blas is not None and _blas_log(spec, *xs):
        fast = LB.forward(spec.blas, xs[0], xs[1])
        if fast is not None:
            return fast  # the output, then maybe residuals (non-differentiable)
    if not spec.extras and not K.tracing():
        rows = K.log_forward_rows(spec.step, xs)
        if rows is not None:
            return (rows,)
    out, m, s = K.log_forward(spec.step, xs)
    if spec.extras:
        return out, m, s
    return (out,)


def _log_weights(spec: Spec, out: Tensor) -> Callable[[list[Tensor], K.Range], Tensor]:
    """d out / d term = exp(term - out), with the ``grad_of_neg_inf`` policy.

    A cell whose terms are all -inf has out = -inf and every exp(term - out)
    = exp(-inf + inf) = NaN.  Unless the policy is NaN, those weights are
    replaced by the policy's weight; the subtraction uses a finite stand-in
    for such cells so that no NaN is created (and none leaks into second
    derivatives through ``torch.where``).
    """
    policy = spec.neg_inf
    if policy == "nan":
        out_b = out
        return lambda views, rng: torch.exp(sum(views[1:], views[0]) - out_b)
    dead = torch.isneginf(out)
    if policy == "uniform":
        weight = 1.0 / spec.step.terms if spec.step.terms else 0.0
    else:
        weight = float(policy)
    out_b = torch.where(dead, 0.0, out)
    dead_b = dead

    def weights(views: list[Tensor], rng: K.Range) -> Tensor:
        e = torch.exp(sum(views[1:], views[0]) - out_b)
        return torch.where(dead_b, weight, e)

    return weights


def _log_vjp(
    spec: Spec,
    xs: Sequence[Tensor],
    outs: Sequence[Tensor],
    gs: Sequence[Tensor],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    if len(outs) == 4 and spec.blas is not None and not _differentiated() and LB.can_branch(gs[0]):
        return LB.vjp_from_residuals(
            spec.blas, xs[0], xs[1], outs[1], outs[2], outs[3], gs[0], needs
        )
    weights = _log_weights(spec, outs[0])
    if not _blas_log_derivative(spec, xs, gs[0]):
        g = gs[0]
        return K.pullback(spec.step, xs, needs, lambda v, r: weights(v, r) * g)
    grad_a, grad_b, unsafe = LB.vjp(spec.step, xs[0], xs[1], outs[0], gs[0])
    grads: list[Tensor | None] = [grad_a, grad_b]
    if unsafe is not None:  # the cells at risk, exactly, through the blocked path
        g = torch.where(unsafe, gs[0], 0.0)
        exact = K.pullback(spec.step, xs, needs, lambda v, r: weights(v, r) * g)
        grads = [f if e is None or f is None else f + e for f, e in zip(grads, exact, strict=True)]
    return [gk if need else None for gk, need in zip(grads, needs, strict=True)]


def _log_jvp(
    spec: Spec, xs: Sequence[Tensor], outs: Sequence[Tensor], ts: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    if _blas_log_derivative(spec, xs, *ts):
        t, unsafe = LB.jvp(spec.step, xs[0], xs[1], outs[0], ts[0], ts[1])
        if unsafe is not None:
            exact = K.tangent_sum(spec.step, xs, ts, _log_weights(spec, outs[0]))
            t = torch.where(unsafe, exact, t)
        return (t,) + (None,) * (len(outs) - 1)
    t = K.tangent_sum(spec.step, xs, ts, _log_weights(spec, outs[0]))
    return (t,) + (None,) * (len(outs) - 1)  # extras or residuals: no tangent


LOG_RULE = Rule("LogEinsum", _log_forward, _log_vjp, _log_jvp)


# ----------------------------------------------------------------- max-plus
def _max_forward(spec: Spec, *xs: Tensor) -> tuple[Tensor, ...]:
    return K.max_forward(spec.step, xs, argmax=not spec.values_only)


def _argmax_mask(spec: Spec, linear: Tensor) -> Callable[[list[Tensor], K.Range], Tensor]:
    """Weight 1 on the single maximising term of each cell, 0 elsewhere."""
    lin_b = linear
    device = linear.device

    def mask(views: list[Tensor], rng: K.Range) -> Tensor:
        return K.window_linear_index(spec.step, rng, device) == lin_b

    return mask


def _max_vjp(
    spec: Spec,
    xs: Sequence[Tensor],
    outs: Sequence[Tensor],
    gs: Sequence[Tensor],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    mask = _argmax_mask(spec, outs[1])
    g_b = gs[0]
    zero = torch.zeros((), dtype=g_b.dtype, device=g_b.device)
    return K.pullback(spec.step, xs, needs, lambda v, r: torch.where(mask(v, r), g_b, zero))


def _max_jvp(
    spec: Spec, xs: Sequence[Tensor], outs: Sequence[Tensor], ts: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    mask = _argmax_mask(spec, outs[1])
    dtype = outs[0].dtype
    t = K.tangent_sum(spec.step, xs, ts, lambda v, r: mask(v, r).to(dtype))
    return t, None


MAX_RULE = Rule("MaxEinsum", _max_forward, _max_vjp, _max_jvp)


# --------------------------------------------------------------------- real
def _real_forward(spec: Spec, *xs: Tensor) -> tuple[Tensor, ...]:
    return (K.contract(REAL, spec.step, xs),)


def _operand_grad_step(spec: Spec, k: int) -> tuple[Step, str]:
    """The step that contracts the cotangent with every operand but ``k``."""
    step = spec.step
    term = step.inputs[k]
    others = step.inputs[:k] + step.inputs[k + 1 :]
    present = set(step.output).union(*others)
    out = "".join(c for c in term if c in present)
    inputs = (step.output,) + others
    size = step.size
    sizes = tuple((c, size[c]) for c in dict.fromkeys("".join(inputs)))
    windows = window_extents(inputs, out, sizes, spec.budget, spec.itemsize, spec.device_type)
    return Step(tuple(range(len(inputs))), inputs, out, sizes, windows), out


def _real_vjp(
    spec: Spec,
    xs: Sequence[Tensor],
    outs: Sequence[Tensor],
    gs: Sequence[Tensor],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    grads: list[Tensor | None] = []
    for k, x in enumerate(xs):
        if not needs[k]:
            grads.append(None)
            continue
        step, kept = _operand_grad_step(spec, k)
        # conj() is a no-op view for real dtypes; for complex it gives d/dz̄.
        others = [x.conj() for x in (*xs[:k], *xs[k + 1 :])]
        g = K.contract(REAL, step, [gs[0], *others])
        term = spec.step.inputs[k]
        if kept != term:  # indices only this operand has: the gradient is constant along them
            g = g.reshape([x.shape[i] if c in kept else 1 for i, c in enumerate(term)])
            g = g.expand(x.shape)
        grads.append(g)
    return grads


def _real_jvp(
    spec: Spec, xs: Sequence[Tensor], outs: Sequence[Tensor], ts: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    total: Tensor | None = None
    for k, t in enumerate(ts):
        part = K.contract(REAL, spec.step, [*xs[:k], t, *xs[k + 1 :]])
        total = part if total is None else total + part
    return (total,)


REAL_RULE = Rule("RealEinsum", _real_forward, _real_vjp, _real_jvp)


# ------------------------------------------------------------ user semirings
def _semiring(spec: Spec) -> Semiring:
    assert spec.semiring is not None, "a user-semiring step without its semiring"
    return spec.semiring


def _custom_forward(spec: Spec, *xs: Tensor) -> tuple[Tensor, ...]:
    return (K.contract(_semiring(spec), spec.step, xs),)


def _window_fn(semiring: Semiring, dims: tuple[int, ...]) -> Callable[..., Tensor]:
    """One window's ⊕-reduced ⊗-product, as a function of its operand slices."""
    return lambda *views: semiring.sum(functools.reduce(semiring.mul, views), dims)


def _custom_vjp(
    spec: Spec,
    xs: Sequence[Tensor],
    outs: Sequence[Tensor],
    gs: Sequence[Tensor],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """Reverse sweep over the windows with √n checkpoints, through ``torch.func.vjp``.

    The output is the fold ``A_i = add(A_{i-1}, part_i)`` over windows.  Its
    reverse sweep needs every ``A_{i-1}``; keeping them all would cost one
    output-sized tensor per window.  Instead the first pass keeps ``A`` only at
    the start of each segment of about √n windows; the reverse pass recomputes
    one segment at a time.  A window's own temporaries live only inside its
    ``torch.func.vjp`` call, so memory stays at one window plus O(√n)
    output-sized tensors, for twice the forward's compute.
    """
    semiring = _semiring(spec)
    step = spec.step
    aligned = K.align(step, xs)
    part = _window_fn(semiring, K.reduce_dims(step))
    ranges = list(step.ranges())
    acc = K.GradAccumulator(step, xs, needs)
    if not ranges:
        return acc.result()
    length = max(1, math.isqrt(len(ranges)))
    starts = list(range(0, len(ranges), length))
    checkpoints: list[Tensor | None] = []
    total: Tensor | None = None
    for i, rng in enumerate(ranges):
        if i % length == 0:
            checkpoints.append(total)
        p = part(*K.narrow(step, aligned, rng))
        total = p if total is None else semiring.add(total, p)
    assert total is not None
    # The forward expanded its result to the output shape; undo that here.
    g: Tensor | None = gs[0].sum_to_size(total.shape)
    for start, before in zip(reversed(starts), reversed(checkpoints)):
        segment = ranges[start : start + length]
        prefixes, parts = [], []
        a = before
        for rng in segment:
            p = part(*K.narrow(step, aligned, rng))
            prefixes.append(a)
            parts.append(p)
            a = p if a is None else semiring.add(a, p)
        for rng, prefix, p in zip(reversed(segment), reversed(prefixes), reversed(parts)):
            assert g is not None
            if prefix is None:
                g_part, g = g, None
            else:
                add_vjp = _vjp(semiring.add, prefix, p)[1]
                g, g_part = add_vjp(g)
            views = K.narrow(step, aligned, rng)
            part_vjp = _vjp(part, *views)[1]
            for k, gk in enumerate(part_vjp(g_part)):
                if needs[k]:
                    acc.add(k, rng, gk)
    return acc.result()


def _vjp(fn: Callable[..., Any], *primals: Tensor) -> tuple[Any, Callable[..., Any]]:
    """``torch.func.vjp`` without ``has_aux`` (its typing allows three outputs)."""
    out, vjp_fn = torch.func.vjp(fn, *primals)[:2]
    return out, vjp_fn


def _jvp_by_transposition(
    fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), J·tangents)`` from two reverse passes.

    A jvp rule cannot open a nested forward-mode level (PyTorch refuses nested
    forward AD), but the vjp ``u ↦ Jᵀu`` is linear in ``u``, and its own vjp
    applied to the tangents is ``J·tangents``.
    """
    out, vjp_fn = _vjp(fn, *primals)
    transpose = _vjp(lambda u: vjp_fn(u), torch.zeros_like(out))[1]
    (jt,) = transpose(tuple(tangents))
    return out, jt


def _custom_jvp(
    spec: Spec, xs: Sequence[Tensor], outs: Sequence[Tensor], ts: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    """Forward sweep: push tangents through each window and each ⊕."""
    semiring = _semiring(spec)
    step = spec.step
    part = _window_fn(semiring, K.reduce_dims(step))
    aligned, t_aligned = K.align(step, xs), K.align(step, ts)
    total: Tensor | None = None
    tangent: Tensor | None = None
    for rng in step.ranges():
        views = tuple(K.narrow(step, aligned, rng))
        t_views = tuple(K.narrow(step, t_aligned, rng))
        p, t_p = _jvp_by_transposition(part, views, t_views)
        if total is None or tangent is None:
            total, tangent = p, t_p
        else:
            total, tangent = _jvp_by_transposition(semiring.add, (total, p), (tangent, t_p))
    shape = outs[0].shape
    if tangent is None:
        return (outs[0].new_zeros(shape),)
    return (tangent.expand(shape) if tangent.shape != shape else tangent,)


CUSTOM_RULE = Rule("SemiringEinsum", _custom_forward, _custom_vjp, _custom_jvp)


def neg_inf_policy(grad_of_neg_inf: object, equation: object = None) -> NegInf:
    """Validate ``grad_of_neg_inf`` and turn it into a hashable policy."""
    where = "" if equation is None else f" (equation {equation!r})"
    if isinstance(grad_of_neg_inf, str):
        if grad_of_neg_inf in ("uniform", "nan"):
            return grad_of_neg_inf
        raise ValueError(
            f"grad_of_neg_inf must be a float or 'uniform', got {grad_of_neg_inf!r}{where}"
        )
    if isinstance(grad_of_neg_inf, bool) or not isinstance(grad_of_neg_inf, (int, float)):
        raise TypeError(
            f"grad_of_neg_inf must be a float or 'uniform', got "
            f"{type(grad_of_neg_inf).__name__}{where}"
        )
    value = float(grad_of_neg_inf)
    return "nan" if math.isnan(value) else value
