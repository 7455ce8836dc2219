"""The k best state sequences of a hidden Markov model, from one k-best einsum over the chain.

An HMM gives every state sequence ``s_0 .. s_{T-1}`` of an observation sequence ``x`` the score

    log p(s, x) = [log π(s_0) + log B(s_0, x_0)] + Σ_{t ≥ 1} [log A(s_{t-1}, s_t) + log B(s_t, x_t)]

one factor per time step once the emission of ``x_t`` is folded into the step's transition
matrix.  Written as an einsum over the whole chain, with one letter per time step,

    "za,zab,zbc,zcd,...->z"        (z = which sequence of the batch)

each term of the max-plus contraction is the score of one state sequence, and the summed
indices ``a, b, c, ...`` *are* the state sequence.  Viterbi decoding asks for the best term;
:func:`semiring_einsum.func.kbest_einsum` returns the ``k`` best terms of every output cell and
the assignments that reach them: the ``k`` most likely state sequences and their scores, in one
call.  It runs on the pairwise plan, step by step along the chain, keeping the ``k`` best partial
sequences of every cell -- the list Viterbi algorithm, without writing it.

Ties are ordered as a brute-force enumeration would order them: by score, then by the first
sequence in row-major order of the summed indices (lexicographic order of ``(s_0, s_1, ...)``),
and ``k = 1`` is :func:`semiring_einsum.func.viterbi_einsum`.

The script checks

* the ``k`` paths and scores against brute-force enumeration of every state sequence;
* the order of tied paths, on an HMM with integer scores made to have ties;
* ``k = 1`` against ``viterbi_einsum``, value and path;
* that the gradient of the ``j``-th score with respect to the emission scores marks path ``j``;
* on a larger HMM, the ``k`` best paths against a list Viterbi written in plain torch.

``kbest_einsum`` orders ties by the row-major rank of every assignment, a 64-bit integer: with
``2**55`` or more state sequences (``S**T``: 8 states and 19 steps) ties come in the plan's own
order instead, and the lists are still the ``k`` best; the script checks a chain that long too.

    python examples/kbest_hmm.py            # default sizes
    python examples/kbest_hmm.py --small    # what the test suite runs

The script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import itertools
import string

import torch

from semiring_einsum import func

Tensor = torch.Tensor
K = 5
STATE_LETTERS = string.ascii_letters.replace("z", "")  # "z" is the batch index


def check(ok: bool, what: str) -> None:
    """Stop with a non-zero exit status if a check fails."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")
    print(f"ok: {what}")


def close(a: Tensor, b: Tensor) -> bool:
    # float64 sums of a few dozen terms, added in different orders: agree to ~1e-15 relative.
    return torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def random_hmm(
    states: int, symbols: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Log initial, transition and emission probabilities of a random HMM (float64)."""

    def log_distribution(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, dtype=torch.float64).add(0.1).log_softmax(-1)

    return (
        log_distribution(states),
        log_distribution(states, states),
        log_distribution(states, symbols),
    )


def potentials(log_init: Tensor, log_emit: Tensor, observations: Tensor) -> Tensor:
    """Per-step emission scores ``u[b, t, s]`` of ``x_t`` (plus the start at t = 0)."""
    u = log_emit.T[observations]  # batch x time x states
    return torch.cat([u[:, :1] + log_init, u[:, 1:]], dim=1)


# ----------------------------------------------------------------------------- the chain einsum
def chain(u: Tensor, log_trans: Tensor) -> tuple[str, list[Tensor]]:
    """The chain equation ``"za,zab,zbc,...->z"`` and its factors, emissions folded in.

    Factor 0 is ``u[:, 0]`` (start and first emission); factor t is
    ``log_trans[s_{t-1}, s_t] + u[:, t, s_t]``.
    """
    steps = u.shape[1]
    if steps > len(STATE_LETTERS):
        raise ValueError(f"{steps} steps: at most {len(STATE_LETTERS)} letters for the states")
    s = STATE_LETTERS
    equation = ",".join(["z" + s[0]] + [f"z{s[t - 1]}{s[t]}" for t in range(1, steps)]) + "->z"
    factors = [u[:, 0]] + [log_trans + u[:, t, None, :] for t in range(1, steps)]
    return equation, factors


def kbest_paths(u: Tensor, log_trans: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Scores ``[batch, k]`` and state sequences ``[batch, k, T]`` of the k best paths."""
    equation, factors = chain(u, log_trans)
    # Row [z, j] of the assignments holds the summed indices a, b, c, ... in order: the states
    # of the j-th best path of sequence z, step by step.
    return func.kbest_einsum(equation, *factors, k=k)


# ----------------------------------------------------------------------------- independent checks
def path_scores(u: Tensor, log_trans: Tensor, paths: Tensor) -> Tensor:
    """The score of each path: ``paths`` is ``[..., T]`` (shared) or ``[batch, ..., T]``."""
    steps = u.shape[1]
    if paths.dim() == 2:  # the same paths for every batch element
        paths = paths.expand(u.shape[0], *paths.shape)
    emissions = torch.stack([u[b, torch.arange(steps), p] for b, p in enumerate(paths)])
    return emissions.sum(-1) + log_trans[paths[..., :-1], paths[..., 1:]].sum(-1)


def brute_force(u: Tensor, log_trans: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best paths by enumerating every state sequence and sorting.

    ``itertools.product`` lists the sequences in row-major order; sorting by (-score, position)
    puts tied sequences in that order.
    """
    batch, steps, states = u.shape
    paths = torch.tensor(list(itertools.product(range(states), repeat=steps)))  # P x T
    scores = path_scores(u, log_trans, paths)  # batch x P
    values, best = [], []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda p: (-row[p], p))[:k]
        values.append([row[p] for p in order])
        best.append(paths[order])
    return torch.tensor(values, dtype=u.dtype), torch.stack(best)


def list_viterbi(u: Tensor, log_trans: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The textbook list Viterbi algorithm in plain torch: k best partial paths per state.

    ``delta[b, s, r]`` is the score of the r-th best path ending in state s at step t (-inf
    while there are fewer than r + 1 such paths); a new path into state j extends one of the
    ``S * k`` paths of step t - 1.  Back-pointers keep the previous (state, rank) of each.
    """
    batch, steps, states = u.shape
    delta = torch.full((batch, states, k), float("-inf"), dtype=u.dtype)
    delta[:, :, 0] = u[:, 0]
    pointers = []
    for t in range(1, steps):
        # cand[b, j, i, r] = delta[b, i, r] + A[i, j] + u[b, t, j]
        cand = delta[:, None, :, :] + log_trans.T[None, :, :, None] + u[:, t, :, None, None]
        delta, which = cand.reshape(batch, states, states * k).topk(k, dim=-1)  # i * k + r
        pointers.append(which)
    values, which = delta.reshape(batch, states * k).topk(k, dim=-1)
    state, rank = which // k, which % k  # batch x k, at the last step
    path = [state]
    for which in reversed(pointers):
        back = which.gather(1, state[:, :, None].expand(-1, -1, k))  # batch x k x k
        previous = back.gather(2, rank[:, :, None])[..., 0]
        state, rank = previous // k, previous % k
        path.append(state)
    return values, torch.stack(path[::-1], dim=-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)

    # A tiny HMM, small enough to enumerate every state sequence.
    states, symbols, steps, batch = (3, 4, 5, 2) if args.small else (4, 5, 7, 3)
    log_init, log_trans, log_emit = random_hmm(states, symbols, gen)
    x = torch.randint(symbols, (batch, steps), generator=gen)
    u = potentials(log_init, log_emit, x)
    print(f"{states} states, {steps} steps: {states**steps} state sequences enumerated")
    values, paths = kbest_paths(u, log_trans, K)
    bf_values, bf_paths = brute_force(u, log_trans, K)
    check(close(values, bf_values), f"the {K} best scores equal brute force")
    check(torch.equal(paths, bf_paths), f"the {K} best state sequences equal brute force")
    check(close(values, path_scores(u, log_trans, paths)), "each score is its path's score")
    for j, (score, path) in enumerate(zip(values[0].tolist(), paths[0].tolist())):
        print(f"  #{j + 1}: log p(s, x) = {score:8.4f}  s = {path}")

    # Ties on purpose: integer scores (exact in float64) and few of them, so many paths tie.
    u_int = torch.randint(-2, 1, u.shape, generator=gen).double()
    trans_int = torch.randint(-2, 1, log_trans.shape, generator=gen).double()
    values, paths = kbest_paths(u_int, trans_int, K)
    bf_values, bf_paths = brute_force(u_int, trans_int, K)
    ties = int((values[:, 1:] == values[:, :-1]).sum())
    check(ties > 0, f"integer scores put ties among the {K} best ({ties} adjacent equal pairs)")
    cut = brute_force(u_int, trans_int, K + 1)[0]
    check(
        bool((cut[:, K] == cut[:, K - 1]).any()),
        f"and a tie straddles the cut: the {K + 1}th best path ties with the {K}th",
    )
    check(torch.equal(values, bf_values), "tied scores equal brute force exactly")
    check(torch.equal(paths, bf_paths), "tied paths come in row-major (lexicographic) order")
    print(f"  tied scores of sequence 0: {values[0].tolist()}")
    print(f"  their paths: {paths[0].tolist()}")

    # k = 1 is Viterbi, value and path (with its own tie rule).
    for name, (uu, tt) in {"random": (u, log_trans), "tied": (u_int, trans_int)}.items():
        equation, factors = chain(uu, tt)
        best, argmax = func.viterbi_einsum(equation, *factors)
        one, one_path = func.kbest_einsum(equation, *factors, k=1)
        check(
            torch.equal(one[:, 0], best) and torch.equal(one_path[:, 0], argmax),
            f"k = 1 equals viterbi_einsum ({name} scores)",
        )

    # The scores are differentiable: d score_j / d u is the one-hot of path j.
    u_grad = u.detach().requires_grad_()
    values, paths = kbest_paths(u_grad, log_trans, K)
    marks_path = True
    for j in range(K):
        (grad,) = torch.autograd.grad(values[:, j].sum(), u_grad, retain_graph=True)
        one_hot = torch.nn.functional.one_hot(paths[:, j], states).to(grad.dtype)
        marks_path = marks_path and torch.equal(grad, one_hot)
    check(marks_path, "the gradient of the j-th score marks the states of the j-th path")

    # A larger HMM, too big to enumerate: against list Viterbi in plain torch.
    states, symbols, steps, batch = (5, 6, 10, 3) if args.small else (8, 10, 18, 8)
    log_init, log_trans, log_emit = random_hmm(states, symbols, gen)
    x = torch.randint(symbols, (batch, steps), generator=gen)
    u = potentials(log_init, log_emit, x)
    values, paths = kbest_paths(u, log_trans, K)
    lv_values, lv_paths = list_viterbi(u, log_trans, K)
    print(f"{states} states, {steps} steps: {float(states) ** steps:.2e} state sequences")
    check(close(values, lv_values), f"the {K} best scores equal list Viterbi")
    check(torch.equal(paths, lv_paths), f"the {K} best state sequences equal list Viterbi")
    check(bool((values[:, 1:] <= values[:, :-1]).all()), "scores come best first")
    distinct = all(len({tuple(p) for p in row}) == K for row in paths.tolist())
    check(distinct, f"the {K} paths of each sequence are distinct")

    # Past 2**55 state sequences the int64 ranks give out: ties then come in the plan's
    # own order, but the lists are still the k best (random scores: no ties to order).
    steps = next(t for t in itertools.count(1) if states**t >= 2**55) + 4
    x = torch.randint(symbols, (batch, steps), generator=gen)
    u = potentials(log_init, log_emit, x)
    values, paths = kbest_paths(u, log_trans, K)
    lv_values, _ = list_viterbi(u, log_trans, K)
    print(f"{states} states, {steps} steps: {float(states) ** steps:.2e} state sequences")
    check(close(values, lv_values), f"past 2**55 sequences, the {K} best scores equal list Viterbi")
    # (The paths themselves may differ from list Viterbi's where two scores differ only by
    # rounding: each is checked to reach its own score, and to be distinct.)
    check(close(path_scores(u, log_trans, paths), values), "... each path reaches its score")
    distinct = all(len({tuple(p) for p in row}) == K for row in paths.tolist())
    check(distinct, f"... and the {K} paths of each sequence are distinct")


if __name__ == "__main__":
    main()
