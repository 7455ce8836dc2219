"""Exact samples of parse trees from a PCFG, with one ``sample_einsum`` per span width.

A probabilistic context-free grammar in Chomsky normal form (binary rules ``A -> B C``, lexical
rules ``A -> w``) gives each parse tree of a sentence the product of its rules' probabilities;
normalised by the inside probability of the sentence, that is ``p(tree | sentence)``.  To draw
trees from it, sample top-down: the root span ``0:n`` with label ``ROOT`` picks its rule and
split point, then each child span does the same given its label, down to the words.  The choice
at a span ``i:k`` with label ``A`` is

    p(B, C, j | i:k, A)  ∝  rule[A, B, C] · inside[i:j, B] · inside[j:k, C]

-- exactly the terms of the CKY inside einsum for that cell (see ``examples/cky.py``).  With the
chart of one span width stacked over start ``i`` and split ``s`` (``j = i + s + 1``), the terms
of every cell ``(i, A)`` of the width are those of ``"abc,isb,isc->ia"``, and

    draws = func.sample_einsum("abc,isb,isc->ia", rule, left, right, num_samples=m)

draws ``m`` independent assignments ``(b, c, s)`` of the summed indices for every cell: shape
``[start, A, m, 3]``.

Why do these draws make trees?  Tree number ``t`` takes draw ``t`` of each cell it visits: the
root's cell first, then the cells of the child spans it names, and so on.  Every node's choice
then follows the right conditional distribution given its span and label, and a tree visits a
cell at most once (its spans are all different), so its choices are independent draws: tree
``t`` is an exact sample of ``p(tree | sentence)``.  Different trees use different draws, so
they are independent of each other.  (Cells that tree ``t`` does not visit are drawn and not
used: the price of drawing every cell of a width in one batched call.)

The script draws 20000 trees (100000 at full size), reproducibly from a ``torch.Generator``, and
compares the empirical frequency of each tree with its exact probability from brute-force
enumeration of every tree:

* a chi-square goodness-of-fit test over the trees (the rare ones pooled), whose p-value must
  not be tiny -- and which does reject the probabilities of a slightly different grammar, so
  that it has the power to notice a wrong sampler;
* the deviation of each tree's frequency from its probability, against a Bernstein bound;
* that every sampled tree is a tree of the sentence, and that the same seed gives the same
  trees.

    python examples/sample_parses.py            # default sizes
    python examples/sample_parses.py --small    # what the test suite runs

The script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections import Counter

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


# ----------------------------------------------------------------------------- sampling
def sample_trees(
    binary: Tensor, lexical: Tensor, sentence: list[int], num: int, generator: torch.Generator
) -> Tensor:
    """``num`` independent trees of ``p(tree | sentence)`` rooted at ROOT.

    A binary tree over the sentence is its set of labelled spans, so tree ``t`` is returned as
    ``labels[t, i, k]``: the label of span ``i:k`` if it is a constituent of the tree, else -1.
    """
    n = len(sentence)
    # The inside chart: chart[i, k][A] = log Σ over trees of span i:k rooted at A.
    chart = {(i, i + 1): lexical[:, w] for i, w in enumerate(sentence)}
    draws: dict[int, Tensor] = {}  # per width: [start, A, sample, (b, c, s)]
    for width in range(2, n + 1):
        starts = range(n - width + 1)
        left = torch.stack(
            [torch.stack([chart[i, i + s] for s in range(1, width)]) for i in starts]
        )
        right = torch.stack(
            [torch.stack([chart[i + s, i + width] for s in range(1, width)]) for i in starts]
        )
        spans = func.log_einsum(EQUATION, binary, left, right)  # [start, A]
        for i in starts:
            chart[i, i + width] = spans[i]
        # The summed indices b, c, s of every cell (i, A), in order of first appearance.
        draws[width] = func.sample_einsum(
            EQUATION, binary, left, right, num_samples=num, generator=generator
        )

    # Top-down, all trees at once: a constituent's draw names its children's spans and labels.
    labels = torch.full((num, n, n + 1), -1, dtype=torch.int64)
    labels[:, 0, n] = ROOT
    tree = torch.arange(num)
    for width in range(n, 1, -1):
        for i in range(n - width + 1):
            a = labels[:, i, i + width]
            here = a >= 0  # the trees that have span i:i+width
            b, c, s = draws[width][i, a.clamp(min=0), tree].unbind(-1)  # draw t of cell (i, a)
            j = i + s + 1
            labels[tree[here], i, j[here]] = b[here]
            labels[tree[here], j[here], i + width] = c[here]
    return labels


# ----------------------------------------------------------------------------- brute force
def tree_probabilities(binary: Tensor, lexical: Tensor, sentence: list[int]) -> dict[Tree, float]:
    """``p(tree | sentence)`` of every tree rooted at ROOT, by enumeration."""
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

    every = trees(0, len(sentence), ROOT)
    log_z = torch.tensor([s for s, _ in every], dtype=torch.float64).logsumexp(0).item()
    return {t: math.exp(s - log_z) for s, t in every}


def labelled_spans(tree: Tree, n: int) -> tuple[int, ...]:
    """A tree as :func:`sample_trees` encodes it: ``labels[i, k]`` flattened, -1 for no span."""
    labels = [[-1] * (n + 1) for _ in range(n)]

    def visit(node: Tree, i: int) -> int:  # returns where the node's span ends
        if len(node) == 2:
            labels[i][i + 1] = node[0]
            return i + 1
        k = visit(node[2], visit(node[1], i))
        labels[i][k] = node[0]
        return k

    visit(tree, 0)
    return tuple(x for row in labels for x in row)


def show(tree: Tree) -> str:
    """A bracketed tree: ``(A0 (A1 w2) (A2 w0))``."""
    if len(tree) == 2:
        return f"(A{tree[0]} w{tree[1]})"
    return f"(A{tree[0]} {show(tree[1])} {show(tree[2])})"


def chi_square(
    counts: Counter[tuple[int, ...]], probabilities: dict[tuple[int, ...], float]
) -> tuple[float, int, float]:
    """Pearson's statistic, its degrees of freedom and p-value.

    Trees expected fewer than 5 times are pooled into one bin (the usual rule for the
    chi-square approximation to hold); the p-value is the regularised upper incomplete gamma
    function, the chi-square survival function.
    """
    total = sum(counts.values())
    observed: list[float] = []
    expected: list[float] = []
    rare_observed, rare_expected = 0.0, 0.0
    for tree, p in probabilities.items():
        if total * p >= 5:
            observed.append(counts[tree])
            expected.append(total * p)
        else:
            rare_observed += counts[tree]
            rare_expected += total * p
    if rare_expected >= 5:
        observed.append(rare_observed)
        expected.append(rare_expected)
    # (if the rare bin is still too small it is left out: a test of the remaining bins)
    obs = torch.tensor(observed, dtype=torch.float64)
    exp = torch.tensor(expected, dtype=torch.float64)
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(observed) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(stat / 2)))
    return stat, dof, p_value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    nonterminals, words, length, num = (3, 4, 4, 20_000) if args.small else (3, 5, 5, 100_000)
    binary, lexical = random_grammar(nonterminals, words, gen)
    sentence = torch.randint(words, (length,), generator=gen).tolist()

    trees = tree_probabilities(binary, lexical, sentence)
    probabilities = {labelled_spans(t, length): p for t, p in trees.items()}
    samples = sample_trees(binary, lexical, sentence, num, torch.Generator().manual_seed(1))
    found, times = samples.reshape(num, -1).unique(dim=0, return_counts=True)
    counts = Counter(dict(zip(map(tuple, found.tolist()), times.tolist())))
    print(
        f"sentence {sentence}: {len(probabilities)} trees; {num} samples, "
        f"{len(counts)} distinct trees drawn"
    )
    check(len(probabilities) == len(trees), "a tree is determined by its labelled spans")
    check(all(t in probabilities for t in counts), "every sampled tree is a tree of the sentence")
    again = sample_trees(binary, lexical, sentence, num, torch.Generator().manual_seed(1))
    other = sample_trees(binary, lexical, sentence, num, torch.Generator().manual_seed(2))
    check(
        torch.equal(again, samples) and not torch.equal(other, samples),
        "the same seed gives the same trees, another seed others",
    )

    # The most likely trees, drawn and exact.
    for tree, p in sorted(trees.items(), key=lambda tp: -tp[1])[:5]:
        drawn = counts[labelled_spans(tree, length)] / num
        print(f"  p = {p:.4f}, drawn {drawn:.4f}  {show(tree)}")

    # Goodness of fit.  A correct sampler gives a p-value below 1e-3 one time in a thousand.
    # The seed fixes the draws, so a run passes or fails for good -- until a new version of
    # sample_einsum uses its random numbers differently, which redraws everything.
    stat, dof, p_value = chi_square(counts, probabilities)
    check(p_value > 1e-3, f"chi-square {stat:.1f} on {dof} degrees of freedom, p = {p_value:.3f}")
    # The test's power: the same draws against a grammar whose rule log-probabilities are off by
    # about 0.1 (renormalised), which a sampler from the wrong distribution might resemble.
    noise = 0.1 * torch.randn(binary.shape, generator=gen, dtype=torch.float64)
    off = (binary + noise).exp()
    scale = off.sum((1, 2)) + lexical.exp().sum(1)
    wrong_trees = tree_probabilities(
        (off / scale[:, None, None]).log(), lexical - scale.log()[:, None], sentence
    )
    wrong = {labelled_spans(t, length): p for t, p in wrong_trees.items()}
    stat, dof, p_value = chi_square(counts, wrong)
    check(
        p_value < 1e-3, f"against a slightly different grammar the test rejects (p = {p_value:.1e})"
    )

    # Every frequency near its probability.  Bernstein's inequality for the mean f of n draws
    # of a 0/1 variable of mean p and variance v = p(1 - p):
    #     P(|f - p| >= ε) <= 2 exp(-n ε² / (2 v + 2 ε / 3)),
    # which is δ / (number of trees) at the ε below; by the union bound a correct sampler puts
    # some tree outside its ε with probability at most δ = 1e-6.
    log_term = math.log(2 * len(probabilities) / 1e-6)
    ratios = []
    for t, p in probabilities.items():
        v = p * (1 - p)
        eps = (log_term / 3 + math.sqrt(log_term**2 / 9 + 2 * num * v * log_term)) / num
        ratios.append(abs(counts[t] / num - p) / eps)
    check(
        max(ratios) <= 1,
        f"every tree's |frequency - probability| within its Bernstein bound "
        f"(the largest at {max(ratios):.2f} of it)",
    )


if __name__ == "__main__":
    main()
