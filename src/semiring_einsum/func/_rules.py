"""Semiring families: which kernel runs each step, and the derivative rules, as pure functions.

A semiring maps to its :class:`Family` in one place, :func:`family_of`, by value: the
built-in semirings (and anything equal to one, a pickled copy say) to their own family,
any other :class:`~._semiring.Semiring` to the generic one.  A family has

* its :class:`~._plan.Kernel` values, in order of preference: ``kernel(step, dtype,
  device_type, traced, extras)`` chooses the step's, when the plan is made, and the plan
  names it;
* a :class:`Rule`: ``forward(spec, ctx, *xs) -> outputs`` (a tuple),
  ``vjp(spec, xs, outs, cotangents, needs) -> gradients`` and
  ``jvp(spec, xs, outs, tangents) -> output tangents``, in the spirit of JAX's
  ``custom_vjp``/``custom_jvp``;
* its own :class:`Spec` type, with the options only that family has.

``vjp`` and ``jvp`` are differentiable (out of place, built from torch operations and our
own differentiable functions) wherever their result may be differentiated again; where it
cannot be (a first-order backward) they may call the first-order operators.
:mod:`._autograd` registers each rule once as a family of ``torch.autograd.Function``
classes.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import _kernels as K
from . import _logblas as LB
from . import _native as N
from . import _ops as OPS
from ._budget import Budget
from ._context import Context, rule_context
from ._plan import EMPTY, Kernel, KernelChoice, Sized, Step, fold, window_extents
from ._semiring import LOG, MAX_PLUS, MIN_PLUS, REAL, Identity, Semiring

Tensor = torch.Tensor
NegInf = K.NegInf


# --------------------------------------------------------------------- specs
@dataclass(frozen=True, slots=True)
class Spec:
    """A step and what its rule needs besides tensors; hashable.

    Attributes:
        step: The step being computed (its kernel included).
        budget: The resolved block size (backward steps are windowed with it).
        itemsize: Bytes per element of the accumulation dtype.
        device_type: Device type of the operands.
        key: The step as an operator argument (derived, see :meth:`Step.key`).
    """

    step: Step
    budget: Budget
    itemsize: int
    device_type: str
    key: str = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self.step.key(self.budget, self.itemsize, self.device_type))

    def batched(self, step: Step) -> Spec:
        """This spec for ``step``, the batch of a vmap folded into it."""
        return replace(self, step=step)


@dataclass(frozen=True, slots=True)
class LogSpec(Spec):
    """The log semiring's options.

    Attributes:
        neg_inf: Softmax weight of each term of an all -inf cell in the derivatives, a
            :class:`._kernels.NegInf`: NaN, uniform, a user's weight (0: the cell's
            cotangent is not used), or :data:`._kernels.THROUGH` (an intermediate step's:
            weight 0 times the cotangent).
        extras: Also return the per-cell max and scaled sum.
        residuals: A BLAS step returns its residuals for a first-order backward.
    """

    neg_inf: NegInf = K.NAN
    extras: bool = False
    residuals: bool = True

    def batched(self, step: Step) -> Spec:
        # A backward under vmap is differentiable recomputation: no residuals.
        return replace(self, step=step, residuals=False)


@dataclass(frozen=True, slots=True)
class MaxSpec(Spec):
    """Max-plus: whether the argmax (the backward's residual, Viterbi's answer) is computed."""

    argmax: bool = True


@dataclass(frozen=True, slots=True)
class RankedSpec(MaxSpec):
    """A max-plus step of a multi-step plan whose ties follow the global row-major rule.

    ``ranked[k]``: whether operand ``k`` comes with its partial rank (the rank tensors
    follow the operands, in operand order); ``strides``: the global row-major stride of
    each of the step's summed indices (see :func:`._kernels.max_ranked`).
    """

    ranked: tuple[bool, ...] = ()
    strides: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class CustomSpec(Spec):
    """A user semiring: the :class:`Semiring` itself, so that what keeps the spec keeps it."""

    semiring: Semiring | None = None


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
    sized = Sized(spec.step, spec.budget, spec.itemsize, spec.device_type)
    folded = fold(sized, batch_size, [d is not None for d in in_dims])
    ys = [x if d is None else x.movedim(d, 0) for x, d in zip(xs, in_dims)]
    return spec.batched(folded), ys


# ---------------------------------------------------------------- empty steps
def _zero(spec: Spec) -> Identity:
    if isinstance(spec, CustomSpec):
        return _semiring(spec).zero
    if isinstance(spec, (LogSpec, MaxSpec)):
        return -math.inf
    return 0.0


def empty_outputs(spec: Spec, xs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The outputs of a step that sums an index of size 0, in every family.

    Every cell is an empty sum: the semiring's zero (min-plus runs as
    max-plus on negated operands, so -inf becomes +inf).  Max-plus adds its
    argmax (zeros), the log semiring's extras a max of -inf and a sum of 0.
    Their derivatives are zero (see :mod:`._autograd`).  This is the one
    place that handles the case; the plan names it (kernel ``empty``).
    """
    out = K.empty(spec.step, xs, _zero(spec))
    if isinstance(spec, MaxSpec):
        return out, K.no_argmax(spec.step, out.device)
    if isinstance(spec, LogSpec) and spec.extras:
        return out, out.clone(), torch.zeros_like(out)
    return (out,)


def is_empty(spec: object) -> bool:
    """Whether ``spec`` is a step that sums an index of size 0."""
    return isinstance(spec, Spec) and spec.step.kernel is EMPTY


def run_forward(rule: Rule, spec: Any, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    """A rule's forward, or the empty step's outputs."""
    if is_empty(spec):
        return empty_outputs(spec, xs)
    return rule.forward(spec, ctx, *xs)


def run_vjp(
    rule: Rule,
    spec: Any,
    xs: Sequence[Tensor],
    outs: Sequence[Tensor],
    gs: Sequence[Tensor],
    needs: Sequence[bool],
) -> Sequence[Tensor | None]:
    """A rule's vjp (the step's kernel's own, where it has one); an empty step's outputs
    depend on no operand: zero gradients."""
    if is_empty(spec):
        return [torch.zeros_like(x) if need else None for x, need in zip(xs, needs)]
    own = spec.step.kernel.vjp if isinstance(spec, Spec) else None
    return (own or rule.vjp)(spec, xs, outs, gs, needs)


def run_jvp(
    rule: Rule, spec: Any, xs: Sequence[Tensor], outs: Sequence[Tensor], ts: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    """A rule's jvp (the step's kernel's own, where it has one); an empty step's outputs
    depend on no operand: a zero tangent."""
    if is_empty(spec):
        return (torch.zeros_like(outs[0]),) + (None,) * (len(outs) - 1)
    own = spec.step.kernel.jvp if isinstance(spec, Spec) else None
    jvp = own or rule.jvp
    assert jvp is not None
    return jvp(spec, xs, outs, ts)


def _rule_ctx(*tensors: Tensor | None) -> Context:
    return rule_context([t for t in tensors if t is not None])


# ----------------------------------------------------------------------- log
def _log_unsummed(spec: LogSpec, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    return (K.add_only(spec.step, xs),)


def _log_blas(spec: LogSpec, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    outs = OPS.LOG_BLAS(ctx, spec, xs[0], xs[1])
    if not spec.residuals or not (ctx.traced or ctx.transformed):
        return outs[:1]  # (untransformed eager: the caller keeps the output alone)
    if isinstance(outs[4], int):  # a plain eager call: the residual must be a tensor
        return (*outs[:4], torch.tensor(outs[4], device=outs[0].device))
    return outs


def _log_rows(spec: LogSpec, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    return (OPS.LOG_ROWS(ctx, spec, list(xs)),)


def _log_windows(spec: LogSpec, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    out, m, s = OPS.LOG_WINDOWS(ctx, spec, not ctx.traced, list(xs))
    return (out, m, s) if spec.extras else (out,)


LOG_UNSUMMED = Kernel(
    "log",
    "unsummed",
    "no summed index: one term per cell, log(exp(t)) = t, the operands' sum",
    windowed=False,
    applies=lambda step, c: not step.windows and not c.extras,
    forward=_log_unsummed,
)
LOG_BLAS = Kernel(
    "log",
    "log_blas",
    "max-shifted exponentials around BLAS, certified, exact fix-up",
    applies=lambda step, c: not c.extras and LB.applicable(step),
    forward=_log_blas,
    operator=OPS.LOG_BLAS,
    vjp_operator=OPS.LOG_BLAS_VJP,
)
LOG_ROWS = Kernel(
    "log",
    "rows",
    "every summed index innermost, in chunks of whole rows",
    applies=lambda step, c: not c.extras and K.rows_apply(step, c.dtype) is not None,
    forward=_log_rows,
    operator=OPS.LOG_ROWS,
)
LOG_SMALL = Kernel(
    "log",
    "small",
    "values only, at most JOINT_TERMS joint terms in one step of three or more operands: "
    "one torch.logsumexp over the joint terms, laid out row-major; chosen by the plan of "
    "a call nothing differentiates, not by applies",
    forward=lambda spec, ctx, *xs: (K.log_small(spec.step, list(xs)),),
)
LOG_WINDOWS = Kernel(
    "log",
    "windows",
    "the blocked loop over windows of the summed indices (an online log-sum-exp; the "
    "only log kernel that returns the per-cell max and sum)",
    forward=_log_windows,
    operator=OPS.LOG_WINDOWS,
)


def _log_forward(spec: LogSpec, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    return spec.step.kernel.forward(spec, ctx, *xs)


def _log_vjp(
    spec: LogSpec,
    xs: Sequence[Tensor],
    outs: Sequence[Tensor],
    gs: Sequence[Tensor],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    ctx = _rule_ctx(*xs, gs[0])
    if len(outs) == 5 and not ctx.differentiated and not ctx.batched:
        # A first-order backward of a BLAS step: from the forward's residuals.
        policy = spec.neg_inf.key
        ga, gb = OPS.LOG_BLAS_VJP(ctx, spec, policy, xs[0], xs[1], *outs, gs[0], *needs)
        return [ga if needs[0] else None, gb if needs[1] else None]
    return LB.vjp_exact(spec.step, spec.neg_inf, xs, outs[0], gs[0], needs, ctx.plain)


def _log_jvp(
    spec: LogSpec, xs: Sequence[Tensor], outs: Sequence[Tensor], ts: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    ctx = _rule_ctx(*xs, *ts)
    t = LB.jvp_exact(spec.step, spec.neg_inf, xs, outs[0], ts, ctx.plain)
    return (t,) + (None,) * (len(outs) - 1)  # extras or residuals: no tangent


LOG_RULE = Rule("LogEinsum", _log_forward, _log_vjp, _log_jvp)


# ----------------------------------------------------------------- max-plus
def _window_count(step: Step) -> int:
    size = step.size
    return math.prod(-(-size[c] // w) for c, w in step.windows)


def _tropical_applies(step: Step, c: KernelChoice) -> bool:
    return (
        c.device_type == "cpu"
        and c.dtype in N.DTYPES
        and step.terms <= N.ARGMAX_MAX[c.dtype]
        and N.layout(step) is not None
        and N.expected()  # (not N.library(): planning builds nothing)
    )  # also while tracing: faster than what inductor makes of ours


def _max_rows_apply(step: Step, c: KernelChoice) -> bool:
    if K.rows_apply(step, c.dtype, argmax=True) is None:
        return False
    # While tracing, the value-free kernels, which the compiler fuses into one loop --
    # unless the step has few cells and several windows: the fused windows then lose
    # to the row kernel (measured on a joint CKY step, 768 cells in 4 windows: 4.3 ms
    # fused vs 1.8 ms for the rows; on a batched matmul, 131k cells: 1.3 ms fused vs
    # 7.3 ms).
    return not c.traced or (
        math.prod(K.out_shape(step)) < K.SLICES_MIN_OUTPUT and _window_count(step) > 1
    )


def _tropical_vjp(
    spec: MaxSpec,
    xs: Sequence[Tensor],
    outs: Sequence[Tensor],
    gs: Sequence[Tensor],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    if N.library() is not None:  # (else its forward ran the torch kernels: see N.expected)
        ctx = _rule_ctx(*xs, gs[0])
        if not ctx.differentiated and not ctx.batched:
            # A first-order backward: one native pass over the cells.
            ga, gb = OPS.MAX_TROPICAL_VJP(ctx, spec, xs[0], xs[1], outs[1], gs[0], *needs)
            return [ga if needs[0] else None, gb if needs[1] else None]
    return K.argmax_pullback(spec.step, xs, outs[1], gs[0], needs)


MAX_UNSUMMED = Kernel(
    "max_plus",
    "unsummed",
    "no summed index: the operands' sum",
    windowed=False,
    applies=lambda step, c: not step.windows,
)
MAX_TROPICAL = Kernel(
    "max_plus",
    "tropical",
    "two CPU operands in a matrix-product shape: the native C kernel (values, first "
    "argmax), see semiring_einsum.func.native_status()",
    windowed=False,
    applies=_tropical_applies,
    vjp=_tropical_vjp,
    operator=OPS.MAX_TROPICAL,
    vjp_operator=OPS.MAX_TROPICAL_VJP,
)
MAX_ROWS = Kernel(
    "max_plus",
    "rows",
    "every summed index innermost, in chunks of whole rows",
    applies=_max_rows_apply,
    operator=OPS.MAX_ROWS,
)
MAX_SLICES = Kernel(
    "max_plus",
    "slices",
    "with an argmax: one output-sized slice per summed coordinate (few terms, big "
    "outputs); values only take the windows",
    applies=lambda step, c: math.prod(K.out_shape(step)) >= K.SLICES_MIN_OUTPUT,
    operator=OPS.MAX_SLICES,
)
MAX_WINDOWS = Kernel(
    "max_plus",
    "windows",
    "the blocked loop over windows of the summed indices",
    operator=OPS.MAX_WINDOWS,
)


MAX_RANKED = Kernel(
    "max_plus",
    "ranked",
    "a step of a pairwise plan whose argmax follows the joint tie rule: values compared, "
    "then partial row-major ranks (the native kernel for two CPU operands in a "
    "matrix-product shape, else torch); chosen by the plan of an argmax, not by applies",
)


def _max_forward(spec: MaxSpec, ctx: Context, *xs: Tensor) -> tuple[Any, ...]:
    step = spec.step
    operator = step.kernel.operator
    if operator is None:  # unsummed
        values, index = K.add_only(step, xs), None
    else:
        values, index = operator(ctx, spec, spec.argmax, list(xs))
    if not (ctx.traced or ctx.transformed):
        # Untransformed eager: no Function sees the outputs; the caller reads the
        # index only where it asked for one (and never of an unsummed step).
        return values, index
    if index is None or not spec.argmax:
        index = K.no_argmax(step, values.device)  # output-shaped, for the vmap rules
    return values, index


def max_values(spec: MaxSpec, ctx: Context, xs: list[Tensor]) -> Tensor:
    """A max-plus step's values where nothing traces, transforms or records: what the
    rule's forward computes, without its layers (the per-call cost of small steps)."""
    step = spec.step
    kernel = step.kernel
    if kernel is MAX_TROPICAL and not OPS.MAX_TROPICAL.devices:
        found = N.max_plus(step, xs, False)
        if found is not None:
            return found[0]
    elif kernel is MAX_UNSUMMED:
        return K.add_only(step, xs)
    return run_forward(MAX_RULE, spec, ctx, *xs)[0]


def _max_vjp(
    spec: MaxSpec,
    xs: Sequence[Tensor],
    outs: Sequence[Tensor],
    gs: Sequence[Tensor],
    needs: Sequence[bool],
) -> Sequence[Tensor | None]:
    # (A kernel with its own vjp -- the native one -- runs it instead: see run_vjp.)
    return K.argmax_pullback(spec.step, xs, outs[1], gs[0], needs)


def _max_jvp(
    spec: MaxSpec, xs: Sequence[Tensor], outs: Sequence[Tensor], ts: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    return K.argmax_tangent(spec.step, xs, outs[1], ts), None


MAX_RULE = Rule("MaxEinsum", _max_forward, _max_vjp, _max_jvp)


# ------------------------------------------------ max-plus with global ties
def _ranked_forward(spec: RankedSpec, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    n = len(spec.step.inputs)
    extra = iter(xs[n:])
    ranks = [next(extra) if has else None for has in spec.ranked]
    if n == 2:
        found = N.max_plus_ranked(spec.step, xs[:n], ranks, spec.strides)
        if found is not None:
            return found
    return K.max_ranked(spec.step, xs[:n], ranks, spec.strides, spec.itemsize)


def _ranked_vjp(
    spec: RankedSpec,
    xs: Sequence[Tensor],
    outs: Sequence[Tensor],
    gs: Sequence[Tensor],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    n = len(spec.step.inputs)
    step = spec.step
    grads: Sequence[Tensor | None] | None = None
    if n == 2 and xs[0].dtype in N.DTYPES and N.layout(step) and N.library():
        ctx = _rule_ctx(*xs[:n], gs[0])
        if not ctx.differentiated and not ctx.batched and ctx.device_type == "cpu":
            # A first-order backward: one native pass over the cells (the ranked
            # kernel's argmax has the tropical kernel's layout).
            ga, gb = OPS.MAX_TROPICAL_VJP(ctx, spec, xs[0], xs[1], outs[1], gs[0], *needs[:n])
            grads = [ga if needs[0] else None, gb if needs[1] else None]
    if grads is None:
        grads = K.argmax_pullback(step, xs[:n], outs[1], gs[0], needs[:n])
    return [*grads, *([None] * (len(xs) - n))]  # the ranks have no gradient


def _ranked_jvp(
    spec: RankedSpec, xs: Sequence[Tensor], outs: Sequence[Tensor], ts: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    n = len(spec.step.inputs)
    return K.argmax_tangent(spec.step, xs[:n], outs[1], ts[:n]), None, None


RANKED_RULE = Rule("RankedMaxEinsum", _ranked_forward, _ranked_vjp, _ranked_jvp, batched=False)
"""Max-plus steps that carry partial ranks: values, the step's argmax, the winner's rank
(pure torch without value branches: ``vmap`` runs the forward itself)."""


# --------------------------------------------------------------------- real
def _real_product(step: Step, xs: Sequence[Tensor]) -> Tensor:
    """The real contraction of a step, differentiably (BLAS for at most two operands)."""
    if len(xs) <= 2:
        return K.einsum_letters(step.inputs, step.output, *xs)
    return K.contract(REAL, step, xs)


def _real_blas(spec: Spec, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    return (OPS.REAL_BLAS(ctx, spec, list(xs)),)


def _real_windows(spec: Spec, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    return (K.contract(REAL, spec.step, xs),)


REAL_BLAS = Kernel(
    "real",
    "blas",
    "at most two operands: torch.einsum / matmul (BLAS)",
    windowed=False,
    applies=lambda step, c: len(step.inputs) <= 2,
    forward=_real_blas,
    operator=OPS.REAL_BLAS,
)
REAL_WINDOWS = Kernel(
    "real",
    "windows",
    "the blocked loop over windows of the summed indices",
    forward=_real_windows,
)


def _real_forward(spec: Spec, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    return spec.step.kernel.forward(spec, ctx, *xs)


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
        g = _real_product(step, [gs[0], *others])
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
        part = _real_product(spec.step, [*xs[:k], t, *xs[k + 1 :]])
        total = part if total is None else total + part
    return (total,)


REAL_RULE = Rule("RealEinsum", _real_forward, _real_vjp, _real_jvp)


# ------------------------------------------------------------ user semirings
def _semiring(spec: CustomSpec) -> Semiring:
    assert spec.semiring is not None, "a user-semiring step without its semiring"
    return spec.semiring


def _custom_forward(spec: CustomSpec, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    return (K.contract(_semiring(spec), spec.step, xs),)


def _window_fn(semiring: Semiring, dims: tuple[int, ...]) -> Callable[..., Tensor]:
    """One window's ⊕-reduced ⊗-product, as a function of its operand slices."""
    return lambda *views: semiring.sum(functools.reduce(semiring.mul, views), dims)


def _custom_vjp(
    spec: CustomSpec,
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
    spec: CustomSpec, xs: Sequence[Tensor], outs: Sequence[Tensor], ts: Sequence[Tensor]
) -> tuple[Tensor | None, ...]:
    """Forward sweep: push tangents through each window and each ⊕."""
    semiring = _semiring(spec)
    step = spec.step
    part = _window_fn(semiring, K.reduce_dims(step))
    aligned, t_aligned = K.align(step, xs), K.align(step, ts)
    total: Tensor | None = None
    tangent: Tensor | None = None
    for (_, views), (_, t_views) in zip(K.windows(step, aligned), K.windows(step, t_aligned)):
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

GENERIC_WINDOWS = Kernel(
    "generic",
    "windows",
    "the blocked loop over windows of the summed indices (any semiring)",
    forward=_custom_forward,
)


# ------------------------------------------------------------------ families
class Combine(enum.Enum):
    """How a family's ⊕ combines the partial results of ranks that each summed a share of
    an index (:mod:`._distributed`)."""

    SUM = "an all-reduce SUM"
    LOG_SUM_EXP = "an all-reduce MAX, then a SUM of the rescaled exponentials"
    MAX = "an all-reduce MAX of an order-preserving integer image (ties: the first rank)"
    GATHER = "an all-gather, then the semiring's own sum"


@dataclass(frozen=True)
class Family:
    """How one kind of semiring runs: its kernels, its rule and its spec type.

    Attributes:
        name: The family's name.
        rule: The forward, vjp and jvp of its steps (each dispatches on the step's
            kernel where the kernels differ).
        kernels: Its kernels, in order of preference: a step runs the first that
            applies (:attr:`~._plan.Kernel.applies`; the last applies always).
        spec: The type of its steps' :class:`Spec`.
        selects: Whether its ⊕ selects one of its terms (max, min): the family has an
            argmax, so Viterbi and k-best apply.
        negate: Whether it runs as ``-f(-x)`` on its kernels (min-plus on the max-plus
            kernels: ties, NaN and gradients follow max-plus's rule).
        extra_rules: Other rules its routes run (max-plus: the ranked steps of Viterbi);
            :mod:`._autograd` builds the Functions of every family's rules at import.
        combine: How its ⊕ combines ranks' partial results (DTensor operands); a
            negating family combines the negated partials.
        assigned: Kernels a plan assigns for a route of the call, not chosen by
            ``applies`` (``log.small`` for values alone, ``max_plus.ranked`` for an
            argmax whose ties need ranks; see :func:`._prepare.call_setup`).
    """

    name: str
    rule: Rule
    kernels: tuple[Kernel, ...]
    spec: type[Spec]
    selects: bool = False
    negate: bool = False
    extra_rules: tuple[Rule, ...] = ()
    assigned: tuple[Kernel, ...] = ()
    combine: Combine = Combine.GATHER

    def kernel(
        self, step: Step, dtype: torch.dtype, device_type: str, traced: bool, extras: bool
    ) -> Kernel:
        """The kernel of ``step``: the first of :attr:`kernels` that applies."""
        choice = KernelChoice(dtype, device_type, traced, extras)
        for kernel in self.kernels:
            if kernel.applies is None or kernel.applies(step, choice):
                return kernel
        raise AssertionError(f"no kernel of the {self.name} family applies to {step}")


_LOG_KERNELS = (LOG_UNSUMMED, EMPTY, LOG_BLAS, LOG_ROWS, LOG_WINDOWS)
_MAX_KERNELS = (MAX_UNSUMMED, EMPTY, MAX_TROPICAL, MAX_ROWS, MAX_SLICES, MAX_WINDOWS)

REAL_FAMILY = Family("real", REAL_RULE, (REAL_BLAS, EMPTY, REAL_WINDOWS), Spec, combine=Combine.SUM)
LOG_FAMILY = Family(
    "log", LOG_RULE, _LOG_KERNELS, LogSpec, assigned=(LOG_SMALL,), combine=Combine.LOG_SUM_EXP
)
MAX_FAMILY = Family(
    "max_plus", MAX_RULE, _MAX_KERNELS, MaxSpec, selects=True,
    extra_rules=(RANKED_RULE,), assigned=(MAX_RANKED,), combine=Combine.MAX,
)  # fmt: skip
MIN_FAMILY = Family(
    "min_plus", MAX_RULE, _MAX_KERNELS, MaxSpec, selects=True, negate=True,
    extra_rules=(RANKED_RULE,), assigned=(MAX_RANKED,), combine=Combine.MAX,
)  # fmt: skip
GENERIC_FAMILY = Family("generic", CUSTOM_RULE, (EMPTY, GENERIC_WINDOWS), CustomSpec)

_BUILTIN: list[tuple[Semiring, Family]] = [
    (REAL, REAL_FAMILY),
    (LOG, LOG_FAMILY),
    (MAX_PLUS, MAX_FAMILY),
    (MIN_PLUS, MIN_FAMILY),
]

FAMILIES = (REAL_FAMILY, LOG_FAMILY, MAX_FAMILY, MIN_FAMILY, GENERIC_FAMILY)
"""Every family."""

RULES = tuple(dict.fromkeys(r for f in FAMILIES for r in (f.rule, *f.extra_rules)))
"""Every family's rules, once each."""


def add_builtin(semiring: Semiring, family: Family) -> None:
    """Run ``semiring`` (and every semiring equal to it) on ``family``; see
    :func:`._autograd.register_family`, which also builds its rules' Functions."""
    for known, had in _BUILTIN:
        if known == semiring:
            if had is family:
                return
            raise ValueError(
                f"the semiring {semiring.name!r} already runs on the {had.name} family"
            )
    _BUILTIN.append((semiring, family))


def family_of(semiring: Semiring) -> Family:
    """The family of a semiring, by value: a built-in's, or the generic one.

    An equal copy of a built-in semiring (a pickled one, say) runs on the
    built-in's kernels.  Names are compared first, so a user semiring costs no
    hashing here.
    """
    for known, family in _BUILTIN:
        if semiring is known or (semiring.name == known.name and semiring == known):
            return family
    return GENERIC_FAMILY


def neg_inf_policy(grad_of_neg_inf: object, equation: object = None) -> float | str:
    """Validate ``grad_of_neg_inf``: ``'nan'``, ``'uniform'`` or a float (hashable, and a
    constant to ``torch.compile``); each log step holds it as a :class:`NegInf`."""
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
