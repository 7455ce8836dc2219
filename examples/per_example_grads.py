"""Per-example gradients with ``torch.func.vmap(torch.func.grad(...))`` through a log einsum.

A small latent-variable classifier scores each class ``c`` of an input ``x`` by summing over a
hidden unit ``h`` in log space:

    logits[c] = log Σ_h exp(x · theta[h] + phi[h, c])

which is ``func.log_einsum("h,hc->c", func.einsum("d,hd->h", x, theta), phi)``.  The loss of one
example is the cross-entropy of those logits.  ``torch.func.vmap(torch.func.grad(loss))`` gives
the gradient of every example's loss with respect to the parameters in one batched call --
what differentially private training or gradient-noise diagnostics need.  Under ``vmap`` our
functions fold the batch dimension into the einsum equation, so the batched call is one blocked
contraction, not a Python loop.

The result is checked against a Python loop of ``torch.autograd.grad`` over the examples.  The
same is done for a ``torch.nn.Module`` through ``torch.func.functional_call``, and for an
ensemble of models through ``torch.func.stack_module_state``.

    python examples/per_example_grads.py            # default sizes
    python examples/per_example_grads.py --small    # what the test suite runs

The script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse

import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from semiring_einsum import func

Tensor = torch.Tensor


def check(ok: bool, what: str) -> None:
    """Stop with a non-zero exit status if a check fails."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")
    print(f"ok: {what}")


def close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-9, atol=1e-10)


class LatentClassifier(torch.nn.Module):
    """``logits[c] = log Σ_h exp(x · theta[h] + phi[h, c])`` for one example ``x``."""

    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.randn(hidden, features, dtype=torch.float64) / 3)
        self.phi = torch.nn.Parameter(torch.randn(hidden, classes, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        h = func.einsum("d,hd->h", x, self.theta)  # hidden scores
        return func.log_einsum("h,hc->c", h, self.phi)  # class logits


def loss(theta: Tensor, phi: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of one example (``x``: features, ``y``: a 0-d class index)."""
    logits = func.log_einsum("h,hc->c", func.einsum("d,hd->h", x, theta), phi)
    return torch.nn.functional.cross_entropy(logits[None], y[None])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    examples, features, hidden, classes = (6, 5, 4, 3) if args.small else (64, 32, 16, 10)

    model = LatentClassifier(features, hidden, classes)
    x = torch.randn(examples, features, dtype=torch.float64)
    y = torch.randint(classes, (examples,))
    theta, phi = model.theta.detach(), model.phi.detach()

    # Batched: one call, gradients of shape (examples, *parameter shape).
    per_example = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(theta, phi, x, y)

    # The loop it replaces.
    looped = [[], []]
    for xi, yi in zip(x, y):
        params = (theta.clone().requires_grad_(), phi.clone().requires_grad_())
        for acc, g in zip(looped, torch.autograd.grad(loss(*params, xi, yi), params)):
            acc.append(g)
    for name, batched, loop in zip(("theta", "phi"), per_example, looped):
        check(close(batched, torch.stack(loop)), f"vmap(grad) d loss / d {name} equals the loop")
    mean = [g.mean(0) for g in per_example]
    full = torch.autograd.grad(
        sum(loss(model.theta, model.phi, xi, yi) for xi, yi in zip(x, y)) / examples,
        (model.theta, model.phi),
    )
    check(all(close(a, b) for a, b in zip(mean, full)), "their mean is the batch gradient")

    # The same for a Module: functional_call swaps in a dict of parameters.
    params = {k: v.detach() for k, v in model.named_parameters()}

    def module_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(logits[None], y[None])

    grads = vmap(grad(module_loss), in_dims=(None, 0, 0))(params, x, y)
    check(close(grads["theta"], per_example[0]), "functional_call + vmap(grad): same gradients")

    # An ensemble of models, evaluated in one vmapped call.
    models = [LatentClassifier(features, hidden, classes) for _ in range(3)]
    stacked, _buffers = stack_module_state(models)

    def predict(p: dict[str, Tensor], x: Tensor) -> Tensor:  # one model, a batch of inputs
        return vmap(lambda xi: functional_call(model, p, (xi,)))(x)

    logits = vmap(predict, in_dims=(0, None))(stacked, x)  # models x examples x classes
    expected = torch.stack([torch.stack([m(xi) for xi in x]) for m in models])
    check(close(logits, expected.detach()), "stack_module_state ensemble equals each model")


if __name__ == "__main__":
    main()
