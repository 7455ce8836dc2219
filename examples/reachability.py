"""Reachability and NFA recognition in the boolean semiring, on ``torch.bool`` tensors.

In the boolean semiring (⊕ = or, ⊗ = and) the matrix "product" of two adjacency matrices,

    (R ⊗ R)[i, k] = OR_j  R[i, j] AND R[j, k]

is true when ``k`` can be reached from ``i`` in two hops of ``R``.
:func:`semiring_einsum.func.bool_einsum` computes it on ``torch.bool`` tensors directly, on
packed bits (64 terms per machine word), never through floating point.  The script uses it for

* the **transitive closure** of a random directed graph: with ``R = A or I`` (every node reaches
  itself), squaring ``R`` doubles the path length covered, so about ``log2(n)`` squarings give
  every pair ``(i, k)`` with a path from ``i`` to ``k``; the same for a batch of graphs at once
  (``"...ij,...jk->...ik"``);
* **walks of exactly L edges** (``A`` to the power ``L`` by repeated squaring, without the
  identity);
* **recognition by a nondeterministic finite automaton**: with a boolean transition matrix
  ``T[σ]`` per symbol, a start vector and an accept vector, a string ``σ_1 .. σ_n`` is accepted
  when some run leads from a start state to an accept state,

      accepted = OR_{q_0..q_n} start[q_0] AND T[σ_1][q_0, q_1] AND ... AND accept[q_n]

  one einsum over the chain ``"a,zab,zbc,...,X->z"`` for a batch ``z`` of strings of one length,
  or, for long strings, a balanced tree of ``"zab,zbc->zac"`` products.

Checked against breadth-first search from every node, against step-by-step propagation of
reachable sets for the walks, and against direct simulation of the automaton (the set of states
it can be in after each symbol) and, for a classic NFA, against Python's ``re`` module.

    python examples/reachability.py            # default sizes
    python examples/reachability.py --small    # what the test suite runs

The script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import string
from collections import deque

import torch

from semiring_einsum import func

Tensor = torch.Tensor
STATE_LETTERS = string.ascii_letters.replace("z", "")  # "z" is the batch index


def check(ok: bool, what: str) -> None:
    """Stop with a non-zero exit status if a check fails."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")
    print(f"ok: {what}")


def random_graphs(batch: int, nodes: int, degree: float, generator: torch.Generator) -> Tensor:
    """Adjacency matrices ``[batch, n, n]`` (bool) of random digraphs, ``degree`` edges per node.

    Around one edge per node, a random digraph has some large strongly connected parts and many
    nodes that reach little: the closure is neither empty nor full.
    """
    return torch.rand(batch, nodes, nodes, generator=generator) < degree / nodes


# ----------------------------------------------------------------------------- graphs
def transitive_closure(adjacency: Tensor) -> tuple[Tensor, int]:
    """Reachability ``[..., n, n]`` by repeated squaring of ``A or I``; and how many squarings."""
    n = adjacency.shape[-1]
    reach = adjacency | torch.eye(n, dtype=torch.bool)
    squarings = 0
    while True:
        longer = func.bool_einsum("...ij,...jk->...ik", reach, reach)
        squarings += 1
        if torch.equal(longer, reach):  # a fixed point: nothing new within twice the length
            return reach, squarings
        reach = longer


def walks(adjacency: Tensor, length: int) -> Tensor:
    """``[i, k]``: is there a walk of exactly ``length`` edges from i to k (``A ** length``)."""
    n = adjacency.shape[-1]
    result = torch.eye(n, dtype=torch.bool)
    power = adjacency
    while length:
        if length & 1:
            result = func.bool_einsum("ij,jk->ik", result, power)
        power = func.bool_einsum("ij,jk->ik", power, power)
        length >>= 1
    return result


def bfs_reach(adjacency: Tensor) -> Tensor:
    """Reachability by breadth-first search from every node, in plain Python."""
    n = adjacency.shape[-1]
    out = [[j for j, edge in enumerate(row) if edge] for row in adjacency.tolist()]
    reach = torch.zeros(n, n, dtype=torch.bool)
    for source in range(n):
        seen = {source}
        queue = deque([source])
        while queue:
            for nxt in out[queue.popleft()]:
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        reach[source, sorted(seen)] = True
    return reach


def walk_sets(adjacency: Tensor, length: int) -> Tensor:
    """``A ** length`` by propagating, from every node, the set of nodes reached so far."""
    n = adjacency.shape[-1]
    out = [{j for j, edge in enumerate(row) if edge} for row in adjacency.tolist()]
    result = torch.zeros(n, n, dtype=torch.bool)
    for source in range(n):
        current = {source}
        for _ in range(length):
            current = set().union(*(out[i] for i in current))
        result[source, sorted(current)] = True
    return result


# ----------------------------------------------------------------------------- automata
class NFA:
    """A nondeterministic finite automaton over symbols ``0 .. alphabet - 1``."""

    def __init__(self, transitions: Tensor, start: Tensor, accept: Tensor) -> None:
        self.transitions = transitions  # [symbol, q, q'] bool: q --symbol--> q'
        self.start = start  # [q] bool
        self.accept = accept  # [q] bool

    def accepts(self, strings: Tensor) -> Tensor:
        """Acceptance of a batch ``[z, n]`` of strings of one length: one chain einsum."""
        batch, n = strings.shape
        s = STATE_LETTERS
        if n + 1 > len(s):
            raise ValueError(f"strings of length {n}: at most {len(s) - 1} symbols per chain")
        if n == 0:  # the empty string: is a start state accepting?
            return func.bool_einsum("a,a->", self.start, self.accept).expand(batch)
        steps = [f"z{s[t]}{s[t + 1]}" for t in range(n)]
        equation = ",".join([s[0], *steps, s[n]]) + "->z"
        matrices = [self.transitions[strings[:, t]] for t in range(n)]  # each [z, q, q']
        return func.bool_einsum(equation, self.start, *matrices, self.accept)

    def accepts_long(self, strings: Tensor) -> Tensor:
        """The same for long strings: a balanced tree of pairwise products, log2(n) levels."""
        matrices = self.transitions[strings]  # [z, n, q, q']
        while matrices.shape[1] > 1:
            if matrices.shape[1] % 2:  # pad with the identity (reading nothing)
                eye = torch.eye(matrices.shape[-1], dtype=torch.bool)
                matrices = torch.cat([matrices, eye.expand(len(matrices), 1, -1, -1)], dim=1)
            matrices = func.bool_einsum("zpab,zpbc->zpac", matrices[:, 0::2], matrices[:, 1::2])
        return func.bool_einsum("a,zab,b->z", self.start, matrices[:, 0], self.accept)

    def simulate(self, string: list[int]) -> bool:
        """Direct simulation: the set of states the automaton can be in, symbol by symbol."""
        delta = self.transitions.tolist()
        accept = self.accept.tolist()
        states = {q for q, on in enumerate(self.start.tolist()) if on}
        for symbol in string:
            states = {r for q in states for r, on in enumerate(delta[symbol][q]) if on}
        return any(accept[q] for q in states)


def third_from_last_is_a() -> NFA:
    """The textbook NFA for ``(a|b)*a(a|b)(a|b)``: four states, where a DFA needs eight."""
    t = torch.zeros(2, 4, 4, dtype=torch.bool)  # symbol 0 = "a", 1 = "b"
    t[:, 0, 0] = True  # loop in the start state on anything
    t[0, 0, 1] = True  # guess: this "a" is the third from last
    t[:, 1, 2] = True
    t[:, 2, 3] = True
    start = torch.tensor([True, False, False, False])
    return NFA(t, start, torch.tensor([False, False, False, True]))


def random_nfa(states: int, alphabet: int, generator: torch.Generator) -> NFA:
    transitions = torch.rand(alphabet, states, states, generator=generator) < 1.5 / states
    start = torch.rand(states, generator=generator) < 0.3
    accept = torch.rand(states, generator=generator) < 0.3
    start[0] = accept[-1] = True  # at least one of each
    return NFA(transitions, start, accept)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)

    # Transitive closure of one graph, and of a batch of graphs in the same calls.
    nodes, batch = (24, 3) if args.small else (300, 8)
    graphs = random_graphs(batch, nodes, 1.2, gen)
    reach, squarings = transitive_closure(graphs)
    expected = torch.stack([bfs_reach(g) for g in graphs])
    share = reach.float().mean().item()
    print(f"{batch} graphs of {nodes} nodes: {share:.0%} of the pairs are connected")
    check(torch.equal(reach, expected), "transitive closure equals BFS from every node")
    bound = 1 + math.ceil(math.log2(nodes - 1))  # 2**(s-1) >= n - 1, plus one to see no change
    check(squarings <= bound, f"{squarings} squarings (no more than {bound})")
    single, _ = transitive_closure(graphs[0])
    check(torch.equal(single, reach[0]), "one graph on its own gives the same closure")
    check(
        1 / nodes < share < 1.0,
        "some pairs are connected beyond i = k, not all (the comparison has something to find)",
    )

    # Walks of exactly L edges.
    for length in (0, 1, 2, 5, 13):
        check(
            torch.equal(walks(graphs[0], length), walk_sets(graphs[0], length)),
            f"walks of exactly {length} edges equal set propagation",
        )

    # The NFA for "third symbol from the end is a": every string up to some length.
    nfa = third_from_last_is_a()
    longest = 8 if args.small else 12
    for n in range(longest + 1):
        strings = torch.tensor(list(itertools.product(range(2), repeat=n))).reshape(2**n, n)
        ours = nfa.accepts(strings).tolist()
        text = ["".join("ab"[c] for c in s) for s in strings.tolist()]
        by_re = [re.fullmatch("[ab]*a[ab][ab]", s) is not None for s in text]
        by_simulation = [nfa.simulate(s) for s in strings.tolist()]
        check(
            ours == by_re == by_simulation,
            f"(a|b)*a(a|b)(a|b): all {len(text)} strings of length {n}, as re and simulation",
        )

    # A random NFA, random strings: chains of one length, and long strings by a tree of products.
    states, alphabet, count = (6, 3, 20) if args.small else (12, 4, 200)
    nfa = random_nfa(states, alphabet, gen)
    accepted = 0
    for n in (1, 7, 30, 50):
        strings = torch.randint(alphabet, (count, n), generator=gen)
        ours = nfa.accepts(strings).tolist()
        tree = nfa.accepts_long(strings).tolist()
        by_simulation = [nfa.simulate(s) for s in strings.tolist()]
        accepted += sum(by_simulation)
        check(
            ours == tree == by_simulation,
            f"random NFA, {count} strings of length {n}: chain and tree equal simulation",
        )
    n = 200 if args.small else 2000
    strings = torch.randint(alphabet, (count, n), generator=gen)
    by_simulation = [nfa.simulate(s) for s in strings.tolist()]
    accepted += sum(by_simulation)
    check(
        nfa.accepts_long(strings).tolist() == by_simulation,
        f"random NFA, {count} strings of length {n}: tree of products equals simulation",
    )
    check(0 < accepted < 5 * count, f"some strings are accepted ({accepted} of {5 * count})")


if __name__ == "__main__":
    main()
