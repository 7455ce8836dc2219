"""Differentiable log-space einsum (mirrors ``torch_semiring_einsum.log_differentiable``).

:func:`log_einsum` is the drop-in function (our own autograd rule, which also
composes with ``torch.func``).  :class:`LogEinsumFunction` is kept for code
that calls ``LogEinsumFunction.apply`` directly, with the reference's
arguments; the other names are what the reference's module imports.
"""

from __future__ import annotations

from typing import Any

import torch

from ._interop import log_einsum, log_einsum_backward, log_einsum_forward
from .equation import AUTOMATIC_BLOCK_SIZE, AutomaticBlockSize, Equation

Tensor = torch.Tensor

__all__ = [
    "AUTOMATIC_BLOCK_SIZE",
    "AutomaticBlockSize",
    "Equation",
    "LogEinsumFunction",
    "log_einsum",
    "log_einsum_backward",
    "log_einsum_forward",
]


class LogEinsumFunction(torch.autograd.Function):
    """:func:`log_einsum_forward` and :func:`log_einsum_backward` as an ``autograd.Function``.

    Called as ``LogEinsumFunction.apply(equation, block_size, save_max,
    save_sumexpsub, grad_of_neg_inf, *args)``.  With ``save_max`` /
    ``save_sumexpsub``, the forward keeps each output cell's max term / scaled
    sum for the backward (when some input needs a gradient); the backward
    recomputes only what is not kept.

    Example:
        >>> import torch
        >>> from semiring_einsum.log_differentiable import LogEinsumFunction
        >>> x = torch.zeros(2, requires_grad=True)
        >>> LogEinsumFunction.apply("i->", 1, True, True, float("nan"), x).backward()
        >>> x.grad
        tensor([0.5000, 0.5000])
    """

    @staticmethod
    def forward(
        ctx: Any,
        equation: Equation | str,
        block_size: int | AutomaticBlockSize,
        save_max: bool,
        save_sumexpsub: bool,
        grad_of_neg_inf: Any,
        *args: Tensor,
    ) -> Tensor:
        wanted = any(ctx.needs_input_grad)
        keep_max, keep_sum = bool(save_max) and wanted, bool(save_sumexpsub) and wanted
        result = log_einsum_forward(
            equation,
            *args,
            block_size=block_size,
            return_max=keep_max,
            return_sumexpsub=keep_sum,
        )
        if isinstance(result, tuple):
            output, *kept = result
        else:
            output, kept = result, []
        ctx.equation = equation
        ctx.block_size = block_size
        ctx.grad_of_neg_inf = grad_of_neg_inf
        ctx.keep_max, ctx.keep_sum = keep_max, keep_sum
        ctx.save_for_backward(*args, *kept)
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        saved_sumexpsub = saved.pop() if ctx.keep_sum else None
        saved_max = saved.pop() if ctx.keep_max else None
        grads = log_einsum_backward(
            ctx.equation,
            saved,
            ctx.needs_input_grad[5:],
            grad,
            ctx.block_size,
            ctx.grad_of_neg_inf,
            saved_max,
            saved_sumexpsub,
        )
        return (None, None, None, None, None, *grads)
