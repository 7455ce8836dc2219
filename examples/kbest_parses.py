"""The k best parse trees of a sentence under a PCFG: k-best CKY with one k-best einsum per width.

A probabilistic context-free grammar in Chomsky normal form scores a tree by the sum of the log
probabilities of its rules, binary ``A -> B C`` and lexical ``A -> w``.  CKY's Viterbi chart
keeps, for every span ``i:k`` and nonterminal ``A``, the best tree of the span rooted at ``A``
(see ``examples/cky.py``).  For the ``k`` best trees, the chart keeps a *list*: the ``k`` best
trees of the span rooted at ``A``, best first.

Why is that enough?  Take any of the ``k`` best trees of span ``i:k`` rooted at ``A``, with rule
``A -> B C`` and split ``j``.  Its left subtree is one of the ``k`` best trees of ``i:j`` rooted
at ``B``: otherwise ``k`` better left subtrees, each with the same right subtree, would give
``k`` better trees of the whole span.  The same holds on the right.  (With ties, "better" reads
"at least as good", and the claim holds for some choice among the tied trees.)  So the ``k``
best trees of a span are among the combinations

    rule[A, B, C] + left_list[i:j, B][r] + right_list[j:k, C][q]

over rules ``B, C``, split points ``j`` and ranks ``r, q`` in the children's lists -- and
picking the ``k`` best of those terms is a k-best einsum.  With the chart of one span width
stacked over start ``i`` and split ``s`` (``j = i + s + 1``) and the list rank as a trailing
index, one width is

    func.kbest_einsum("abc,isbr,iscq->ia", rule, left, right, k=k)

whose values are the new lists ``[i, A, slot]`` and whose assignments ``(b, c, s, r, q)`` are
the back-pointers: the rule, the split and *which* of the children's trees.  Following them from
the root's list rebuilds each of the ``k`` trees.  This is Huang and Chiang's (2005) "algorithm
0" for k-best parsing, with the per-cell ``k``-way merge done by the einsum.  A span with fewer
than ``k`` trees pads its list with ``-inf``, which ``kbest_einsum`` counts as no tree.

Ties are part of parsing, even with random real-valued rule scores: two trees that use the same
rules in a different arrangement (``A -> A A`` branching left or right, say) have the same score,
up to the rounding of the sum.  Within a cell ``kbest_einsum`` orders tied terms by their
assignment ``(b, c, s, r, q)``, which is not a global order of trees, and float rounding decides
near-ties anyway, so the tied trees may come in another order than brute force's.  Any ``k``
distinct trees whose scores are the ``k`` best scores are a correct answer, so that is what the
script checks.

Every list is checked against brute-force enumeration of all parse trees of short sentences,
for every root nonterminal: the ``k`` best scores in order; that the ``k`` trees are distinct
trees of the sentence, each with the score reported for it; how many there are when a sentence
has fewer than ``k`` trees; and that, away from ties, each tree is brute force's tree at that
rank.

    python examples/kbest_parses.py            # default sizes
    python examples/kbest_parses.py --small    # what the test suite runs

The script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch

from semiring_einsum import func

Tensor = torch.Tensor
Tree = tuple  # (A, word) for a leaf, (A, left, right) for a binary node
EQUATION = "abc,isbr,iscq->ia"  # rule[A,B,C], left[start, split, B, rank], right[..., C, rank]


def check(ok: bool, what: str) -> None:
    """Stop with a non-zero exit status if a check fails."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")
    print(f"ok: {what}")


def close(a: object, b: object) -> bool:
    # float64 sums of a dozen log probabilities, added in different orders.
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64),
        torch.as_tensor(b, dtype=torch.float64),
        rtol=1e-9,
        atol=1e-9,
    )


def random_grammar(
    nonterminals: int, words: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Log probabilities of binary rules ``[A, B, C]`` and lexical rules ``[A, w]``.

    For each ``A`` the probabilities of all its rules, binary and lexical, sum to one.
    """
    n = nonterminals
    logits = torch.randn(n, n * n + words, generator=generator, dtype=torch.float64)
    log_p = logits.log_softmax(-1)
    return log_p[:, : n * n].reshape(n, n, n), log_p[:, n * n :]


# ----------------------------------------------------------------------------- k-best CKY
def kbest_parse(
    binary: Tensor, lexical: Tensor, sentence: list[int], k: int
) -> tuple[Tensor, list[list[Tree | None]]]:
    """The ``k`` best trees of the sentence for every root nonterminal, and their scores.

    Returns ``scores[A, slot]`` and ``trees[A][slot]`` (None where the sentence has fewer than
    ``k`` trees rooted at ``A``).
    """
    n, labels = len(sentence), binary.shape[0]
    # chart[i, k]: the list of span i:k, [nonterminal, slot]; a word has one tree per label.
    chart: dict[tuple[int, int], Tensor] = {}
    for i, w in enumerate(sentence):
        leaf = torch.full((labels, k), -math.inf, dtype=binary.dtype)
        leaf[:, 0] = lexical[:, w]
        chart[i, i + 1] = leaf
    pointers: dict[int, Tensor] = {}  # per width: [start, A, slot, (b, c, s, r, q)]
    for width in range(2, n + 1):
        starts = range(n - width + 1)
        left = torch.stack(
            [torch.stack([chart[i, i + s] for s in range(1, width)]) for i in starts]
        )
        right = torch.stack(
            [torch.stack([chart[i + s, i + width] for s in range(1, width)]) for i in starts]
        )
        lists, pointers[width] = func.kbest_einsum(EQUATION, binary, left, right, k=k)
        for i in starts:
            chart[i, i + width] = lists[i]

    def build(i: int, j: int, a: int, slot: int) -> Tree:
        if j == i + 1:
            return (a, sentence[i])
        b, c, s, r, q = pointers[j - i][i, a, slot].tolist()
        split = i + s + 1
        return (a, build(i, split, b, r), build(split, j, c, q))

    scores = chart[0, n]
    trees = [
        [build(0, n, a, slot) if scores[a, slot] > -math.inf else None for slot in range(k)]
        for a in range(labels)
    ]
    return scores, trees


# ----------------------------------------------------------------------------- brute force
def all_trees(
    binary: Tensor, lexical: Tensor, sentence: list[int], root: int
) -> list[tuple[float, Tree]]:
    """Every tree over the sentence rooted at ``root``, with its log probability."""
    rule, lex = binary.tolist(), lexical.tolist()
    labels = range(len(lex))

    @functools.cache
    def trees(i: int, k: int, a: int) -> list[tuple[float, Tree]]:
        if k == i + 1:
            return [(lex[a][sentence[i]], (a, sentence[i]))]
        return [
            (rule[a][b][c] + sl + sr, (a, tl, tr))
            for j in range(i + 1, k)
            for b in labels
            for c in labels
            for sl, tl in trees(i, j, b)
            for sr, tr in trees(j, k, c)
        ]

    return trees(0, len(sentence), root)


def tree_score(tree: Tree, binary: Tensor, lexical: Tensor) -> float:
    """The log probability of one tree, rule by rule."""
    if len(tree) == 2:
        a, w = tree
        return float(lexical[a, w])
    a, left, right = tree
    rule = float(binary[a, left[0], right[0]])
    return rule + tree_score(left, binary, lexical) + tree_score(right, binary, lexical)


def untied(ranked: list[float], n: int) -> list[int]:
    """The ranks among the first ``n`` of a sorted score list whose score no neighbour shares.

    Equal scores of trees with the same rules differ by rounding only (float64 sums of a dozen
    terms: ~1e-15); distinct ones, with random rule scores, by far more than 1e-9.
    """
    near = [abs(a - b) <= 1e-9 for a, b in zip(ranked, ranked[1:])]  # near[j]: j ties j + 1
    return [j for j in range(n) if not (j > 0 and near[j - 1]) and not (j < len(near) and near[j])]


def show(tree: Tree) -> str:
    """A bracketed tree: ``(A0 (A1 w2) (A2 w0))``."""
    if len(tree) == 2:
        return f"(A{tree[0]} w{tree[1]})"
    return f"(A{tree[0]} {show(tree[1])} {show(tree[2])})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    nonterminals, words, longest, k = (3, 4, 4, 5) if args.small else (3, 5, 5, 10)
    binary, lexical = random_grammar(nonterminals, words, gen)

    ties = 0  # tied trees among the k best, over all sentences and roots
    for length in range(1, longest + 1):
        sentence = torch.randint(words, (length,), generator=gen).tolist()
        scores, trees = kbest_parse(binary, lexical, sentence, k)
        counts = []
        for root in range(nonterminals):
            every = sorted(all_trees(binary, lexical, sentence, root), key=lambda st: -st[0])
            counts.append(len(every))
            found = [t for t in trees[root] if t is not None]
            best = every[:k]
            where = f"length {length}, root A{root}"
            check(
                len(found) == len(best) and bool((scores[root, len(found) :] == -math.inf).all()),
                f"{where}: min(k, {len(every)} trees) = {len(best)} trees, the rest -inf",
            )
            check(
                close(scores[root, : len(found)], [s for s, _ in best]),
                f"{where}: the {len(best)} best scores equal brute force",
            )
            known = {t: s for s, t in every}
            check(
                len(set(found)) == len(found)
                and all(t in known for t in found)
                and close(scores[root, : len(found)], [known.get(t, math.nan) for t in found]),
                f"{where}: they are distinct trees of the sentence, with those scores",
            )
            alone = untied([s for s, _ in every], len(best))
            check(
                all(found[j] == best[j][1] for j in alone),
                f"{where}: the untied trees ({len(alone)} of {len(best)}) equal brute force's",
            )
            ties += len(best) - len(alone)
        print(f"sentence {sentence}: {counts} trees per root nonterminal")

    print(f"{ties} of the trees found were tied with a neighbour in the ranking")
    # The last sentence's best trees, rooted at A0.
    for slot, tree in enumerate(trees[0][:5]):
        assert tree is not None
        print(f"  #{slot + 1}  {scores[0, slot].item():8.4f}  {show(tree)}")


if __name__ == "__main__":
    main()
