"""CKY parsing with a PCFG: the inside algorithm and the best parse, as semiring einsums.

A probabilistic context-free grammar in Chomsky normal form has binary rules ``A -> B C`` and
lexical rules ``A -> w``.  The CKY chart holds, for every span ``i:k`` of the sentence and every
nonterminal ``A``, a sum over all ways of building the span from two smaller ones:

    chart[i, k, A] = ⊕_{j, B, C}  rule[A, B, C] ⊗ chart[i, j, B] ⊗ chart[j, k, C]

which is one three-operand einsum per span width, ``"abc,isb,isc->ia"`` (``i`` = span start,
``s`` = split point).  The same code gives

* the **inside algorithm** (log semiring, :func:`semiring_einsum.func.log_einsum`): the log
  probability of the sentence, summed over all its parse trees;
* the **best parse** (max-plus, :func:`semiring_einsum.func.viterbi_einsum`): the score of the
  most probable tree, and the tree itself from the argmax backpointers;
* **expected rule counts** (the outside algorithm, for free): the gradient of the inside log
  probability with respect to the log rule probabilities.

Every answer is checked against brute-force enumeration of all parse trees of short sentences.

    python examples/cky.py            # default sizes
    python examples/cky.py --small    # what the test suite runs

The script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch

from semiring_einsum import func

Tensor = torch.Tensor
Tree = tuple  # (A, word) for a leaf, (A, left, right) for a binary node
ROOT = 0
EQUATION = "abc,isb,isc->ia"  # rule[A,B,C], left[start, split, B], right[start, split, C]


def check(ok: bool, what: str) -> None:
    """Stop with a non-zero exit status if a check fails."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")
    print(f"ok: {what}")


def close(a: object, b: object) -> bool:
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


def chart_parse(
    contract: Callable[[Tensor, Tensor, Tensor], Tensor],
    binary: Tensor,
    lexical: Tensor,
    sentence: list[int],
) -> dict[tuple[int, int], Tensor]:
    """Fill the CKY chart bottom-up: ``chart[i, k]`` is a vector over nonterminals.

    ``contract(rule, left, right)`` combines, for every span of one width at once, its left
    and right children over all split points.
    """
    n = len(sentence)
    chart = {(i, i + 1): lexical[:, w] for i, w in enumerate(sentence)}
    for width in range(2, n + 1):
        starts = range(n - width + 1)
        # left[i, s] = chart[i, i+s+1], right[i, s] = chart[i+s+1, i+width]
        left = torch.stack(
            [torch.stack([chart[i, i + s] for s in range(1, width)]) for i in starts]
        )
        right = torch.stack(
            [torch.stack([chart[i + s, i + width] for s in range(1, width)]) for i in starts]
        )
        spans = contract(binary, left, right)  # starts x nonterminals
        for i in starts:
            chart[i, i + width] = spans[i]
    return chart


def inside(binary: Tensor, lexical: Tensor, sentence: list[int]) -> Tensor:
    """log p(sentence): the log semiring."""
    chart = chart_parse(lambda *xs: func.log_einsum(EQUATION, *xs), binary, lexical, sentence)
    return chart[0, len(sentence)][ROOT]


def best_score(binary: Tensor, lexical: Tensor, sentence: list[int]) -> Tensor:
    """The log probability of the best tree: the max-plus semiring."""
    chart = chart_parse(lambda *xs: func.max_einsum(EQUATION, *xs), binary, lexical, sentence)
    return chart[0, len(sentence)][ROOT]


def best_tree(binary: Tensor, lexical: Tensor, sentence: list[int]) -> tuple[Tensor, Tree]:
    """The best tree and its score, from Viterbi backpointers."""
    pointers: dict[int, Tensor] = {}

    def viterbi(rule: Tensor, left: Tensor, right: Tensor) -> Tensor:
        values, argmax = func.viterbi_einsum(EQUATION, rule, left, right)
        # argmax[i, A] = (B, C, s): the summed indices in order of first appearance
        pointers[left.shape[1] + 1] = argmax  # keyed by span width
        return values

    n = len(sentence)
    chart = chart_parse(viterbi, binary, lexical, sentence)

    def build(i: int, k: int, a: int) -> Tree:
        if k == i + 1:
            return (a, sentence[i])
        b, c, s = pointers[k - i][i, a].tolist()
        j = i + s + 1
        return (a, build(i, j, b), build(j, k, c))

    return chart[0, n][ROOT], build(0, n, ROOT)


def expected_rule_counts(binary: Tensor, lexical: Tensor, sentence: list[int]) -> Tensor:
    """E[count of A -> B C] under p(tree | sentence) = d log p(sentence) / d binary."""
    binary = binary.detach().requires_grad_()
    (counts,) = torch.autograd.grad(inside(binary, lexical, sentence), binary)
    return counts


# ----------------------------------------------------------------------------- brute force
def all_trees(binary: Tensor, lexical: Tensor, sentence: list[int]) -> list[tuple[float, Tree]]:
    """Every tree over the sentence rooted at ROOT, with its log probability."""
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

    return trees(0, len(sentence), ROOT)


def add_rule_counts(tree: Tree, weight: float, counts: list[list[list[float]]]) -> None:
    """Add ``weight`` to ``counts[A][B][C]`` for every binary rule ``A -> B C`` of ``tree``."""
    if len(tree) == 3:
        a, left, right = tree
        counts[a][left[0]][right[0]] += weight
        add_rule_counts(left, weight, counts)
        add_rule_counts(right, weight, counts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    nonterminals, words, longest = (3, 4, 4) if args.small else (3, 5, 5)
    binary, lexical = random_grammar(nonterminals, words, gen)

    # How one chart step (3 starts x 2 split points) is contracted: pairwise, in windows.
    shape = (3, 2, nonterminals)
    print(func.plan(EQUATION, binary, shape, shape, semiring=func.LOG))

    for length in range(1, longest + 1):
        sentence = torch.randint(words, (length,), generator=gen).tolist()
        trees = all_trees(binary, lexical, sentence)
        scores = torch.tensor([s for s, _ in trees], dtype=torch.float64)
        log_z, best = scores.logsumexp(0), scores.max()
        print(f"sentence {sentence}: {len(trees)} trees")

        check(close(inside(binary, lexical, sentence), log_z), "inside equals log-sum-exp of trees")
        check(close(best_score(binary, lexical, sentence), best), "max-plus equals best tree score")
        score, tree = best_tree(binary, lexical, sentence)
        check(close(score, best), "Viterbi best score equals brute force")
        check(
            tree == trees[int(scores.argmax())][1], f"Viterbi best tree equals brute force {tree}"
        )

        if length == 1:
            continue  # no binary rule is used
        expected = torch.zeros_like(binary).tolist()
        for weight, (_, t) in zip((scores - log_z).exp().tolist(), trees):
            add_rule_counts(t, weight, expected)
        counts = expected_rule_counts(binary, lexical, sentence)
        check(
            close(counts, expected),
            "expected rule counts (d inside / d rules) equal brute force",
        )


if __name__ == "__main__":
    main()
