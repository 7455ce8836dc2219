"""Hidden Markov models: forward algorithm, Viterbi decoding and posterior marginals.

Three classic HMM computations, each one semiring einsum per time step:

* the **forward algorithm** (log semiring, :func:`semiring_einsum.func.log_einsum`) gives the
  log-likelihood ``log p(x)`` of an observation sequence;
* **Viterbi decoding** (max-plus with backpointers, :func:`semiring_einsum.func.viterbi_einsum`)
  gives the most likely state sequence and its score;
* **posterior marginals** ``p(z_t = s | x)`` are the gradient of ``log p(x)`` with respect to the
  per-step log-potentials -- no backward algorithm to write.

Every answer is checked against brute-force enumeration of all state sequences of a tiny HMM and,
for a larger batch, against a forward-backward written with plain ``torch.logsumexp``.

    python examples/hmm.py            # default sizes
    python examples/hmm.py --small    # what the test suite runs

The script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from semiring_einsum import func

Tensor = torch.Tensor


def check(ok: bool, what: str) -> None:
    """Stop with a non-zero exit status if a check fails."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")
    print(f"ok: {what}")


def close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def random_hmm(
    states: int, symbols: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Log initial, transition and emission probabilities of a random HMM (float64)."""

    def log_distribution(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, dtype=torch.float64).add(0.1).log_softmax(-1)

    init = log_distribution(states)
    return init, log_distribution(states, states), log_distribution(states, symbols)


def potentials(log_init: Tensor, log_emit: Tensor, observations: Tensor) -> Tensor:
    """Per-step log-potentials ``u[b, t, s]``: emission of ``x_t`` (plus the start at t = 0)."""
    u = log_emit.T[observations]  # batch x time x states
    return torch.cat([u[:, :1] + log_init, u[:, 1:]], dim=1)


# ----------------------------------------------------------------------------- forward algorithm
def log_partition(u: Tensor, log_trans: Tensor) -> Tensor:
    """``log p(x)`` per sequence: alpha_t[j] = log Σ_i exp(alpha_{t-1}[i] + A[i, j]) + u_t[j]."""
    alpha = u[:, 0]  # batch x states
    for t in range(1, u.shape[1]):
        alpha = func.log_einsum("bi,ij->bj", alpha, log_trans) + u[:, t]
    return func.log_einsum("bi->b", alpha)


# ----------------------------------------------------------------------------- Viterbi
def viterbi(u: Tensor, log_trans: Tensor) -> tuple[Tensor, Tensor]:
    """Best score and best state sequence per batch element (max-plus with backpointers)."""
    delta = u[:, 0]
    backpointers = []
    for t in range(1, u.shape[1]):
        # argmax[b, j, 0] is the best previous state i for state j at step t
        best, argmax = func.viterbi_einsum("bi,ij->bj", delta, log_trans)
        backpointers.append(argmax[..., 0])
        delta = best + u[:, t]
    score, last = func.viterbi_einsum("bi->b", delta)
    path = [last[:, 0]]
    for pointers in reversed(backpointers):
        path.append(pointers.gather(1, path[-1][:, None])[:, 0])
    return score, torch.stack(path[::-1], dim=1)


# ----------------------------------------------------------------------------- posteriors
def posteriors(u: Tensor, log_trans: Tensor) -> Tensor:
    """``p(z_t = s | x)`` as the gradient of log Z with respect to the log-potentials u[b, t, s]."""
    u = u.detach().requires_grad_()
    (marginals,) = torch.autograd.grad(log_partition(u, log_trans).sum(), u)
    return marginals


# ----------------------------------------------------------------------------- independent checks
def brute_force(u: Tensor, log_trans: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log Z, best score, best path and posteriors by enumerating every state sequence."""
    batch, steps, states = u.shape
    paths = torch.tensor(list(itertools.product(range(states), repeat=steps)))  # P x T
    scores = u[:, torch.arange(steps), paths].sum(-1)  # batch x P
    scores = scores + log_trans[paths[:, :-1], paths[:, 1:]].sum(-1)
    log_z = scores.logsumexp(-1)
    best, which = scores.max(-1)
    weights = (scores - log_z[:, None]).exp()  # batch x P
    one_hot = torch.nn.functional.one_hot(paths, states).to(u.dtype)  # P x T x S
    marginals = torch.einsum("bp,pts->bts", weights, one_hot)
    return log_z, best, paths[which], marginals


def forward_backward(u: Tensor, log_trans: Tensor) -> tuple[Tensor, Tensor]:
    """log Z and posteriors with plain ``torch.logsumexp`` (the textbook recursions)."""
    steps = u.shape[1]
    alphas = [u[:, 0]]
    for t in range(1, steps):
        alphas.append((alphas[-1][:, :, None] + log_trans).logsumexp(1) + u[:, t])
    betas = [torch.zeros_like(u[:, 0])]
    for t in range(steps - 1, 0, -1):
        betas.append((log_trans + u[:, t, None, :] + betas[-1][:, None, :]).logsumexp(2))
    betas.reverse()
    alpha, beta = torch.stack(alphas, 1), torch.stack(betas, 1)
    log_z = alphas[-1].logsumexp(-1)
    return log_z, (alpha + beta - log_z[:, None, None]).exp()


def max_product(u: Tensor, log_trans: Tensor) -> Tensor:
    """The best path score with plain ``torch.amax`` (max-product recursion)."""
    delta = u[:, 0]
    for t in range(1, u.shape[1]):
        delta = (delta[:, :, None] + log_trans).amax(1) + u[:, t]
    return delta.amax(-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)

    # A tiny HMM, small enough to enumerate every state sequence.
    states, symbols, steps, batch = (3, 4, 5, 2) if args.small else (4, 5, 7, 4)
    log_init, log_trans, log_emit = random_hmm(states, symbols, gen)
    x = torch.randint(symbols, (batch, steps), generator=gen)
    u = potentials(log_init, log_emit, x)

    log_z = log_partition(u, log_trans)
    score, path = viterbi(u, log_trans)
    marginals = posteriors(u, log_trans)
    bf_log_z, bf_score, bf_path, bf_marginals = brute_force(u, log_trans)
    print(f"{states} states, {steps} steps: {states**steps} state sequences enumerated")
    check(close(log_z, bf_log_z), "forward algorithm: log p(x) equals brute force")
    check(close(score, bf_score), "Viterbi: best score equals brute force")
    check(torch.equal(path, bf_path), "Viterbi: best state sequence equals brute force")
    check(close(marginals, bf_marginals), "posteriors: d log Z / d u equals brute force")
    ones = torch.ones(batch, steps, dtype=torch.float64)
    check(close(marginals.sum(-1), ones), "posteriors: each step's marginals sum to one")

    # A bigger batch, checked against forward-backward in plain torch.
    states, symbols, steps, batch = (6, 5, 12, 3) if args.small else (32, 20, 60, 16)
    log_init, log_trans, log_emit = random_hmm(states, symbols, gen)
    x = torch.randint(symbols, (batch, steps), generator=gen)
    u = potentials(log_init, log_emit, x)
    fb_log_z, fb_marginals = forward_backward(u, log_trans)
    check(close(log_partition(u, log_trans), fb_log_z), "forward algorithm equals forward-backward")
    check(close(posteriors(u, log_trans), fb_marginals), "posteriors equal forward-backward")
    score, path = viterbi(u, log_trans)
    rescored = u.gather(2, path[..., None])[..., 0].sum(1)
    rescored = rescored + log_trans[path[:, :-1], path[:, 1:]].sum(1)
    check(close(score, rescored), "Viterbi score equals the score of the decoded path")
    check(close(score, max_product(u, log_trans)), "Viterbi score equals a plain-torch recursion")
    print(f"log p(x) of the first sequence: {fb_log_z[0].item():.4f}")


if __name__ == "__main__":
    main()
