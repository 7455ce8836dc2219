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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from opt_einsum import get_symbol

from . import _kernels as K
from ._budget import Budget
from ._plan import Step, window_extents
from ._semiring import REAL

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
    """

    step: Step
    budget: Budget
    itemsize: int
    device_type: str
    neg_inf: NegInf = "nan"
    extras: bool = False


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


def _trail(t: Tensor, spec: Spec) -> Tensor:
    return t.reshape(t.shape + (1,) * len(spec.step.windows))


# ----------------------------------------------------------------------- log
def _log_forward(spec: Spec, *xs: Tensor) -> tuple[Tensor, ...]:
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
        out_b = _trail(out, spec)
        return lambda views, rng: torch.exp(sum(views[1:], views[0]) - out_b)
    dead = torch.isneginf(out)
    if policy == "uniform":
        weight = 1.0 / spec.step.terms if spec.step.terms else 0.0
    else:
        weight = float(policy)
    out_b = _trail(torch.where(dead, 0.0, out), spec)
    dead_b = _trail(dead, spec)

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
    weights = _log_weights(spec, outs[0])
    g_b = _trail(gs[0], spec)
    return K.pullback(spec.step, xs, needs, lambda v, r: weights(v, r) * g_b)


def _log_jvp(
    spec: Spec, xs: Sequence[Tensor], outs: Sequence[Tensor], ts: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    t = K.tangent_sum(spec.step, xs, ts, _log_weights(spec, outs[0]))
    return (t, None, None) if spec.extras else (t,)


LOG_RULE = Rule("LogEinsum", _log_forward, _log_vjp, _log_jvp)


# ----------------------------------------------------------------- max-plus
def _max_forward(spec: Spec, *xs: Tensor) -> tuple[Tensor, ...]:
    return K.max_forward(spec.step, xs)


def _argmax_mask(spec: Spec, linear: Tensor) -> Callable[[list[Tensor], K.Range], Tensor]:
    """Weight 1 on the single maximising term of each cell, 0 elsewhere."""
    lin_b = _trail(linear, spec)
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
    g_b = _trail(gs[0], spec)
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
