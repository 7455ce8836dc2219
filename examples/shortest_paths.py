"""All-pairs shortest paths with min-plus einsum (repeated squaring), checked by Floyd–Warshall.

In the min-plus semiring (⊕ = min, ⊗ = +, zero = +inf) the matrix "product"

    (D ⊗ D)[i, k] = min_j D[i, j] + D[j, k]

of a distance matrix ``D`` with itself is the length of the best path of at most twice as many
edges.  With ``D[i, i] = 0``, squaring ``ceil(log2(n - 1))`` times gives all shortest path
lengths: :func:`semiring_einsum.func.min_einsum` with ``"ij,jk->ik"``.  Missing edges are
``+inf`` (the semiring's zero), and stay ``+inf`` for unreachable pairs.

The same loop runs on a batch of graphs at once (``"bij,bjk->bik"``), with a small
``block_size`` to show that only windows of the summed index ``j`` are ever materialised, and
the gradient of a path length with respect to the edge weights marks the edges of a shortest
path.

    python examples/shortest_paths.py            # default sizes
    python examples/shortest_paths.py --small    # what the test suite runs

The script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import math

import torch

from semiring_einsum import func

Tensor = torch.Tensor


def check(ok: bool, what: str) -> None:
    """Stop with a non-zero exit status if a check fails."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")
    print(f"ok: {what}")


def random_graphs(batch: int, nodes: int, density: float, generator: torch.Generator) -> Tensor:
    """Edge weights ``w[b, i, j]``: integers 1..9, ``inf`` for no edge, 0 on the diagonal.

    Integer weights make every path length exact in floating point, so results compare exactly.
    """
    weights = torch.randint(1, 10, (batch, nodes, nodes), generator=generator).double()
    missing = torch.rand(batch, nodes, nodes, generator=generator) > density
    weights = weights.masked_fill(missing, math.inf)
    return weights.masked_fill(torch.eye(nodes, dtype=torch.bool), 0.0)


def all_pairs_shortest_paths(weights: Tensor, block_size: int | None = None) -> Tensor:
    """Repeated min-plus squaring: after k squarings, paths of up to 2**k edges are covered."""
    distances = weights
    for _ in range(max(1, math.ceil(math.log2(max(weights.shape[-1] - 1, 1))))):
        distances = func.min_einsum(
            "...ij,...jk->...ik", distances, distances, block_size=block_size
        )
    return distances


def floyd_warshall(weights: Tensor) -> Tensor:
    """The textbook O(n³) algorithm, with plain torch ops."""
    d = weights.clone()
    for k in range(d.shape[-1]):
        d = torch.minimum(d, d[..., :, k, None] + d[..., None, k, :])
    return d


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    batch, nodes = (3, 12) if args.small else (8, 100)

    graphs = random_graphs(batch, nodes, density=0.15, generator=gen)
    expected = floyd_warshall(graphs)
    check(
        torch.equal(all_pairs_shortest_paths(graphs[0]), expected[0]), "one graph: Floyd–Warshall"
    )
    check(
        torch.equal(all_pairs_shortest_paths(graphs), expected), "batch of graphs: Floyd–Warshall"
    )
    windowed = all_pairs_shortest_paths(graphs, block_size=4)
    check(torch.equal(windowed, expected), "block_size=4 (windows of 4 along j): same answer")
    print(func.plan("bij,bjk->bik", graphs, graphs, semiring=func.MIN_PLUS, block_size=4))
    unreachable = int(expected.isinf().sum())
    print(f"{batch} graphs of {nodes} nodes, {unreachable} unreachable pairs (distance inf)")

    # The gradient of one distance with respect to the edge weights counts how often each edge
    # is used by the path the min-plus steps chose: 1 on the edges of a shortest path, 0 elsewhere.
    reachable = expected[0, 0].masked_fill(expected[0, 0].isinf(), -1)
    target = int(reachable.argmax())  # the farthest node reachable from node 0
    weights = graphs[0].clone().requires_grad_()
    (uses,) = torch.autograd.grad(all_pairs_shortest_paths(weights)[0, target], weights)
    uses = uses.masked_fill(torch.eye(nodes, dtype=torch.bool), 0.0)  # staying put is free
    pairs = uses.nonzero().tolist()
    edges = dict(pairs)  # node -> next node
    check(bool((uses[uses != 0] == 1).all()), "the gradient uses each edge at most once")
    check(len(edges) == len(pairs), "and leaves each node by at most one edge")
    walk = [0]
    while walk[-1] in edges and len(walk) <= nodes:
        walk.append(edges[walk[-1]])
    check(walk[-1] == target and len(walk) == len(edges) + 1, f"its edges form a path {walk}")
    length = sum(graphs[0, i, j].item() for i, j in zip(walk, walk[1:]))
    check(length == expected[0, 0, target].item(), f"of the shortest length {length:g}")


if __name__ == "__main__":
    main()
