"""The nondeterministic stack RNN in the log semiring: ours against torch-semiring-einsum.

    python benchmarks/stack_rnn.py [--threads 1 [2 ...]] [--rounds 7] [--quick]
                                   [--timesteps 40] [--batch 10]
                                   [--only train viterbi neg-inf small]

**The workload.**  A nondeterministic stack RNN (an LSTM controller, hidden size 20, driving
a stack automaton with Q states and S stack symbols, in the style of DuSell & Chiang's
NS-RNN) keeps, in log space, the inner weights ``gamma[i -> t][q, x -> r, y]`` of every
stack segment and the forward weights ``alpha[t][r, y]``.  Each of the ``n`` timesteps
adds one column of gamma and one entry of alpha with four log-space einsums::

    REPL   biqxsz,bszry->biqxry   gamma's last column (B, T-1, Q, S, Q, S) x replace weights
    GAMMA' bktysz,bszr->bktyr     gamma's last column, rows 1.. (B, T-2, ...) x pop weights
    POP    bikqxty,bktyr->biqxry  gamma's earlier columns (B, T-2, T-2, Q, S, Q, S) x GAMMA'
    ALPHA  biqx,biqxry->bry       alpha (B, T, Q, S) x the new gamma column (B, T, ...)

where T is the length of the new column.  The new column is ``logaddexp(REPL[:, :-1],
POP)``, then REPL's last entry, then the push weights.  gamma only holds values on the upper
triangle (a segment starts before it ends): the operand of POP is -inf (log 0) on the whole
lower triangle, and on every entry that no sequence of stack actions reaches, so REPL and POP
produce -inf outputs, and are called with ``grad_of_neg_inf=0.0``.  gamma grows by
``torch.cat`` (no in-place writes), so autograd runs through the whole recurrence.  Defaults:
B = 10, n = 40, Q = 2, S = 3, float32, ``torch.manual_seed(0)``.

The einsums go through a small backend object, so the same model code runs on: ours
(``semiring_einsum.log_einsum``, block size 10 and ``AUTOMATIC_BLOCK_SIZE``), the reference
(``torch_semiring_einsum.log_einsum``, the same two block sizes) and plain torch
(``torch.logsumexp`` over the broadcast sum of the operands; it has no ``grad_of_neg_inf``,
so its gradients are NaN wherever every term of an output is -inf: reported next to its time,
not a failure).  Before timing, every backend's loss is checked against plain torch's, and
our gradients against the reference's.

**Sections** (one table each per thread count: median ms over ``--rounds`` interleaved
rounds via ``benchmarks/_timing.py``, and the ratio to the reference at block size 10 measured
in the same rounds):

1. *stack-RNN training step*: forward over all timesteps, loss (cross-entropy of a readout of
   the hidden state against random targets, plus a term on the final alpha so that gradients
   reach the stack), ``loss.backward()``;
2. *Viterbi decode*: the same forward recurrence with ``log_viterbi_einsum_forward`` (max
   instead of logsumexp, max instead of logaddexp), no backward;
3. *-inf step*: ours only, one POP call at timestep 30 (gamma of that step, with its -inf
   triangle) against the same call on finite data (the -inf entries replaced by random finite
   values), forward and forward+backward (a random cotangent), ``grad_of_neg_inf=0.0``,
   block size 10;
4. *small calls*: ``ij,jk->ik`` on 3x4 @ 4x5 through ``einsum``, ``log_einsum``,
   ``log_viterbi_einsum_forward`` and ``semiring_einsum_forward`` with a max-plus callback,
   then ``log_einsum`` and ``log_viterbi_einsum_forward`` on every equation and size of the
   package benchmark's ``quick`` preset (``python -m semiring_einsum --quick``), forward only.

**Goals** (printed at the end with PASS/MISS; reported, never enforced).  "ours/reference"
is each of our two block settings over the *faster* of the reference's two settings:

* stack-RNN training step: ours/reference <= 0.5, at each thread count;
* Viterbi decode: ours/reference <= 0.5;
* -inf step: triangle/finite <= 1.2, forward and forward+backward (the -inf entries cost
  no more than finite ones);
* small calls: ours/reference <= 0.7 on every small call.

``--rounds`` (default 7) sets the rounds of the first two sections; the -inf step runs 3x
and the small calls 5x as many (they are short).  ``--quick`` is a smoke run (8 timesteps,
the -inf step at the last one, 2 rounds) of a few seconds.
"""

from __future__ import annotations

import argparse
import functools
import math
import operator
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import semiring_einsum

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import medians_ms  # noqa: E402

EQUATIONS = {
    "repl": "biqxsz,bszry->biqxry",
    "gamma'": "bktysz,bszr->bktyr",
    "pop": "bikqxty,bktyr->biqxry",
    "alpha": "biqx,biqxry->bry",
}
NEG_INF_ZERO = frozenset({"repl", "pop"})
"""The einsums whose outputs can be -inf: called with ``grad_of_neg_inf=0.0``."""

BLOCK = 10
REF_BLOCK_NAME = "reference b10"
GOAL_TRAIN = 0.5
GOAL_VITERBI = 0.5
GOAL_TRIANGLE = 1.2
GOAL_SMALL = 0.7


# --------------------------------------------------------------------------------------------
# Backends: the four einsums of the recurrence, by name
# --------------------------------------------------------------------------------------------


@dataclass
class Backend:
    """How the model runs its einsums.

    Attributes:
        name: Shown in the tables.
        log: ``log(key, *operands)``: the log-space einsum ``EQUATIONS[key]``.
        viterbi: ``viterbi(key, *operands)``: its max-plus values (``None``: not offered).
    """

    name: str
    log: Callable[..., Tensor]
    viterbi: Callable[..., Tensor] | None = None


def library_backend(name: str, module: Any, block_size: Any) -> Backend:
    """A backend on ``module``'s torch-semiring-einsum interface (ours or the reference)."""
    compiled = {k: module.compile_equation(eq) for k, eq in EQUATIONS.items()}

    def log(key: str, *xs: Tensor) -> Tensor:
        if key in NEG_INF_ZERO:
            return module.log_einsum(compiled[key], *xs, block_size=block_size, grad_of_neg_inf=0.0)
        return module.log_einsum(compiled[key], *xs, block_size=block_size)

    def viterbi(key: str, *xs: Tensor) -> Tensor:
        return module.log_viterbi_einsum_forward(compiled[key], *xs, block_size=block_size)[0]

    return Backend(name, log, viterbi)


class Broadcast:
    """Plain torch: every operand viewed in the joint index space, added, then reduced.

    Example:
        >>> b = Broadcast("ij,jk->ik")
        >>> b.log(torch.zeros(2, 3), torch.zeros(3, 2))  # log 3 everywhere
        tensor([[1.0986, 1.0986],
                [1.0986, 1.0986]])
    """

    def __init__(self, equation: str) -> None:
        lhs, out = equation.split("->")
        terms = lhs.split(",")
        summed = "".join(c for c in dict.fromkeys("".join(terms)) if c not in out)
        joint = out + summed
        self.dims = tuple(range(len(out), len(joint)))
        self.layouts = []
        for term in terms:
            in_joint_order = sorted(term, key=joint.index)
            permutation = [term.index(c) for c in in_joint_order]
            self.layouts.append((permutation, [c in term for c in joint]))

    def _total(self, xs: tuple[Tensor, ...]) -> Tensor:
        aligned = []
        for x, (permutation, present) in zip(xs, self.layouts):
            x = x.permute(permutation)
            sizes = iter(x.shape)
            aligned.append(x.reshape([next(sizes) if p else 1 for p in present]))
        return functools.reduce(operator.add, aligned)

    def log(self, *xs: Tensor) -> Tensor:
        return torch.logsumexp(self._total(xs), self.dims)

    def max(self, *xs: Tensor) -> Tensor:
        return self._total(xs).amax(self.dims)


def torch_backend() -> Backend:
    """Plain torch (no ``grad_of_neg_inf``: NaN gradients at all--inf outputs)."""
    plans = {k: Broadcast(eq) for k, eq in EQUATIONS.items()}
    return Backend(
        "plain torch",
        lambda key, *xs: plans[key].log(*xs),
        lambda key, *xs: plans[key].max(*xs),
    )


def load_reference() -> ModuleType | None:
    try:
        import torch_semiring_einsum
    except ImportError:
        return None
    return torch_semiring_einsum


def backends(reference: ModuleType | None) -> list[Backend]:
    """Ours and the reference at block size 10 and automatic, then plain torch."""
    out = [
        library_backend("ours b10", semiring_einsum, BLOCK),
        library_backend("ours auto", semiring_einsum, semiring_einsum.AUTOMATIC_BLOCK_SIZE),
    ]
    if reference is not None:
        out += [
            library_backend(REF_BLOCK_NAME, reference, BLOCK),
            library_backend("reference auto", reference, reference.AUTOMATIC_BLOCK_SIZE),
        ]
    return out + [torch_backend()]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def logaddexp_zero_grad(a: Tensor, b: Tensor) -> Tensor:
    """``torch.logaddexp`` with gradient 0 (not NaN) where both operands are -inf."""
    both = torch.isneginf(a) & torch.isneginf(b)
    if not bool(both.any()):
        return torch.logaddexp(a, b)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    safe = torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b))
    return torch.where(both, torch.full((), -math.inf, dtype=a.dtype, device=a.device), safe)


class StackRNN(nn.Module):
    """An LSTM controller driving a nondeterministic stack (log-space weights).

    At timestep t (1..n) the controller reads the input embedding and the stack reading (a
    softmax over the Q*S entries of alpha[t-1]), and emits log-weights for push (q, x -> r, y),
    replace (q, x -> r, y) and pop (q, x -> r), normalised by a log_softmax over all actions
    of each (q, x).  gamma's rows stand for the times -1 .. n-1 at which a segment starts, its
    columns for the times 0 .. n at which it ends; alpha's rows for the times -1 .. n.
    """

    def __init__(
        self,
        states: int = 2,
        symbols: int = 3,
        input_size: int = 8,
        hidden: int = 20,
        outputs: int = 5,
        cell: str = "lstm",
    ) -> None:
        super().__init__()
        self.q, self.s = states, symbols
        qs = states * symbols
        cell_type = {"lstm": nn.LSTMCell, "rnn": nn.RNNCell}[cell]
        self.cell = cell_type(input_size + qs, hidden)
        self.actions = nn.Linear(hidden, qs * (2 * qs + states))
        self.readout = nn.Linear(hidden, outputs)

    def forward(
        self,
        inputs: Tensor,
        backend: Backend,
        viterbi: bool = False,
        probe: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run all timesteps.

        Args:
            inputs: (B, n, input_size) embeddings.
            backend: The einsums.
            viterbi: Max-plus (``backend.viterbi``, max for logaddexp) instead of log.
            probe: If given, ``probe['t']`` names a timestep whose POP operands are stored
                under ``probe['gamma']`` and ``probe["gamma'"]`` (detached).

        Returns:
            The readout logits (B, n, outputs) and the final alpha (B, Q, S).
        """
        batch, steps = inputs.shape[:2]
        q, s = self.q, self.s
        qs = q * s
        like = {"dtype": inputs.dtype, "device": inputs.device}
        if viterbi:
            assert backend.viterbi is not None
            einsum, add = backend.viterbi, torch.maximum
        else:
            einsum, add = backend.log, logaddexp_zero_grad
        gamma = torch.full((batch, 1, 1, q, s, q, s), -math.inf, **like)
        gamma[:, 0, 0, 0, 0, 0, 0] = 0.0  # the bottom of the stack: log 1
        alpha = torch.full((batch, 2, q, s), -math.inf, **like)
        alpha[:, :, 0, 0] = 0.0
        state = None
        logits = []
        for t in range(1, steps + 1):
            reading = torch.softmax(alpha[:, t].reshape(batch, qs), dim=-1)
            state = self.cell(torch.cat([inputs[:, t - 1], reading], -1), state)
            h = state[0] if isinstance(state, tuple) else state
            logits.append(self.readout(h))
            weights = F.log_softmax(self.actions(h).reshape(batch, q, s, -1), dim=-1)
            push = weights[..., :qs].reshape(batch, q, s, q, s)
            replace = weights[..., qs : 2 * qs].reshape(batch, q, s, q, s)
            pop = weights[..., 2 * qs :]
            last = gamma[:, :, -1]  # segments ending at t-1: starts -1 .. t-2
            repl = einsum("repl", last, replace)
            if t >= 2:
                popped = einsum("gamma'", last[:, 1:], pop)
                if probe is not None and probe.get("t") == t:
                    probe["gamma"] = gamma[:, :-1, :-1].detach().clone()
                    probe["gamma'"] = popped.detach().clone()
                both = add(repl[:, :-1], einsum("pop", gamma[:, :-1, :-1], popped))
                column = torch.cat([both, repl[:, -1:], push[:, None]], 1)
            else:
                column = torch.cat([repl, push[:, None]], 1)
            alpha = torch.cat([alpha, einsum("alpha", alpha, column)[:, None]], 1)
            empty = torch.full((batch, 1, t, q, s, q, s), -math.inf, **like)
            gamma = torch.cat([torch.cat([gamma, empty], 1), column[:, :, None]], 2)
        return torch.stack(logits, 1), alpha[:, -1]


@dataclass
class Task:
    """A model, its inputs and random targets."""

    model: StackRNN
    inputs: Tensor
    targets: Tensor

    def loss(self, backend: Backend) -> Tensor:
        logits, final = self.model(self.inputs, backend)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
        stack = -torch.logsumexp(final.flatten(1), 1).mean()
        return ce + stack / self.inputs.shape[1]

    def train_step(self, backend: Backend) -> Tensor:
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(backend)
        loss.backward()
        return loss.detach()

    def grads(self) -> list[Tensor]:
        return [p.grad.detach().clone() for p in self.model.parameters() if p.grad is not None]

    def decode(self, backend: Backend) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.model(self.inputs, backend, viterbi=True)


def make_task(
    batch: int = 10,
    steps: int = 40,
    states: int = 2,
    symbols: int = 3,
    hidden: int = 20,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Task:
    torch.manual_seed(seed)
    model = StackRNN(states, symbols, hidden=hidden).to(dtype)
    inputs = torch.randn(batch, steps, 8, dtype=dtype)
    targets = torch.randint(0, 5, (batch, steps))
    return Task(model, inputs, targets)


# --------------------------------------------------------------------------------------------
# Checks, timing, tables
# --------------------------------------------------------------------------------------------


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def check_backends(task: Task, contenders: list[Backend]) -> tuple[list[str], dict[str, int]]:
    """Losses against plain torch, our gradients against the reference's, NaN counts."""
    lines = []
    results = {}
    for b in contenders:
        loss = task.train_step(b)
        grads = task.grads()
        nan = sum(int(g.isnan().sum()) for g in grads)
        results[b.name] = (loss, grads, nan)
    torch_loss = results["plain torch"][0]
    ref = results.get(REF_BLOCK_NAME)
    for b in contenders:
        loss, grads, nan = results[b.name]
        close = math.isclose(float(loss), float(torch_loss), rel_tol=1e-4, abs_tol=1e-5)
        line = (
            f"  {b.name:<15} loss {float(loss):.6f}  vs plain torch: "
            f"{'ok' if close else 'DIFFERS'} (|diff| {abs(float(loss - torch_loss)):.2e})"
        )
        line += f"  NaN grad entries: {nan} of {sum(g.numel() for g in grads)}"
        if b.name.startswith("ours") and ref is not None:
            same = all(
                torch.allclose(x, y, rtol=1e-3, atol=1e-5, equal_nan=True)
                for x, y in zip(grads, ref[1])
            )
            line += (
                f"  grads vs {REF_BLOCK_NAME}: {'ok' if same else 'DIFFER'} "
                f"(max |diff| {_max_diff(grads, ref[1]):.2e})"
            )
            if nan:
                line += "  <-- LIBRARY BUG? NaN gradients with grad_of_neg_inf=0.0"
        lines.append(line)
    return lines, {name: nan for name, (_, _, nan) in results.items()}


def check_viterbi(task: Task, contenders: list[Backend]) -> list[str]:
    """Every Viterbi decode against plain torch's broadcast amax."""
    want = task.decode(contenders[-1])
    lines = []
    for b in contenders[:-1]:
        got = task.decode(b)
        diff = max(float((x - y).abs().max()) for x, y in zip(got, want))
        ok = all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(got, want))
        lines.append(f"  {b.name:<15} vs plain torch: {'ok' if ok else 'DIFFERS'} ({diff:.2e})")
    return lines


def _ratio(ms: float, base: float | None) -> str:
    return f"{ms / base:.3f}" if base else "-"


def table(
    title: str,
    rows: list[tuple[str, str, float, float | None]],
    ratio: str = "ratio to reference b10",
) -> None:
    """Print rows of (workload, contender, ms, baseline ms) as a table."""
    cells = [[w, c, f"{ms:.3f}", _ratio(ms, base)] for w, c, ms, base in rows]
    header = ["workload", "contender", "ms", ratio]
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    print(f"\n{title}")
    print("  ".join(h.ljust(n) for h, n in zip(header, widths)).rstrip())
    print("  ".join("-" * n for n in widths))
    for row in cells:
        print("  ".join(c.ljust(n) for c, n in zip(row, widths)).rstrip())


@dataclass
class Goal:
    text: str
    value: float
    target: float
    more: tuple[str, ...] = ()  # further lines (the other misses of a worst-of goal)

    def line(self) -> str:
        verdict = "PASS" if self.value <= self.target else "MISS"
        head = f"  {verdict}  {self.text}: {self.value:.3f} (goal <= {self.target})"
        return "\n".join([head, *(f"        {m}" for m in self.more)])


def _vs_best_reference(label: str, ms: dict[str, float], target: float, threads: int) -> list[Goal]:
    refs = [ms[k] for k in ms if k.startswith("reference")]
    if not refs:
        return []
    best = min(refs)
    return [
        Goal(f"{label}, {threads} thread(s), {k} / faster reference", v / best, target)
        for k, v in ms.items()
        if k.startswith("ours")
    ]


def time_training(
    task: Task, contenders: list[Backend], rounds: int, threads: int, nan_note: str
) -> list[Goal]:
    ms = medians_ms([functools.partial(task.train_step, b) for b in contenders], rounds)
    got = dict(zip([b.name for b in contenders], ms))
    base = got.get(REF_BLOCK_NAME)
    label = f"train n={task.inputs.shape[1]}"
    rows = [
        (label, b.name + (nan_note if b.name == "plain torch" else ""), got[b.name], base)
        for b in contenders
    ]
    table(f"stack-RNN training step (fwd + loss + backward), {threads} thread(s)", rows)
    got.pop("plain torch")
    return _vs_best_reference("stack-RNN training step", got, GOAL_TRAIN, threads)


def time_viterbi(task: Task, contenders: list[Backend], rounds: int, threads: int) -> list[Goal]:
    libs = [b for b in contenders if b.name != "plain torch"]
    ms = medians_ms([functools.partial(task.decode, b) for b in libs], rounds)
    got = dict(zip([b.name for b in libs], ms))
    base = got.get(REF_BLOCK_NAME)
    label = f"viterbi n={task.inputs.shape[1]}"
    table(
        f"Viterbi decode (forward, max-plus), {threads} thread(s)",
        [(label, k, v, base) for k, v in got.items()],
    )
    return _vs_best_reference("Viterbi decode", got, GOAL_VITERBI, threads)


def pop_operands(task: Task, step: int) -> tuple[Tensor, Tensor]:
    """POP's operands at timestep ``step`` (gamma with its -inf triangle, and GAMMA')."""
    probe: dict[str, Any] = {"t": step}
    with torch.no_grad():
        task.model(task.inputs, torch_backend(), probe=probe)
    return probe["gamma"], probe["gamma'"]


def time_neg_inf_step(task: Task, step: int, rounds: int, threads: int) -> list[Goal]:
    gamma, popped = pop_operands(task, step)
    g = torch.Generator().manual_seed(1)
    finite = gamma[torch.isfinite(gamma)]
    noise = torch.randn(gamma.shape, generator=g, dtype=gamma.dtype) * finite.std() + finite.mean()
    filled = torch.where(torch.isinf(gamma), noise, gamma)
    eq = semiring_einsum.compile_equation(EQUATIONS["pop"])
    out_shape = semiring_einsum.log_einsum(eq, gamma, popped, block_size=BLOCK).shape
    cotangent = torch.randn(out_shape, generator=g, dtype=gamma.dtype)

    def forward(x: Tensor) -> Callable[[], object]:
        return lambda: semiring_einsum.log_einsum(
            eq, x, popped, block_size=BLOCK, grad_of_neg_inf=0.0
        )

    def backward(x: Tensor) -> Callable[[], object]:
        xg, pg = x.clone().requires_grad_(), popped.clone().requires_grad_()

        def call() -> object:
            out = semiring_einsum.log_einsum(eq, xg, pg, block_size=BLOCK, grad_of_neg_inf=0.0)
            return torch.autograd.grad(out, (xg, pg), cotangent)

        return call

    # Gradients at the -inf triangle with grad_of_neg_inf=0.0 must be finite.
    grads = backward(gamma)()
    assert isinstance(grads, tuple)
    bad = sum(int((~torch.isfinite(x)).sum()) for x in grads)
    fwd_tri, fwd_fin, bwd_tri, bwd_fin = medians_ms(
        [forward(gamma), forward(filled), backward(gamma), backward(filled)], rounds
    )
    frac = float(torch.isinf(gamma).float().mean())
    label = f"POP t={step} {tuple(gamma.shape)}"
    table(
        f"-inf step: ours, one POP call, block 10, grad_of_neg_inf=0.0, {threads} thread(s)"
        f" ({frac:.0%} of gamma's entries -inf; non-finite grads at the triangle: {bad})",
        [
            (label + " fwd", "triangle", fwd_tri, fwd_fin),
            (label + " fwd", "finite", fwd_fin, fwd_fin),
            (label + " fwd+bwd", "triangle", bwd_tri, bwd_fin),
            (label + " fwd+bwd", "finite", bwd_fin, bwd_fin),
        ],
        ratio="ratio to finite (no reference here)",
    )
    if bad:
        print(f"  LIBRARY BUG? {bad} non-finite gradient entries with grad_of_neg_inf=0.0")
    return [
        Goal(
            f"-inf step fwd, {threads} thread(s), triangle / finite",
            fwd_tri / fwd_fin,
            GOAL_TRIANGLE,
        ),
        Goal(
            f"-inf step fwd+bwd, {threads} thread(s), triangle / finite",
            bwd_tri / bwd_fin,
            GOAL_TRIANGLE,
        ),
    ]


def _max_plus(compute_sum: Callable[..., Tensor]) -> Tensor:
    def add(a: Tensor, b: Tensor) -> None:
        torch.maximum(a, b, out=a)

    def reduce(a: Tensor, dims: tuple[int, ...]) -> Tensor:
        return a.amax(dims) if dims else a

    def multiply(a: Tensor, b: Tensor) -> None:
        a.add_(b)

    return compute_sum(add, reduce, multiply)


def small_calls() -> list[tuple[str, str, list[Tensor]]]:
    """(name, function, operands): the 3x4 @ 4x5 calls, then the quick preset's equations."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=g), torch.randn(4, 5, generator=g)
    calls = [
        (f"{fn} ij,jk->ik 3x4@4x5", fn, [a, b])
        for fn in ("einsum", "log_einsum", "log_viterbi_einsum_forward", "semiring_einsum_forward")
    ]
    from semiring_einsum.bench import WORKLOADS

    seen = set()
    for w in WORKLOADS:
        sizes = w.sizes["quick"]
        key = (w.equation, tuple(sorted(sizes.items())))
        if key in seen:
            continue
        seen.add(key)
        terms = w.equation.split("->")[0].split(",")
        xs = [torch.randn([sizes[c] for c in t], generator=g) for t in terms]
        dims = " ".join(f"{c}={n}" for c, n in sizes.items())
        for fn in ("log_einsum", "log_viterbi_einsum_forward"):
            calls.append((f"{fn} {w.equation} {dims}", fn, xs))
    return calls


def _small_call(module: Any, fn: str, eq: object, xs: list[Tensor], block: Any) -> Callable:
    if fn == "semiring_einsum_forward":
        return lambda: module.semiring_einsum_forward(eq, xs, block, _max_plus)
    f = getattr(module, fn)
    return lambda: f(eq, *xs, block_size=block)


SMALL_NUMBER = 10
"""Calls per timing sample of a small call (0.05-1.5 ms each)."""


def time_small_calls(reference: ModuleType, rounds: int, threads: int) -> list[Goal]:
    rows: list[tuple[str, str, float, float | None]] = []
    ratios = []
    for name, fn, xs in small_calls():
        equation = name.split()[1]
        ours_eq = semiring_einsum.compile_equation(equation)
        ref_eq = reference.compile_equation(equation)
        settings = {
            "ours b10": (semiring_einsum, ours_eq, BLOCK),
            "ours auto": (semiring_einsum, ours_eq, semiring_einsum.AUTOMATIC_BLOCK_SIZE),
            REF_BLOCK_NAME: (reference, ref_eq, BLOCK),
            "reference auto": (reference, ref_eq, reference.AUTOMATIC_BLOCK_SIZE),
        }
        fns = [_small_call(m, fn, e, xs, blk) for m, e, blk in settings.values()]
        for f in fns:  # both must run, and agree
            f()
        ms = dict(zip(settings, medians_ms(fns, rounds, warmup=3, number=SMALL_NUMBER)))
        rows += [(name, k, v, ms[REF_BLOCK_NAME]) for k, v in ms.items()]
        best = min(ms[REF_BLOCK_NAME], ms["reference auto"])
        ratios += [(ms[k] / best, f"{name} ({k})") for k in ("ours b10", "ours auto")]
    table(f"small calls (forward), {threads} thread(s)", rows)
    worst, which = max(ratios)
    passed = sum(r <= GOAL_SMALL for r, _ in ratios)
    text = (
        f"small calls, {threads} thread(s), ours / faster reference, worst of {len(ratios)} "
        f"({passed} within the goal): {which}"
    )
    misses = sorted((r, w) for r, w in ratios if r > GOAL_SMALL)[:-1][::-1]
    return [Goal(text, worst, GOAL_SMALL, tuple(f"also {w}: {r:.3f}" for r, w in misses))]


def check_small_calls(reference: ModuleType) -> list[str]:
    bad = []
    for name, fn, xs in small_calls():
        equation = name.split()[1]
        ours = _small_call(semiring_einsum, fn, equation, xs, BLOCK)()
        ref = _small_call(reference, fn, reference.compile_equation(equation), xs, BLOCK)()
        ours_v = ours[0] if isinstance(ours, tuple) else ours
        ref_v = ref[0] if isinstance(ref, tuple) else ref
        if not torch.allclose(ours_v, ref_v, rtol=1e-4, atol=1e-5):
            bad.append(name)
    return [f"  small calls: ours vs reference values {'ok' if not bad else 'DIFFER: '}"] + [
        f"    {b}" for b in bad
    ]


SECTIONS = ("train", "viterbi", "neg-inf", "small")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=None, help="default 7 (--quick: 2)")
    parser.add_argument("--timesteps", type=int, default=None, help="default 40 (--quick: 8)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--step", type=int, default=30, help="timestep of the -inf step")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 timesteps, 2 rounds")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="run only these sections (default: all)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    steps = args.timesteps or (8 if args.quick else 40)
    step = min(args.step, steps)
    started = time.perf_counter()
    reference = load_reference()
    torch.set_num_threads(args.threads[0])
    print(
        f"torch {torch.__version__}, semiring_einsum {semiring_einsum.__version__}, "
        f"reference {'torch_semiring_einsum' if reference else 'NOT INSTALLED'}; "
        f"B={args.batch} n={steps} Q=2 S=3 hidden=20 float32; "
        f"{rounds} interleaved rounds, median ms"
    )
    task = make_task(args.batch, steps)
    contenders = backends(reference)
    print("\nchecks (before timing)")
    lines, nan_counts = check_backends(task, contenders)
    for line in lines:
        print(line)
    print("  Viterbi decode:")
    for line in check_viterbi(task, contenders):
        print("  " + line)
    if reference is not None:
        for line in check_small_calls(reference):
            print(line)
    nan_note = f" (NaN grads: {'yes' if nan_counts['plain torch'] else 'no'})"
    goals: list[Goal] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        if "train" in args.only:
            goals += time_training(task, contenders, rounds, threads, nan_note)
        if "viterbi" in args.only:
            goals += time_viterbi(task, contenders, rounds, threads)
        if "neg-inf" in args.only:
            goals += time_neg_inf_step(task, step, rounds * 3, threads)
        if reference is not None and "small" in args.only:
            goals += time_small_calls(reference, rounds * 5, threads)
    print("\ngoals (ours / the faster of the reference's two block settings)")
    for goal in goals:
        print(goal.line())
    met = sum(g.value <= g.target for g in goals)
    print(f"{met} of {len(goals)} goals met; {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
