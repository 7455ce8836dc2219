"""Your own semiring: reachability, widest paths and a smoothed max, with ``func.semiring_einsum``.

A :class:`semiring_einsum.func.Semiring` is six fields: a name, elementwise ``add`` (⊕) and
``mul`` (⊗), ``sum(x, dims)`` (⊕-reduce the given dims, possibly none), and the scalars ``zero``
(⊕ identity) and ``one`` (⊗ identity).  :func:`semiring_einsum.func.semiring_einsum` runs any
einsum equation in it, in windows of bounded size, and differentiates it with autograd.

Three semirings, each checked against a direct computation:

* **boolean** (⊕ = or = max, ⊗ = and = min on 0/1 floats): the transitive closure of a directed
  graph by repeated squaring, checked against a breadth-first search from every node;
* **bottleneck** (⊕ = max, ⊗ = min on capacities, zero = 0, one = +inf): the widest path
  between every pair of nodes, checked against a Floyd–Warshall variant;
* **smoothed max** (⊕ = τ·logaddexp(a/τ, b/τ), ⊗ = +): differentiable, so its values,
  gradients (reverse mode), tangents (forward mode) and Hessians are checked against the
  built-in log semiring, ``τ · func.log_einsum(x / τ)``.

    python examples/custom_semiring.py            # default sizes
    python examples/custom_semiring.py --small    # what the test suite runs

The script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import math
from collections import deque

import torch

from semiring_einsum import func
from semiring_einsum.func import Semiring, semiring_einsum

Tensor = torch.Tensor


def check(ok: bool, what: str) -> None:
    """Stop with a non-zero exit status if a check fails."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")
    print(f"ok: {what}")


def amax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return x.amax(dims) if dims else x  # sum() over no dims must return x itself


BOOLEAN = Semiring("boolean", add=torch.maximum, mul=torch.minimum, sum=amax, zero=0.0, one=1.0)
BOTTLENECK = Semiring(
    "bottleneck", add=torch.maximum, mul=torch.minimum, sum=amax, zero=0.0, one=math.inf
)


def smoothed_max(tau: float) -> Semiring:
    """log-sum-exp at temperature ``tau``: tends to max-plus as ``tau -> 0``."""

    def add(a: Tensor, b: Tensor) -> Tensor:
        return tau * torch.logaddexp(a / tau, b / tau)

    def reduce(x: Tensor, dims: tuple[int, ...]) -> Tensor:
        return tau * torch.logsumexp(x / tau, dims) if dims else x

    return Semiring(
        f"smoothed_max({tau})", add=add, mul=torch.add, sum=reduce, zero=-math.inf, one=0.0
    )


def closure(semiring: Semiring, matrix: Tensor) -> Tensor:
    """``matrix`` raised to a power ≥ n - 1 by repeated squaring (its diagonal must be ``one``)."""
    for _ in range(max(1, math.ceil(math.log2(max(matrix.shape[-1] - 1, 1))))):
        matrix = semiring_einsum(semiring, "ij,jk->ik", matrix, matrix, block_size=4)
    return matrix


def bfs_reachability(adjacency: Tensor) -> Tensor:
    n = adjacency.shape[0]
    successors = [row.nonzero()[:, 0].tolist() for row in adjacency]
    reach = torch.zeros(n, n)
    for start in range(n):
        seen, queue = {start}, deque([start])
        while queue:
            for nxt in successors[queue.popleft()]:
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        reach[start, list(seen)] = 1.0
    return reach


def widest_paths(capacity: Tensor) -> Tensor:
    """Floyd–Warshall with (max, min) in place of (min, +)."""
    c = capacity.clone()
    for k in range(c.shape[0]):
        c = torch.maximum(c, torch.minimum(c[:, k, None], c[None, k, :]))
    return c


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    nodes = 10 if args.small else 60
    eye = torch.eye(nodes, dtype=torch.bool)

    # Reachability: entry (i, k) of the closure is 1 iff some path leads from i to k.
    adjacency = (torch.rand(nodes, nodes, generator=gen) < 1.5 / nodes).float()
    reach = closure(BOOLEAN, adjacency.masked_fill(eye, 1.0))
    check(torch.equal(reach, bfs_reachability(adjacency)), "boolean closure equals BFS")
    print(f"{int(reach.sum())} of {nodes * nodes} ordered pairs are connected")

    # Widest paths: the best path's capacity is its narrowest edge; no edge has capacity 0.
    capacity = torch.rand(nodes, nodes, generator=gen, dtype=torch.float64)
    capacity = capacity.masked_fill(torch.rand(nodes, nodes, generator=gen) > 0.3, 0.0)
    capacity = capacity.masked_fill(eye, math.inf)
    check(torch.equal(closure(BOTTLENECK, capacity), widest_paths(capacity)), "widest paths")

    # A differentiable semiring: compare with the built-in log semiring at temperature tau.
    tau = 0.5
    soft = smoothed_max(tau)
    size = 3 if args.small else 12
    a, b, c = (torch.randn(size, size + 1, dtype=torch.float64, generator=gen) for _ in range(3))
    b, c = b.T.contiguous(), c[:, :size]

    def ours(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        return semiring_einsum(soft, "ij,jk,kl->il", a, b, c, block_size=2)

    def builtin(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        return tau * func.log_einsum("ij,jk,kl->il", a / tau, b / tau, c / tau)

    def close(x: Tensor, y: Tensor) -> bool:
        return torch.allclose(x, y, rtol=1e-9, atol=1e-12)

    check(close(ours(a, b, c), builtin(a, b, c)), "smoothed max: values")
    cotangent = torch.randn(size, size, dtype=torch.float64, generator=gen)
    grads = [torch.func.vjp(f, a, b, c)[1](cotangent) for f in (ours, builtin)]
    check(all(close(x, y) for x, y in zip(*grads)), "smoothed max: gradients (vjp)")
    tangents = (torch.randn_like(a), torch.randn_like(b), torch.randn_like(c))
    jvps = [torch.func.jvp(f, (a, b, c), tangents)[1] for f in (ours, builtin)]
    check(close(*jvps), "smoothed max: forward-mode tangents (jvp)")
    hessians = [torch.func.hessian(lambda a, f=f: f(a, b, c).sum())(a) for f in (ours, builtin)]
    check(close(*hessians), "smoothed max: Hessians")
    print(func.plan("ij,jk,kl->il", a, b, c, semiring=soft, block_size=2))


if __name__ == "__main__":
    main()
