"""Entropy-regularised training of a linear-chain CRF, and expected transition counts.

A linear-chain conditional random field scores a label sequence ``y_0 .. y_{T-1}`` of an input
``x`` by

    score(y) = start[y_0] + Σ_t emit(x_t)[y_t] + Σ_{t ≥ 1} trans[y_{t-1}, y_t]

with ``emit(x_t) = W x_t + b``, and ``p(y | x) = exp(score(y)) / Z(x)``.  With the emissions
folded into the transition factors, all label sequences of a batch are the terms of one einsum
over the chain, one letter per position,

    "za,zab,zbc,...->z"      (z = which sentence)

so :func:`semiring_einsum.func.log_einsum` gives ``log Z`` and
:func:`semiring_einsum.func.entropy_einsum` gives ``(log Z, H)``, the entropy of ``p(y | x)``
over all ``L**T`` label sequences, in one pass, differentiably.

The training loss is the negative log-likelihood of the gold labels *minus* ``λ`` times the
entropy:

    loss = mean_z [ log Z(x_z) - score(y_z) ] - λ · mean_z H(p(· | x_z))

Subtracting the entropy rewards spread-out predictions: this is the *confidence penalty*
(Pereyra et al., 2017), a structured cousin of label smoothing, which keeps the model from
putting all its mass on one labelling of noisy training data.  (Adding ``+ λ H`` instead is
*entropy minimisation*, the semi-supervised trick of Grandvalet and Bengio (2005), which pushes
predictions on unlabelled data to be confident; the same call serves both.)  The script trains
with several ``λ`` and shows the entropy of the trained model growing with ``λ``.

:func:`semiring_einsum.func.expectation_einsum` computes expectations of additive features
under the same distribution: here the expected number of times each transition ``i -> j`` is
used, for all ``L * L`` transitions in one call (the transition is an extra batch index ``f`` of
the equation, ``"fza,fzab,fzbc,...->fz"``, its value factors one-hot in ``f``).

Checks, all against brute-force enumeration of every label sequence (float64):

* ``log Z`` and ``H`` at the initial and the trained parameters;
* the gradient of ``H``: :func:`torch.autograd.gradcheck` against finite differences, and the
  gradient of the whole regularised loss against autograd through the enumeration;
* the expected transition counts (and that they equal ``d log Z / d trans``);
* and training: the loss goes down for every ``λ``, and the entropy grows with ``λ``.

    python examples/entropy_crf.py            # default sizes
    python examples/entropy_crf.py --small    # what the test suite runs

The script exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import itertools
import string
from dataclasses import dataclass

import torch

from semiring_einsum import func

Tensor = torch.Tensor
LETTERS = string.ascii_letters.replace("z", "").replace("f", "")  # z: batch, f: feature


def check(ok: bool, what: str) -> None:
    """Stop with a non-zero exit status if a check fails."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")
    print(f"ok: {what}")


def close(a: Tensor, b: Tensor) -> bool:
    # float64 on both sides; the enumeration sums up to L**T terms in another order.
    return torch.allclose(a, b, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- data and model
def toy_data(
    batch: int, length: int, labels: int, features: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Label sequences from a sticky Markov chain, and noisy features that hint at the labels.

    ``x[z, t]`` is a fixed random direction for ``y[z, t]`` plus standard normal noise, so the
    labels are recoverable but not without error: a setting where confidence is worth taxing.
    """
    sticky = torch.full((labels, labels), 1.0).fill_diagonal_(float(labels))
    y = torch.empty(batch, length, dtype=torch.int64)
    y[:, 0] = torch.randint(labels, (batch,), generator=generator)
    for t in range(1, length):
        y[:, t] = torch.multinomial(sticky[y[:, t - 1]], 1, generator=generator)[:, 0]
    centres = torch.randn(labels, features, generator=generator, dtype=torch.float64)
    noise = torch.randn(batch, length, features, generator=generator, dtype=torch.float64)
    return centres[y] + noise, y


@dataclass
class CRF:
    """The parameters: start scores, transition scores and a linear emission layer."""

    start: Tensor  # [L]
    trans: Tensor  # [L, L]
    weight: Tensor  # [L, D]
    bias: Tensor  # [L]

    @classmethod
    def init(cls, labels: int, features: int, generator: torch.Generator) -> CRF:
        def small(*shape: int) -> Tensor:
            x = 0.1 * torch.randn(*shape, generator=generator, dtype=torch.float64)
            return x.requires_grad_()

        return cls(small(labels), small(labels, labels), small(labels, features), small(labels))

    def parameters(self) -> list[Tensor]:
        return [self.start, self.trans, self.weight, self.bias]

    def emissions(self, x: Tensor) -> Tensor:
        """``emit[z, t, l]``."""
        return x @ self.weight.T + self.bias


def chain(crf: CRF, x: Tensor) -> tuple[str, list[Tensor]]:
    """The chain equation ``"za,zab,zbc,...->z"`` and its factors, emissions folded in."""
    emit = crf.emissions(x)
    steps = emit.shape[1]
    s = LETTERS
    equation = ",".join(["z" + s[0]] + [f"z{s[t - 1]}{s[t]}" for t in range(1, steps)]) + "->z"
    factors = [crf.start + emit[:, 0]] + [crf.trans + emit[:, t, None, :] for t in range(1, steps)]
    return equation, factors


def gold_score(crf: CRF, x: Tensor, y: Tensor) -> Tensor:
    """``score(y)`` per sentence."""
    emit = crf.emissions(x).gather(2, y[..., None])[..., 0].sum(1)
    return crf.start[y[:, 0]] + emit + crf.trans[y[:, :-1], y[:, 1:]].sum(1)


def loss_and_entropy(crf: CRF, x: Tensor, y: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """The regularised loss and the mean entropy, from one ``entropy_einsum``."""
    equation, factors = chain(crf, x)
    log_z, entropy = func.entropy_einsum(equation, *factors)
    nll = (log_z - gold_score(crf, x, y)).mean()
    return nll - lam * entropy.mean(), entropy.mean()


def expected_transitions(crf: CRF, x: Tensor) -> Tensor:
    """``E[# t with y_{t-1} = i, y_t = j]`` per sentence, ``[batch, L, L]``, in one call.

    The feature ``f = (i, j)`` is an extra output index: every factor is broadcast along it, and
    the value of transition factor ``[f, z, a, b]`` is 1 where ``(a, b) = (i, j)``.
    """
    equation, factors = chain(crf, x)
    labels = crf.trans.shape[0]
    inputs = equation.split("->")[0].split(",")
    equation = ",".join("f" + term for term in inputs) + "->fz"
    logs = [factor.expand(labels * labels, *factor.shape) for factor in factors]
    one_hot = torch.eye(labels * labels, dtype=x.dtype).reshape(-1, 1, labels, labels)
    values = [torch.zeros(1, 1, 1, dtype=x.dtype)] + [one_hot] * (len(factors) - 1)
    _, counts = func.expectation_einsum(equation, logs, values)  # [L * L, batch]
    return counts.T.reshape(-1, labels, labels)


# ----------------------------------------------------------------------------- brute force
def enumerate_all(crf: CRF, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``log Z``, ``H`` and expected transition counts by listing every label sequence."""
    emit = crf.emissions(x)
    batch, steps, labels = emit.shape
    seqs = torch.tensor(list(itertools.product(range(labels), repeat=steps)))  # P x T
    scores = emit[:, torch.arange(steps), seqs].sum(-1)  # batch x P
    scores = scores + crf.start[seqs[:, 0]] + crf.trans[seqs[:, :-1], seqs[:, 1:]].sum(-1)
    log_z = scores.logsumexp(-1)
    log_p = scores - log_z[:, None]
    entropy = -(log_p.exp() * log_p).sum(-1)
    counts = torch.zeros(len(seqs), labels * labels, dtype=x.dtype)
    pairs = seqs[:, :-1] * labels + seqs[:, 1:]
    counts.scatter_add_(1, pairs, torch.ones(pairs.shape, dtype=x.dtype))
    expected = (log_p.exp() @ counts).reshape(batch, labels, labels)
    return log_z, entropy, expected


def brute_force_loss(crf: CRF, x: Tensor, y: Tensor, lam: float) -> Tensor:
    log_z, entropy, _ = enumerate_all(crf, x)
    return (log_z - gold_score(crf, x, y)).mean() - lam * entropy.mean()


# ----------------------------------------------------------------------------- checks, training
def check_against_brute_force(crf: CRF, x: Tensor, when: str) -> None:
    equation, factors = chain(crf, x)
    log_z, entropy = func.entropy_einsum(equation, *factors)
    bf_log_z, bf_entropy, bf_counts = enumerate_all(crf, x)
    check(close(log_z, bf_log_z), f"{when}: log Z equals brute force")
    check(close(entropy, bf_entropy), f"{when}: entropy equals brute force")
    counts = expected_transitions(crf, x)
    check(close(counts, bf_counts), f"{when}: expected transition counts equal brute force")
    steps = x.shape[1]
    totals = torch.full((x.shape[0],), steps - 1, dtype=x.dtype)
    check(close(counts.sum((1, 2)), totals), f"{when}: they add up to T - 1 = {steps - 1}")
    (d_trans,) = torch.autograd.grad(func.log_einsum(equation, *factors).sum(), crf.trans)
    check(close(counts.sum(0), d_trans), f"{when}: their sum over the batch is d log Z / d trans")


def train(
    x: Tensor, y: Tensor, labels: int, lam: float, steps: int, seed: int
) -> tuple[CRF, list[float], float, float]:
    """Adam on the regularised loss; the model, its losses, its final NLL and mean entropy."""
    crf = CRF.init(labels, x.shape[-1], torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(crf.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = loss_and_entropy(crf, x, y, lam)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        loss, entropy = loss_and_entropy(crf, x, y, lam)
    losses.append(loss.item())
    nll = loss.item() + lam * entropy.item()
    return crf, losses, nll, entropy.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the test suite)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    labels, length, features, batch = (3, 5, 4, 16) if args.small else (4, 7, 6, 32)
    steps, lambdas = (30, (0.0, 0.3)) if args.small else (60, (0.0, 0.1, 0.3, 1.0))
    x, y = toy_data(batch, length, labels, features, gen)
    print(f"{labels} labels, length {length}: {labels**length} label sequences per sentence")

    crf = CRF.init(labels, features, gen)
    check_against_brute_force(crf, x, "initial model")

    # The entropy's gradient: finite differences, on the factors of two short sentences.
    equation, factors = chain(crf, x[:2, :4])
    leaves = [f.detach().requires_grad_() for f in factors]
    check(
        torch.autograd.gradcheck(
            lambda *fs: func.entropy_einsum(equation, *fs)[1], leaves, raise_exception=False
        ),
        "gradcheck: d H / d factors agrees with finite differences",
    )
    # ... and the whole regularised loss, through the parameters, against the enumeration's.
    for lam in (0.0, 1.0):
        ours = torch.autograd.grad(loss_and_entropy(crf, x, y, lam)[0], crf.parameters())
        theirs = torch.autograd.grad(brute_force_loss(crf, x, y, lam), crf.parameters())
        check(
            all(close(a, b) for a, b in zip(ours, theirs)),
            f"λ = {lam}: the loss gradient equals autograd through brute force",
        )

    # Training with growing λ, from the same initial parameters.
    nlls, entropies = [], []
    for lam in lambdas:
        crf, losses, nll, entropy = train(x, y, labels, lam, steps, seed=1)
        nlls.append(nll)
        entropies.append(entropy)
        print(
            f"λ = {lam:4.2f}: loss {losses[0]:7.4f} -> {losses[-1]:7.4f} in {steps} Adam steps;"
            f" then NLL {nll:.4f}, mean entropy {entropy:.4f} nats"
        )
        check(losses[-1] < losses[0], f"λ = {lam}: the loss went down")
        check_against_brute_force(crf, x, f"trained with λ = {lam}")
    # At the minimiser of NLL - λ H, H cannot shrink and NLL cannot drop as λ grows (compare the
    # objectives of two minimisers at each other's λ); a few dozen Adam steps get close enough.
    check(
        all(a < b for a, b in zip(entropies, entropies[1:])),
        f"the trained models' entropy grows with λ: {[round(h, 4) for h in entropies]}",
    )
    check(
        all(a < b for a, b in zip(nlls, nlls[1:])),
        f"and their training NLL with it: {[round(n, 4) for n in nlls]}",
    )


if __name__ == "__main__":
    main()
