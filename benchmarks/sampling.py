"""Sampling (forward filtering, backward sampling) against the log einsum's forward+backward.

    python benchmarks/sampling.py [--rounds 9] [--samples 1] [--dtype float32] [--threads N]

The project's goal: ``sample_einsum`` costs at most twice ``log_einsum`` forward plus backward
(``torch.autograd.grad`` of the sum) on the same equation.  Workloads, float32 by default:

* ``hmm``: an HMM over ``T`` steps as one einsum of ``2T + 1`` operands,
  ``bA,AB,bB,BC,bC,...->b`` (emissions ``b x n`` per step, transitions ``n x n``; ``b``
  sequences, ``n`` states); sampling draws one state path per sequence.
* ``cky``: one binary-rule application of a CKY chart, ``bsxk,bsyk,xyz->bsz`` (the sizes of
  the ``log-cky-bwd`` workload in ``semiring_einsum.bench``); sampling draws ``(x, k, y)``
  for every ``(b, s, z)``.

Each row: median ms over interleaved rounds (``benchmarks/_timing.py``) and the ratio
sample / (forward + backward).
"""

from __future__ import annotations

import argparse
import string

import torch
from _timing import medians_ms

from semiring_einsum import func
from semiring_einsum.func._sample import sample_einsum


def hmm(steps: int, batch: int, states: int, dtype: torch.dtype) -> tuple[str, list[torch.Tensor]]:
    """The HMM of ``steps`` steps as one equation, with random log-potentials."""
    letters = [c for c in string.ascii_letters if c != "b"]
    if steps + 1 > len(letters):
        raise SystemExit(f"--steps at most {len(letters) - 1}")
    s = letters[: steps + 1]
    terms = ["b" + s[0]]
    for t in range(1, steps + 1):
        terms += [s[t - 1] + s[t], "b" + s[t]]
    g = torch.Generator().manual_seed(0)
    shapes = [(batch, states)] + [(states, states), (batch, states)] * steps
    xs = [torch.randn(shape, generator=g, dtype=dtype) for shape in shapes]
    return ",".join(terms) + "->b", xs


def cky(b: int, s: int, x: int, k: int, dtype: torch.dtype) -> tuple[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(b, s, x, k), (b, s, x, k), (x, x, x)]
    return "bsxk,bsyk,xyz->bsz", [torch.randn(sh, generator=g, dtype=dtype) for sh in shapes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--samples", type=int, default=1, help="num_samples per cell")
    parser.add_argument("--steps", type=int, default=32, help="HMM length T")
    parser.add_argument("--batch", type=int, default=64, help="HMM sequences")
    parser.add_argument("--states", type=int, default=64, help="HMM states")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cases = [
        (
            f"hmm T={args.steps} b={args.batch} n={args.states}",
            *hmm(args.steps, args.batch, args.states, dtype),
        ),
        ("cky b=2 s=16 x=y=z=24 k=8", *cky(2, 16, 24, 8, dtype)),
        ("cky b=2 s=4 x=y=z=6 k=3", *cky(2, 4, 6, 3, dtype)),
    ]
    print(
        f"{args.dtype}, num_samples={args.samples}, median of {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'workload':<30} {'fwd ms':>9} {'fwd+bwd ms':>11} {'sample ms':>10} {'ratio':>7}")
    for name, equation, xs in cases:
        leaves = [x.clone().requires_grad_() for x in xs]
        generator = torch.Generator().manual_seed(0)

        def forward(eq: str = equation, xs: list[torch.Tensor] = xs) -> object:
            return func.log_einsum(eq, *xs)

        def forward_backward(eq: str = equation, leaves: list[torch.Tensor] = leaves) -> object:
            return torch.autograd.grad(func.log_einsum(eq, *leaves).sum(), leaves)

        def sample(
            eq: str = equation, xs: list[torch.Tensor] = xs, g: torch.Generator = generator
        ) -> object:
            return sample_einsum(eq, *xs, num_samples=args.samples, generator=g)

        fwd, fwd_bwd, smp = medians_ms([forward, forward_backward, sample], rounds=args.rounds)
        print(f"{name:<30} {fwd:>9.2f} {fwd_bwd:>11.2f} {smp:>10.2f} {smp / fwd_bwd:>7.2f}")


if __name__ == "__main__":
    main()
