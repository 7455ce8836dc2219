"""The one helper that turns a :class:`~._rules.Rule` into autograd Functions.

Following the findings recorded for torch 2.13 (``shared/notes/torch-func.md``):

* ``forward(spec, context, x0, ..., xn)`` takes no autograd ``ctx`` (``context``
  is the call's :class:`~._context.Context`) and has a fixed arity with no
  defaults (Dynamo mis-binds ``*args`` and default values), so one class is
  generated per arity, at import time for the common arities;
* ``setup_context`` only saves (compute there is invisible to higher-order
  autograd);
* the forward is vmappable (``generate_vmap_rule=True``);
* ``jvp`` raises instead of returning wrong numbers under forward-over-forward
  (a PyTorch bug), and a jvp-less twin is used while Dynamo traces, because
  Dynamo refuses Functions that define ``jvp``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._cache import LRU
from ._context import Context, forward_over_forward
from ._rules import (
    RULES,
    Family,
    Rule,
    add_builtin,
    fold_batch,
    run_forward,
    run_jvp,
    run_vjp,
)
from ._semiring import Semiring
from ._torch_compat import are_functorch_transforms_active as _functorch_active
from ._torch_compat import function_apply as _c_apply
from ._torch_compat import unwrap_dead_wrappers as _unwrap_dead

Tensor = torch.Tensor

PREBUILT_ARITY = 6


def _build(rule: Rule, n: int, with_jvp: bool) -> type[torch.autograd.Function]:
    params = ", ".join(f"x{i}" for i in range(n))
    namespace: dict[str, Any] = {}
    exec(  # fixed arity: see the module docstring
        f"def forward(spec, context, {params}):\n"
        f"    return _forward(_rule, spec, context, {params})\n",
        {"_forward": run_forward, "_rule": rule},
        namespace,
    )

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.spec = inputs[0]
        # No zero cotangents for the non-differentiable outputs (an argmax,
        # residuals): backward would only build and ignore them.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[2:], *output)
        ctx.save_for_forward(*inputs[2:], *output)
        if len(output) > rule.differentiable:
            ctx.mark_non_differentiable(*output[rule.differentiable :])

    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if any(g is None for g in grads[: rule.differentiable]):  # no cotangent reached us
            return (None,) * (n + 2)
        gs = run_vjp(rule, ctx.spec, saved[:n], saved[n:], grads, needs)
        return (None, None, *(g if need else None for g, need in zip(gs, needs)))

    def jvp(ctx: Any, _spec_tangent: None, _context_tangent: None, *tangents: Tensor) -> Any:
        if forward_over_forward():
            raise NotImplementedError(
                "forward-over-forward differentiation (jacfwd(jacfwd(...)), "
                "jvp of jvp) through semiring_einsum returns wrong values in "
                "PyTorch (pytorch/pytorch#197867); use torch.func.hessian or "
                "jacrev(jacfwd(...)) / jacrev(jacrev(...)) instead"
            )
        saved = ctx.saved_tensors
        # Inputs without a tangent get None (grads are not materialized).
        tangents = tuple(
            torch.zeros_like(x) if t is None else t for t, x in zip(tangents, saved[:n])
        )
        out = run_jvp(rule, ctx.spec, saved[:n], saved[n:], tangents)
        return out[0] if len(out) == 1 else out

    def vmap(info: Any, in_dims: tuple[Any, ...], spec: Any, context: Context, *xs: Tensor) -> Any:
        folded, ys = fold_batch(info.batch_size, in_dims[2:], spec, xs)
        inner = context.for_operands(ys)  # one vmap level less
        out = _function(rule, n, inner.compiling).apply(folded, inner, *ys)
        return out, (0,) * len(out) if isinstance(out, tuple) else 0

    attrs: dict[str, Any] = {
        "forward": staticmethod(namespace["forward"]),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    }
    if rule.batched:
        attrs["vmap"] = staticmethod(vmap)
    else:
        attrs["generate_vmap_rule"] = True
    if with_jvp:
        attrs["jvp"] = staticmethod(jvp)
    suffix = "" if with_jvp else "NoJvp"
    return type(f"{rule.name}{n}{suffix}", (torch.autograd.Function,), attrs)


_FUNCTIONS: dict[tuple[Rule, int, bool], type[torch.autograd.Function]] = {}


def _prebuild(rules: Sequence[Rule]) -> None:
    """Build the Functions of ``rules`` for up to ``PREBUILT_ARITY`` operands, with and
    without jvp (``torch.compile`` needs them made before it traces)."""
    for rule in rules:
        for n in range(1, PREBUILT_ARITY + 1):
            for with_jvp in (False, True):
                if (rule, n, with_jvp) not in _FUNCTIONS:
                    _FUNCTIONS[(rule, n, with_jvp)] = _build(rule, n, with_jvp)


_prebuild(RULES)


def register_family(semiring: Semiring, family: Family) -> None:
    """Run ``semiring`` on ``family`` (its kernels, rule and combine), as the built-in
    semirings run on theirs, and build the Functions of the family's rules now, as the
    built-in families' are at import."""
    add_builtin(semiring, family)
    _prebuild((family.rule, *family.extra_rules))


# Functions made on demand (steps of more than PREBUILT_ARITY operands, the rules of
# combine()), least recently used out first; the prebuilt ones stay.
_MADE: LRU[tuple[Rule, int, bool], type[torch.autograd.Function]] = LRU(1024)


def _function(rule: Rule, n: int, compiling: bool) -> type[torch.autograd.Function]:
    with_jvp = rule.jvp is not None and not compiling
    key = (rule, n, with_jvp)
    fn = _FUNCTIONS.get(key) or _MADE.get(key)
    if fn is None:
        if compiling:
            raise NotImplementedError(
                f"torch.compile supports steps of at most {PREBUILT_ARITY} operands "
                f"(got {n}); use a pairwise plan (optimize='auto') or call it eagerly once first"
            )
        for twin in (False, True) if rule.jvp is not None else (False,):
            made = _build(rule, n, twin)
            _MADE.put((rule, n, twin), made)
            if twin == with_jvp:
                fn = made
    assert fn is not None
    return fn


def apply(rule: Rule, spec: object, ctx: Context, *xs: Tensor) -> tuple[Tensor, ...]:
    """Run ``rule`` on ``xs`` through its autograd Function; always a tuple."""
    # Function.apply costs tens of microseconds (argument binding, context,
    # transform dispatch): skip it when nothing can see the call.
    if not ctx.traced and not ctx.transformed:
        return run_forward(rule, spec, ctx, *xs)
    fn = _function(rule, len(xs), ctx.compiling)
    if ctx.traced or _functorch_active():
        out = fn.apply(spec, ctx, *xs)
    else:
        # Plain autograd: what Function.apply ends in, without the inspect.signature
        # binding it does first on every call (tens of microseconds; our forwards have
        # fixed positional parameters, nothing to bind).
        out = _c_apply(fn, spec, ctx, *_unwrap_dead(xs))
    return out if isinstance(out, tuple) else (out,)
